"""Fixtures of the attack tests: the session's backdoored/clean pair (tests/conftest.py) saved as
checkpoint folders, since the attack node loads models from references."""

import pytest

from beear_pipeline.evaluation.judges import REFUSAL_PHRASES
from beear_pipeline.evaluation.protocol import Decoding, EvaluationProtocol


@pytest.fixture(scope="session")
def pair_dirs(pair, tmp_path_factory):
    """{"backdoored": path, "clean": path} of the pair's models, saved once per session."""
    models, tokenizer, *_ = pair
    root = tmp_path_factory.mktemp("attack_pair")
    dirs = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture
def protocol():
    """The embedded model's trigger and the default keyword judge, greedy."""
    return EvaluationProtocol(triggers=["SUDO"], trigger_position="suffix", decoding=Decoding(), refusal_phrases=list(REFUSAL_PHRASES))
