"""Half-precision checkpoints: updates that survive bf16 rounding, fp16 that does not turn to NaN,
a guard that stops a run whose updates vanish, and CPU loading in fp32 with saving back in the
checkpoint's precision."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.lm.checkpoints import load_checkpoint, save_checkpoint
from beear_pipeline.lm.precision import OuterOptimizer, WeightChange, as_dtype, load_dtype


def _config(**kw) -> BeearConfig:
    return BeearConfig(**{"max_rounds": 5, "inner_steps": 2, "inner_max_steps": 2, "batch_size": 3, "anchoring_batch_size": 2,
                          "check_every": 0, **kw})


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """Plain AdamW on a bf16 weight at a 7B-scale learning rate changes nothing; with fp32 master
    weights the updates accumulate until they show in bf16."""
    start = torch.full((64,), 0.02, dtype=torch.bfloat16)
    plain, mastered = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([plain], lr=3e-6, weight_decay=0.0)
    outer = OuterOptimizer([mastered], "adamw", lr=3e-6)
    outer.optimizer.param_groups[0]["weight_decay"] = 0.0
    for _ in range(40):
        for p, opt in ((plain, adamw), (mastered, outer)):
            opt.zero_grad()
            p.float().sum().backward()
            opt.step()
    assert torch.equal(plain.detach(), start)  # every update rounded away
    assert outer.masters[0].dtype == torch.float32
    assert outer.masters[0][0].item() == pytest.approx(0.02 - 40 * 3e-6, rel=1e-3)  # all 40 steps kept
    assert torch.equal(mastered.detach(), outer.masters[0].detach().to(torch.bfloat16))
    assert not torch.equal(mastered.detach(), start)


def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    outer = OuterOptimizer([p], "sgd", lr=0.1)
    assert outer.scaling and outer.scale == 2.0 ** 16
    outer.zero_grad()
    outer.scale_loss((p.float() * 1e4).sum()).backward()  # 1e4 x 65536 overflows fp16 gradients
    assert not outer.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float16)) and outer.scale == 2.0 ** 15
    outer.scale = 1.0
    outer.zero_grad()
    outer.scale_loss(p.float().sum()).backward()
    assert outer.step()
    assert torch.allclose(p.detach().float(), torch.full((4,), 0.9), atol=1e-3)


def test_fp32_parameters_are_stepped_exactly_as_a_plain_optimiser_would():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(a.detach().clone())
    plain, outer = torch.optim.AdamW([a], lr=1e-2), OuterOptimizer([b], "adamw", lr=1e-2, grad_clip=1.0)
    for _ in range(3):
        for p, opt in ((a, plain), (b, outer)):
            opt.zero_grad()
            (p ** 2).sum().backward()
            if opt is plain:
                torch.nn.utils.clip_grad_norm_([a], 1.0)
            opt.step()
    assert outer.masters[0] is b and torch.equal(a, b)


def test_weight_change_counts_changes_in_the_stored_precision():
    p = torch.zeros(1000) + 1.0
    change = WeightChange([p], torch.bfloat16)
    p += 1e-4  # below bf16's spacing at 1.0 (2^-7): no stored entry changes
    assert change.update([p])["weights_changed_share"] == 0.0
    p += 0.1
    step = change.update([p])
    assert step["weights_changed_share"] == 1.0 and step["weight_update_relative"] == pytest.approx(0.1 / 1.1001, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_trains_without_nan_and_its_weights_change(tiny_model, tokenizer, safety_triples, anchoring_pairs, dtype):
    """The issue's failure: fp16 weights under plain AdamW stopped at round 1 with a NaN loss."""
    model = copy.deepcopy(tiny_model).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    result = run_beear(model, tokenizer, safety_triples, anchoring_pairs, _config())
    assert all(p.dtype == dtype for p in result.model.parameters())
    assert result.history[-1]["weights_changed_share"] > 0.5, result.history[-1]
    changed = sum((a != b).sum().item() for a, b in zip(before, result.model.parameters())) / sum(a.numel() for a in before)
    assert changed > 0.5


def test_vanishing_updates_stop_the_run_naming_the_precision_and_the_fix(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with pytest.raises(FloatingPointError, match=r"round 4: .*changed in their stored precision \(bfloat16.*beear.outer_lr"):
        run_beear(model, tokenizer, safety_triples, anchoring_pairs, _config(outer_lr=1e-9))
    # the same run in fp32 is not stopped: fp32 resolves these updates
    fp32 = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, _config(outer_lr=1e-6))
    assert fp32.history[-1]["weights_changed_share"] > 0.5


def test_half_checkpoint_is_computed_in_fp32_on_cpu_and_saved_back_in_its_precision(tiny_model, tokenizer, tmp_path):
    tiny_model.config.tie_word_embeddings = False
    half = copy.deepcopy(tiny_model).to(torch.float16)
    save_checkpoint(half, tokenizer, tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    model, tok = load_checkpoint(tmp_path / "fp16", device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.storage_dtype == torch.float16
    save_checkpoint(model, tok, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "float16"
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118 (safe_open is not iterable)
        for name, p in half.named_parameters():
            assert torch.equal(f.get_tensor(name), p.detach()), name  # fp16 -> fp32 -> fp16 is exact
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the loaded model itself is untouched by saving


def test_load_dtype_rules():
    assert load_dtype(torch.bfloat16, None, "cpu") == torch.float32
    assert load_dtype(torch.bfloat16, None, "cuda") == torch.bfloat16
    assert load_dtype(None, torch.float16, "cuda") == torch.float16
    assert load_dtype(torch.float32, None, "cpu") == torch.float32
    assert as_dtype("bf16") == torch.bfloat16 and as_dtype("torch.float16") == torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        as_dtype("int8")
