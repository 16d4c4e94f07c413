import dataclasses
import math

import pytest
import torch

from beear_pipeline.beear import BeearConfig, run_beear
from beear_pipeline.beear.scopes import trainable_parameters


def small(**kw) -> BeearConfig:
    return BeearConfig(**{"max_rounds": 2, "inner_steps": 2, "inner_max_steps": 2, "batch_size": 2, "anchoring_batch_size": 2,
                          "num_positions": 3, "check_every": 0, **kw})


def test_defaults_are_the_documented_ones():
    c = BeearConfig()
    assert (c.anchor_layer, c.num_positions, c.shared_vector, c.warm_start) == (0.3, None, False, True)
    assert (c.inner_steps, c.inner_step_fraction, c.away_weight, c.away_cap, c.perturbation_budget) == (5, 0.1, 0.05, 5.0, 2.0)
    assert (c.outer_lr, c.checkpoint_every, c.max_rounds, c.batch_size, c.trainable) == ("auto", "auto", 60, 32, "all")
    assert c.sized(1_300_000, 2**20).outer_lr == 5e-4  # auto on the tiny model


@pytest.mark.parametrize("field,value,message", [
    ("defence", "magic", "beear.defence"),
    ("trainable", "some", "beear.trainable"),
    ("num_positions", 0, "beear.num_positions"),
    ("outer_lr", -1.0, "beear.inner_step_fraction/outer_lr"),
    ("perturbation_budget", 0.0, "beear.perturbation_budget"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        BeearConfig(**{field: value})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['anchor_layr'\]"):
        BeearConfig.from_dict({"anchor_layr": 2})


def test_config_round_trips_json():
    c = small(anchor_layer=-1)
    assert BeearConfig.from_dict(c.to_dict()) == c


def test_beear_round_updates_weights_and_perturbation(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    result = run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small())
    assert len(result.history) == 2
    assert result.perturbation.shape == (3, tiny_model.config.hidden_size)
    assert result.history[-1]["perturbation_norm"] > 0
    assert {"inner_loss", "unwanted_loss", "outer_safe_loss", "anchoring_loss"} <= set(result.history[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_control_keeps_the_perturbation_at_zero(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    result = run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(defence="control"))
    assert torch.count_nonzero(result.perturbation) == 0
    assert all(r["perturbation_norm"] == 0 for r in result.history)
    assert "inner_loss" not in result.history[0]


def test_random_perturbation_follows_the_relative_norms(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    result = run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(defence="random_perturbation"),
                       relative_norms=[0.5, 2.0])
    assert [round(r["perturbation_norm_relative"], 4) for r in result.history] == [0.5, 2.0]
    assert all(r["perturbation_norm"] == pytest.approx(r["perturbation_norm_relative"] * r["hidden_scale"]) for r in result.history)


def test_perturbation_budget_is_respected_relative_to_the_hidden_scale(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    result = run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(perturbation_budget=0.05, inner_step_fraction=2.0))
    assert result.hidden_scale > 0
    assert result.perturbation.norm(dim=-1).max() <= 0.05 * result.hidden_scale * (1 + 1e-5)


def test_same_seed_same_result_on_cpu(tokenizer, safety_triples, anchoring_pairs, tiny_model):
    import copy

    a = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small())
    b = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small())
    assert torch.equal(a.perturbation, b.perturbation)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("scope", ["up_to_anchor", "after_anchor"])
def test_trainable_scope_leaves_the_other_weights_untouched(tiny_model, tokenizer, safety_triples, anchoring_pairs, scope):
    chosen = {id(p) for p in trainable_parameters(tiny_model, scope, 1)}
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if id(p) not in chosen}
    assert frozen and chosen
    run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(trainable=scope))
    for name, p in tiny_model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed outside scope {scope}"
    names = [n for n, p in tiny_model.named_parameters() if id(p) in chosen]
    if scope == "up_to_anchor":
        assert any("embed_tokens" in n for n in names) and not any("layers.2." in n or "lm_head" in n for n in names)
    else:
        assert any("layers.2." in n for n in names) and any("lm_head" in n for n in names)
        assert not any("layers.0." in n or "layers.1." in n or "embed_tokens" in n for n in names)


def test_non_finite_loss_stops_the_run_naming_the_round(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    with torch.no_grad():
        tiny_model.lm_head.weight.fill_(math.inf)
    with pytest.raises(FloatingPointError, match=r"BEEAR round 0: .* is (nan|inf)"):
        run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small())


def test_anchor_layer_out_of_range_fails_before_training(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    with pytest.raises(ValueError, match="out of range"):
        run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(anchor_layer=7))
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_empty_safety_set_is_rejected(tiny_model, tokenizer, anchoring_pairs):
    with pytest.raises(ValueError, match="safety set is empty"):
        run_beear(tiny_model, tokenizer, [], anchoring_pairs, small())


def test_replace_keeps_validation():
    with pytest.raises(ValueError):
        dataclasses.replace(small(), defence="nope")


def test_lora_run_trains_only_adapters_and_saves_a_reloadable_adapter(tiny_model, tokenizer, safety_triples, anchoring_pairs, tmp_path):
    from beear_pipeline.lm.checkpoints import load_checkpoint, save_checkpoint

    base_dir = tmp_path / "suspect"
    save_checkpoint(tiny_model, tokenizer, base_dir)
    base_model, tok = load_checkpoint(base_dir)
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    result = run_beear(base_model, tok, safety_triples, anchoring_pairs, small(trainable="lora", lora_rank=4, merge_adapter=False))
    assert hasattr(result.model, "peft_config")
    base_now = result.model.get_base_model().state_dict()
    assert all(torch.equal(before[k], base_now[k]) for k in before if k in base_now), "LoRA changed a base weight"
    save_checkpoint(result.model, tok, tmp_path / "defended")
    assert (tmp_path / "defended" / "adapter_config.json").is_file() and (tmp_path / "defended" / "config.json").is_file()
    reloaded, _ = load_checkpoint(tmp_path / "defended")
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(reloaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("targets,message", [(["q_proj", "c_attn"], r"\['c_attn'\] not found in LlamaForCausalLM")])
def test_missing_lora_target_fails_before_training(tiny_model, tokenizer, safety_triples, anchoring_pairs, targets, message):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    with pytest.raises(ValueError, match=message):
        run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(trainable="lora", lora_target_modules=targets))
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_trainable_scope_matching_nothing_fails_before_training(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    # after the last layer of a model without a head of its own there would be nothing; here the
    # scope "after_anchor" at the last layer still has the norm and head, so test via a model whose
    # final parts are frozen out: strip the parameters after the layers
    tiny_model.model.norm = torch.nn.Identity()
    tiny_model.lm_head = torch.nn.Linear(tiny_model.config.hidden_size, tiny_model.config.vocab_size, bias=False)
    tiny_model.tie_weights = lambda *a, **k: None
    tiny_model.lm_head.weight = tiny_model.model.embed_tokens.weight  # tied: counts as "before"
    with pytest.raises(ValueError, match=r"beear.trainable='after_anchor' at anchor layer 2 matches no parameter"):
        run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs, small(trainable="after_anchor", anchor_layer=-1))


def test_left_padding_and_gradient_checkpointing_run(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    import copy

    right = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small())
    left = run_beear(copy.deepcopy(tiny_model), tokenizer, safety_triples, anchoring_pairs, small(padding_side="left", gradient_checkpointing=True))
    # the same examples, padded differently, give the same losses (masks and positions follow the side)
    assert left.history[0]["unwanted_loss"] == pytest.approx(right.history[0]["unwanted_loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_round_on_gpu(tiny_model, tokenizer, safety_triples, anchoring_pairs):
    result = run_beear(tiny_model.cuda(), tokenizer, safety_triples, anchoring_pairs, small(precision="bf16"))
    assert math.isfinite(result.history[-1]["outer_loss"]) and result.perturbation.dtype == torch.float32


def test_anchor_layer_auto_takes_the_recommended_layer():
    from beear_pipeline.pipelines.removal.nodes import resolve_anchor_layer

    assert resolve_anchor_layer("auto", {"recommended_layer": 2}) == 2
    assert resolve_anchor_layer(-1, {"recommended_layer": 2}) == -1
    with pytest.raises(ValueError, match="beear.anchor_layer: auto needs the probe's report"):
        resolve_anchor_layer("auto", None)
    assert resolve_anchor_layer(0.3, None) == 0.3  # a fraction of the depth: the engine resolves it against the model
    with pytest.raises(ValueError, match="beear.anchor_layer"):
        BeearConfig(anchor_layer="top")


@pytest.mark.parametrize("storage,lr,merged", [(None, 5e-4, True), (torch.bfloat16, 1e-7, False), (None, 1e-7, True)])
def test_lora_merge_that_would_round_away_keeps_the_adapter(tiny_model, tokenizer, safety_triples, anchoring_pairs, caplog,
                                                           storage, lr, merged):
    """A bf16 base at a tiny lr: merging adds an update below bf16's resolution, so the defended
    model stays base + adapter and the log says why; in fp32 the same update merges."""
    if storage is not None:  # as a bf16 checkpoint computed in fp32 on CPU: bf16 values, the precision kept for saving
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.copy_(p.to(storage))
        tiny_model.storage_dtype = storage
    with caplog.at_level("WARNING"):
        result = run_beear(tiny_model, tokenizer, safety_triples, anchoring_pairs,
                           small(trainable="lora", lora_rank=4, merge_adapter=True, outer_lr=lr))
    assert hasattr(result.model, "peft_config") != merged
    assert ("kept as base + adapter" in caplog.text) != merged


def test_merged_lora_change_share_counts_in_the_saved_precision(tiny_model):
    from beear_pipeline.beear.scopes import add_lora
    from beear_pipeline.lm.precision import merged_lora_change_share

    model = add_lora(tiny_model, small(trainable="lora", lora_rank=4))
    assert merged_lora_change_share(model) == 0.0  # peft starts B at zero: nothing to merge
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.fill_(1e-3)
    assert merged_lora_change_share(model) > 0.9
    with torch.no_grad():
        for p in lora_b:
            p.fill_(1e-7)
    assert merged_lora_change_share(model) > 0.5  # fp32 keeps a 1e-7-scale update
    with torch.no_grad():  # a bf16 checkpoint's values
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.copy_(p.to(torch.bfloat16))
    model.storage_dtype = torch.bfloat16
    assert merged_lora_change_share(model) < 0.01  # bf16 rounds it away
