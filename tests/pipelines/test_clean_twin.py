"""The clean twin's resolution: a user's reference checkpoint, checked like the suspect, or a
stated reason why there is none."""

import pytest

from beear_pipeline.embedded import EmbeddedModelConfig
from beear_pipeline.lm.checkpoints import CheckpointError, ModelConfig, save_checkpoint
from beear_pipeline.pipelines.suspect.nodes import resolve_clean_twin

FRAMES = dict(attacker_behaviours=None, benign_build_set=None, advbench=None, benign_evaluation_set=None, anchoring_set=None)


def test_users_model_without_reference_has_no_twin_and_says_how_to_get_one(tmp_path):
    twin = resolve_clean_twin(**FRAMES, model=ModelConfig(path=str(tmp_path)), embedded_model=EmbeddedModelConfig())
    assert twin["path"] is None and "model.reference_path" in twin["reason"]


def test_users_reference_checkpoint_is_checked_and_becomes_the_twin(tmp_path, tiny_model, tokenizer):
    reference = save_checkpoint(tiny_model, tokenizer, tmp_path / "clean")
    model = ModelConfig(path=str(tmp_path / "suspect"), reference_path=str(reference), dtype="float32")
    twin = resolve_clean_twin(**FRAMES, model=model, embedded_model=EmbeddedModelConfig())
    assert twin["path"] == str(reference) and twin["source"] == "reference_path" and len(twin["weights_sha256"]) == 64
    assert twin["dtype"] == "float32"  # loaded the way the suspect is


def test_a_bad_reference_fails_naming_the_field(tmp_path):
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model.reference_path"):
        resolve_clean_twin(**FRAMES, model=ModelConfig(path=str(tmp_path), reference_path=str(tmp_path / "clean")),
                           embedded_model=EmbeddedModelConfig())


@pytest.mark.parametrize("model, embedded, reason", [
    (ModelConfig(clean_twin=False), EmbeddedModelConfig(), "model.clean_twin"),
    (ModelConfig(), EmbeddedModelConfig(poisoned=False), "embedded_model.poisoned"),
])
def test_embedded_twin_can_be_switched_off(model, embedded, reason):
    twin = resolve_clean_twin(**FRAMES, model=model, embedded_model=embedded)
    assert twin["path"] is None and reason in twin["reason"]
