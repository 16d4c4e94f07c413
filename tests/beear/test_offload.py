"""A model spread by a ``device_map`` (here: layers offloaded to disk, which accelerate serves
through dispatch hooks on each layer) runs BEEAR's inner level and then generates exactly as the
same model held whole in memory, and keeps its hooks."""

from __future__ import annotations

import dataclasses

import torch

from beear_pipeline.beear import BeearConfig, find_perturbation
from beear_pipeline.lm.checkpoints import save_checkpoint
from beear_pipeline.lm.generation import generate
from beear_pipeline.lm.residual import decoder_layers


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, local_files_only=True, **kwargs).eval()


def test_offloaded_model_keeps_its_hooks_and_matches_the_whole_model(tiny_model, tokenizer, safety_triples, tmp_path):
    tiny_model.config.tie_word_embeddings = False
    tokenizer.chat_template = tokenizer.chat_template or "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_checkpoint(tiny_model, tokenizer, tmp_path / "model")
    whole = _load(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = _load(tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    layers = decoder_layers(offloaded)
    assert all(hasattr(layer, "_hf_hook") and "forward" in layer.__dict__ for layer in layers[1:]), "accelerate did not dispatch"

    calls = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))

    # the inner level with activation reuse up to layer 1 (an offloaded layer), several steps
    config = BeearConfig(anchor_layer=1, batch_size=3, inner_steps=4, inner_max_steps=4, check_every=0, num_positions=3)
    found = {name: find_perturbation(m, tokenizer, safety_triples, dataclasses.replace(config)) for name, m in
             (("whole", whole), ("offloaded", offloaded))}
    assert found["offloaded"]["inner_steps"] == found["whole"]["inner_steps"] >= 4
    assert torch.allclose(found["offloaded"]["perturbation"], found["whole"]["perturbation"], atol=1e-5)
    assert found["offloaded"]["unwanted_loss"] == torch.tensor(found["whole"]["unwanted_loss"]).item()

    # after it, the dispatch hooks are still the layers' forward: a generation runs through them
    assert all(hasattr(layer, "_hf_hook") and "forward" in layer.__dict__ for layer in layers[1:])
    calls.clear()
    prompts = [p for p, _, _ in safety_triples]
    answers = {name: generate(m, tokenizer, prompts, max_new_tokens=6) for name, m in (("whole", whole), ("offloaded", offloaded))}
    assert answers["offloaded"] == answers["whole"]
    assert sum(1 for c in calls if c is layers[2]) >= 6  # the last layer ran at every decoding step
