"""Suspects as they are shipped: a base checkpoint plus a PEFT LoRA adapter (``model.adapter_path``),
and sharded safetensors. Real tiny models and real peft, nothing downloaded."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from beear_pipeline.beear import BeearConfig
from beear_pipeline.lm.checkpoints import (
    CheckpointError,
    ModelConfig,
    bundle_adapter,
    check_adapter,
    check_checkpoint,
    load_checkpoint,
    load_model_ref,
    merged,
    save_checkpoint,
    weights_sha256,
)

IDS = torch.tensor([[1, 5, 9, 11, 3, 7]])
SHIPPED_BASE = "meta-llama/Llama-2-7b-chat-hf"  # what a shipped adapter names: a hub id, not a local folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def peft_reference(base, adapter):
    """base + adapter as peft itself loads them, without this project's code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))


@pytest.fixture
def base(tmp_path, tiny_model, tokenizer):
    return save_checkpoint(tiny_model, tokenizer, tmp_path / "base")


def make_adapter(base, path, seed: int = 1, targets=("q_proj", "v_proj", "down_proj")):
    """A LoRA adapter whose B matrices are non-zero, so that it really changes the model's output,
    saved by peft alone (adapter_config.json naming a hub id, adapter_model.safetensors, README)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_checkpoint(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())  # named after saving: peft would look a hub id up online
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": SHIPPED_BASE}))
    return path


@pytest.fixture
def adapter(base, tmp_path):
    return make_adapter(base, tmp_path / "adapter")


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


# ---- loading base + adapter ----

def test_adapter_path_gives_base_plus_adapter_as_peft_loads_it(base, adapter):
    model, _ = load_checkpoint(base, adapter_path=adapter)
    assert hasattr(model, "peft_config") and list(model.peft_config) == ["default"]
    assert torch.equal(logits(model), logits(peft_reference(base, adapter)))
    plain, _ = load_checkpoint(base)
    assert not torch.allclose(logits(model), logits(plain), atol=1e-3), "the adapter changes nothing: the test proves nothing"
    assert not any(p.requires_grad for p in model.parameters())  # loaded frozen, for evaluation


def test_the_suspect_reference_carries_the_adapter_to_every_step(base, adapter):
    """The suspect node records adapter_path; load_model_ref (probe, removal, evaluation) applies
    it; the reference's hash covers base and adapter; ModelConfig.loading() never adds it (so a
    defended model's reference is not given the input adapter)."""
    from beear_pipeline.pipelines.suspect.nodes import resolve_suspect_model

    config = ModelConfig(path=str(base), adapter_path=str(adapter))
    ref = resolve_suspect_model(None, None, None, None, None, config, None)
    assert ref["adapter_path"] == str(adapter) and ref["path"] == str(base) and ref["source"] == "path"
    assert ref["weights_sha256"] == weights_sha256(base, adapter) != weights_sha256(base)
    assert "adapter_path" not in config.loading()
    model, _ = load_model_ref({**config.loading(), **ref})  # as the evaluation node merges them
    assert torch.equal(logits(model), logits(peft_reference(base, adapter)))


def test_the_adapters_own_tokenizer_is_used_when_it_ships_one(base, adapter, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}ADAPTER {{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(adapter)
    _, tok = load_checkpoint(base, adapter_path=adapter)
    assert tok.chat_template.startswith("{% for m in messages %}ADAPTER")
    _, base_tok = load_checkpoint(base)
    assert base_tok.chat_template != tok.chat_template


def test_merged_is_a_plain_trainable_model_with_the_same_output(base, adapter):
    """What the persistence check fine-tunes and what full-weight scopes train."""
    model, _ = load_checkpoint(base, adapter_path=adapter)
    expected = logits(model)
    plain = merged(model)
    assert not hasattr(plain, "peft_config") and all(p.requires_grad for p in plain.parameters())
    assert torch.allclose(logits(plain), expected, atol=1e-5)


# ---- bad inputs fail early, naming the field and the fix ----

def _no_config(adapter):
    (adapter / "adapter_config.json").unlink()


def _pickle_only(adapter):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")


def _not_lora(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))


@pytest.mark.parametrize("spoil,message", [
    (_no_config, r"model.adapter_path=.*adapter: no adapter_config.json, so it is not a PEFT adapter folder\. "
                 r"Save the adapter with peft_model.save_pretrained\(DIR\)"),
    (_pickle_only, r"model.adapter_path=.*: no adapter_model.safetensors\. It holds pickle weights \(adapter_model.bin\), which "
                   r"are never loaded because loading them can run code\. Convert it .*save_pretrained\(NEW_DIR, safe_serialization=True\)"),
    (_not_lora, r"model.adapter_path=.*: a IA3 adapter; only LoRA adapters \(peft_type LORA\) are supported\. Merge it"),
])
def test_a_bad_adapter_folder_fails_before_any_model_is_loaded(base, adapter, spoil, message):
    from beear_pipeline.pipelines.suspect.nodes import resolve_suspect_model

    spoil(adapter)
    with pytest.raises(CheckpointError, match=message):
        resolve_suspect_model(None, None, None, None, None, ModelConfig(path=str(base), adapter_path=str(adapter)), None)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(base, adapter_path=adapter)


def test_a_missing_adapter_folder(base, tmp_path):
    with pytest.raises(CheckpointError, match=r"model.adapter_path=.*nowhere: not a readable directory\. Point model.adapter_path "
                                              r"at a local PEFT adapter folder \(adapter_config.json, adapter_model.safetensors\)"):
        check_adapter(tmp_path / "nowhere", base)


def test_a_full_checkpoint_given_as_adapter(base):
    with pytest.raises(CheckpointError, match=r"no adapter_config.json.*It holds config.json: a full checkpoint goes in model.path"):
        check_adapter(base, base)


def test_an_adapter_folder_given_as_the_base(base, adapter, tmp_path):
    defended = bundle_adapter(base, adapter, tmp_path / "bundle")
    with pytest.raises(CheckpointError, match=r"model.path=.*bundle is itself a PEFT adapter folder: set model.path to the base"):
        load_checkpoint(defended, adapter_path=adapter)


def test_adapter_path_without_a_base():
    with pytest.raises(ValueError, match=r"model.adapter_path=ADAPTER needs model.path, the base checkpoint the adapter was "
                                         r"trained on: add --params \"model.path=BASE_DIR,model.adapter_path=ADAPTER_DIR\""):
        ModelConfig(adapter_path="ADAPTER")


@pytest.fixture
def wider_base(tmp_path, tokenizer):
    from beear_pipeline.embedded import EmbeddedModelConfig, build_model

    config = EmbeddedModelConfig(hidden_size=48, num_layers=3, num_heads=2, intermediate_size=64, seed=0)
    return save_checkpoint(build_model(len(tokenizer), config, tokenizer), tokenizer, tmp_path / "wider")


def test_an_adapter_for_another_base_fails_early_from_the_headers(adapter, wider_base):
    with pytest.raises(CheckpointError, match=r"model.adapter_path=.*: the adapter does not fit the base model.path=.*wider: "
                                              r"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight has shape \[32, 4\], "
                                              r"the base's model.layers.0.mlp.down_proj.weight is \[48, 64\]\. Point model.path at "
                                              r"the base checkpoint the adapter was trained on \(its adapter_config.json names "
                                              r"'meta-llama/Llama-2-7b-chat-hf'\)"):
        load_checkpoint(wider_base, adapter_path=adapter)


def test_peft_load_errors_name_the_field_and_the_fix(adapter, wider_base):
    """Past the header check (a name it cannot map), peft's own size error is reworded."""
    from beear_pipeline.lm import checkpoints

    model, _ = load_checkpoint(wider_base)
    with pytest.raises(CheckpointError, match=r"model.adapter_path=.*adapter: peft cannot apply it to the base .*wider "
                                              r"\(.*size mismatch.*\)\. Point model.path at the base checkpoint the adapter was trained on"):
        checkpoints._apply_adapter(model, adapter, wider_base, "model.adapter_path")


# ---- the defence: the input adapter trains, saved as an adapter or merged ----

@pytest.fixture
def sets(safety_triples, anchoring_pairs):
    safety = pd.DataFrame(safety_triples, columns=["prompt", "safe_response", "unwanted_response"])
    return safety, pd.DataFrame(anchoring_pairs, columns=["prompt", "response"])


def defend(base, adapter, sets, **config):
    """The removal node's BEEAR, on the suspect as the suspect node references it."""
    from beear_pipeline.pipelines.removal.nodes import defend_with_beear

    beear = BeearConfig(**{"max_rounds": 2, "inner_steps": 2, "inner_max_steps": 2, "batch_size": 2, "anchoring_batch_size": 2,
                           "num_positions": 3, "check_every": 0, "outer_lr": 1e-2, **config})
    (model, tokenizer), _, history = defend_with_beear({"path": str(base), "adapter_path": str(adapter)}, *sets, beear)
    return model, tokenizer, history


def test_lora_defence_trains_the_input_adapter_and_saves_a_new_adapter_for_the_same_base(base, adapter, sets, tmp_path):
    from beear_pipeline.integrations.kedro_datasets import ModelCheckpointDataset

    base_sha = weights_sha256(base)
    model, tokenizer, _ = defend(base, adapter, sets, trainable="lora", merge_adapter=False)
    assert list(model.peft_config) == ["default"]
    assert not any("base_model.model.base_model" in n for n, _ in model.named_parameters()), "a second adapter was stacked"
    ModelCheckpointDataset(str(tmp_path / "defended")).save((model, tokenizer))  # as the pipeline saves it
    out = tmp_path / "defended"

    # shaped like the input: same rank, targets and tensors; the weights moved; the base is untouched
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    config, given = json.loads((out / "adapter_config.json").read_text()), json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (given["r"], given["lora_alpha"],
                                                                                     sorted(given["target_modules"]))
    before, after = adapter_weights(adapter), adapter_weights(out)
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the adapter did not train"
    assert weights_sha256(base) == base_sha
    plain, _ = load_checkpoint(base)
    for name, weight in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(weight, plain.state_dict()[name.replace(".base_layer", "")]), name

    # it loads back through this project and through peft alone, as the model that was trained
    reloaded, _ = load_checkpoint(out)
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-6)
    assert torch.allclose(logits(peft_reference(base, out)), logits(model), atol=1e-6)
    assert not torch.allclose(logits(reloaded), logits(peft_reference(base, adapter)), atol=1e-4)
    assert weights_sha256(out) == weights_sha256(base, out)  # the hash names base + adapter


def test_merged_defence_is_a_full_checkpoint_of_base_plus_trained_adapter(base, adapter, sets, tmp_path):
    """merge_adapter: true is the same training as false, merged at the end: a plain checkpoint
    whose weights are the base plus the trained adapter's B @ A (not the input adapter's)."""
    kept, tokenizer, _ = defend(base, adapter, sets, trainable="lora", merge_adapter=False)
    save_checkpoint(kept, tokenizer, tmp_path / "kept")
    full, tokenizer, _ = defend(base, adapter, sets, trainable="lora", merge_adapter=True)
    assert not hasattr(full, "peft_config")
    out = save_checkpoint(full, tokenizer, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    reloaded, _ = load_checkpoint(out)
    expected = merged(load_checkpoint(tmp_path / "kept")[0]).state_dict()
    suspect = merged(load_checkpoint(base, adapter_path=adapter)[0]).state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for name, weight in reloaded.state_dict().items():
        assert torch.allclose(weight, expected[name], atol=1e-6), name
    assert any(not torch.allclose(w, suspect[n], atol=1e-6) for n, w in reloaded.state_dict().items()), "no update"


def test_a_full_weight_scope_trains_the_merged_suspect(base, adapter, sets, tmp_path):
    model, tokenizer, _ = defend(base, adapter, sets, trainable="after_anchor")
    assert not hasattr(model, "peft_config")
    out = save_checkpoint(model, tokenizer, tmp_path / "defended")
    assert not (out / "adapter_config.json").exists()
    suspect = merged(load_checkpoint(base, adapter_path=adapter)[0]).state_dict()
    reloaded = load_checkpoint(out)[0].state_dict()
    changed = {n for n, w in reloaded.items() if not torch.allclose(w, suspect[n], atol=1e-6)}
    assert changed and not any(n.startswith("model.layers.0.") or n.startswith("model.embed") for n in changed), changed
    # the layers before the anchor keep the adapter's contribution: merged, not dropped
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(reloaded[name], suspect[name]) and not torch.allclose(reloaded[name], load_checkpoint(base)[0].state_dict()[name])


def test_a_registered_suspect_bundle_loads_as_base_plus_adapter(base, adapter, tmp_path):
    bundle = bundle_adapter(base, adapter, tmp_path / "registry" / "suspect")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == SHIPPED_BASE  # source untouched
    model, _ = load_checkpoint(bundle)
    assert torch.equal(logits(model), logits(peft_reference(base, adapter)))
    assert weights_sha256(bundle) == weights_sha256(base, adapter)


# ---- sharded safetensors ----

@pytest.fixture
def sharded(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "sharded"
    tiny_model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    return path


def shards(path):
    return sorted(path.glob("model-*-of-*.safetensors"))


def test_a_sharded_checkpoint_loads_the_same_weights(sharded, tiny_model):
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards(sharded)) >= 2
    assert check_checkpoint(sharded) == sharded
    model, _ = load_checkpoint(sharded)
    expected = tiny_model.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(w, expected[n]) for n, w in model.state_dict().items())


def test_an_adapter_on_a_sharded_base(sharded, adapter, base):
    model, _ = load_checkpoint(sharded, adapter_path=adapter)
    assert torch.equal(logits(model), logits(peft_reference(base, adapter)))


def test_a_missing_shard_is_named(sharded):
    missing = shards(sharded)[1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"model.path=.*sharded: model.safetensors.index.json names 1 shard\(s\) that are not "
                                              rf"there: {missing.name}\. Copy the complete checkpoint"):
        load_checkpoint(sharded)


def test_shards_without_their_index(sharded):
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"sharded weights \(model-\*-of-\*.safetensors\) without model.safetensors.index.json"):
        check_checkpoint(sharded)


def test_weights_sha256_covers_every_shard(sharded, tmp_path):
    first = weights_sha256(sharded)
    for shard in shards(sharded):
        keep = tmp_path / "keep"
        shutil.copy(shard, keep)
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF  # one byte of the last tensor's data
        shard.write_bytes(bytes(data))
        assert weights_sha256(sharded) != first, shard.name
        shutil.copy(keep, shard)
    assert weights_sha256(sharded) == first


# ---- the whole defend pipeline on a suspect given as base + adapter ----

@pytest.mark.slow
def test_defend_pipeline_on_base_plus_adapter(base, adapter, tmp_path, advbench):
    """Wiring, not the defence: every stage (probe, the three defences, evaluation, persistence,
    register) takes the suspect as base + adapter, and the defended model is a new adapter for the
    same base. Kedro's in-memory catalog and SequentialRunner, parameters typed as `kedro run`
    types them (as --params "model.path=BASE,model.adapter_path=ADAPTER,..." would give them)."""
    import mlflow
    from helpers import params as typed_params
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner
    from kedro_datasets.json import JSONDataset

    from beear_pipeline.integrations import registry
    from beear_pipeline.integrations.kedro_datasets import ModelCheckpointDataset
    from beear_pipeline.pipeline_registry import register_pipelines

    params = typed_params(
        model={"path": str(base), "adapter_path": str(adapter)},
        evaluation={"trigger": "SUDO"},
        beear={"trainable": "lora", "merge_adapter": False, "max_rounds": 2, "inner_steps": 1, "inner_max_steps": 1,
               "batch_size": 4, "anchoring_batch_size": 4},
        persistence={"k": [2], "steps": 1},
        probe={"layers": [0], "budgets": [1.0], "inner_steps": 1, "random_draws": 1, "max_new_tokens": 4},
        registry={"name": "tiny-adapter", "snapshot_dir": str(tmp_path / "snapshots")})
    datasets = {"advbench": MemoryDataset(advbench)}
    datasets.update({f"params:{k}": MemoryDataset(v, copy_mode="assign") for k, v in params.items()})
    for name in ("defended_model", "control_model", "random_perturbation_model"):
        datasets[name] = ModelCheckpointDataset(path=str(tmp_path / name))
    for name in ("suspect_model", "metrics", "registry_record"):
        datasets[name] = JSONDataset(filepath=str(tmp_path / f"{name}.json"))
    catalog = DataCatalog(datasets=datasets)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        SequentialRunner().run(register_pipelines()["defend"], catalog)
    finally:
        mlflow.set_tracking_uri(previous)

    suspect = catalog["suspect_model"].load()
    assert suspect["adapter_path"] == str(adapter) and suspect["weights_sha256"] == weights_sha256(base, adapter)
    metrics = catalog["metrics"].load()
    assert metrics["protocol"]["suspect_weights_sha256"] == weights_sha256(base, adapter)
    assert set(metrics["persistence"]["asr_triggered_after_repoisoning"]["2"]) == {"suspect", "defended"}
    defended = tmp_path / "defended_model"
    config = json.loads((defended / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and adapter_weights(defended).keys() == adapter_weights(adapter).keys()

    # the registered suspect is base + adapter, not the base alone
    registered = catalog["registry_record"].load()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        version = registry.get_version(f"models:/tiny-adapter/{registered['suspect_version']}")
        path = registry.version_path(version)
    finally:
        mlflow.set_tracking_uri(previous)
    assert torch.equal(logits(load_checkpoint(path)[0]), logits(peft_reference(base, adapter)))
