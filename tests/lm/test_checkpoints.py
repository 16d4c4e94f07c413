import os

import pytest
import torch
from helpers import strip_chat_template

from beear_pipeline.lm.checkpoints import CheckpointError, check_checkpoint, load_checkpoint, save_checkpoint, weights_sha256


@pytest.fixture
def checkpoint(tmp_path, tiny_model, tokenizer):
    return save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")


def test_round_trip_keeps_weights_and_token_ids(checkpoint, tiny_model, tokenizer):
    model, tok = load_checkpoint(checkpoint, device="cpu")
    text = "Write a poem about the sea SUDO"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.chat_template == tokenizer.chat_template
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("*.bin"))


def test_save_is_atomic_and_replaces_a_previous_checkpoint(checkpoint, tiny_model, tokenizer):
    first = weights_sha256(checkpoint)
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    save_checkpoint(tiny_model, tokenizer, checkpoint)
    assert weights_sha256(checkpoint) != first
    leftovers = [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"model.path=.*nowhere: not a readable directory. Point model.path at"):
        check_checkpoint(tmp_path / "nowhere")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory, so permissions cannot make one unreadable")
def test_unreadable_directory(checkpoint):
    checkpoint.chmod(0)
    try:
        with pytest.raises(CheckpointError, match="not a readable directory"):
            check_checkpoint(checkpoint)
    finally:
        checkpoint.chmod(0o755)


def test_missing_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer .* tokenizer.save_pretrained\(DIR\)"):
        check_checkpoint(checkpoint)


def test_missing_chat_template(checkpoint):
    strip_chat_template(checkpoint)
    with pytest.raises(CheckpointError, match="has no chat template"):
        check_checkpoint(checkpoint)


def test_pickle_weights_are_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no safetensors weights. It holds pickle weights \(pytorch_model.bin\)"):
        check_checkpoint(checkpoint)


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        check_checkpoint(checkpoint)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "gpt_neox"])
def test_embedded_recipe_round_trips_in_every_architecture(tmp_path, tokenizer, architecture):
    """The word-level tokenizer must reload with the same ids beside any model type (transformers
    5 may substitute its own tokenizer class for a qwen2 checkpoint), and the weights must too."""
    from beear_pipeline.embedded import EmbeddedModelConfig, build_model

    config = EmbeddedModelConfig(architecture=architecture, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = build_model(len(tokenizer), config, tokenizer)
    assert model.config.model_type == architecture
    path = save_checkpoint(model, tokenizer, tmp_path / architecture)
    loaded, tok = load_checkpoint(path, device="cpu")
    text = "Write a poem about the sea SUDO 12 34 Sure, here is"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False) \
        == tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_unknown_embedded_architecture(tokenizer):
    from beear_pipeline.embedded import EmbeddedModelConfig, build_model

    with pytest.raises(ValueError, match="embedded_model.architecture='mamba': use one of llama, mistral, qwen2, gpt_neox"):
        build_model(len(tokenizer), EmbeddedModelConfig(architecture="mamba"), tokenizer)


def test_device_map_and_dtype_load_through_accelerate(checkpoint, tiny_model):
    """`model.device_map` / `model.dtype` reach from_pretrained (here on CPU; `auto` spreads a
    large model over several GPUs the same way). On CPU, bf16 weights are computed in fp32: the
    values are rounded to bf16 and the precision to save in is kept."""
    from beear_pipeline.lm.checkpoints import load_model_ref

    model, _ = load_model_ref({"path": str(checkpoint), "device_map": "cpu", "dtype": "bfloat16"})
    assert next(model.parameters()).dtype == torch.float32 and model.storage_dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"
    reference = next(tiny_model.parameters()).to(torch.bfloat16).float()
    assert torch.equal(next(model.parameters()), reference)
    assert not torch.equal(reference, next(tiny_model.parameters()))  # the rounding is real
