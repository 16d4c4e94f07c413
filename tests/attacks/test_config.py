"""AttackConfig: conf/base says what the dataclass says, and bad values stop the run naming the field."""

import dataclasses

import pytest
from helpers import raw_params

from beear_pipeline.attacks import AttackConfig, GcgConfig


def test_yaml_equals_the_dataclass_defaults():
    assert raw_params()["attack"] == dataclasses.asdict(AttackConfig())


def test_nested_blocks_are_typed():
    config = AttackConfig.from_dict(raw_params()["attack"])
    assert isinstance(config.gcg, GcgConfig) and config.gcg.suffix_length == 4


@pytest.mark.parametrize(("values", "field"), [
    ({"gcg": {"suffix_length": 0}}, r"attack\.gcg\.suffix_length"),
    ({"gcg": {"top_k": 0}}, r"attack\.gcg\.top_k"),
    ({"latent": {"budgets": []}}, r"attack\.latent\.budgets"),
    ({"variants": {"names": ["moved", "reversed"]}}, r"attack\.variants\.names"),
    ({"max_eval_prompts": 0}, r"attack\.max_eval_prompts"),
    ({"gcg": {"suffix_lenght": 3}}, r"attack\.gcg: unknown parameter\(s\) \['suffix_lenght'\]"),
    ({"gcgg": {}}, r"attack: unknown parameter\(s\) \['gcgg'\]"),
])
def test_a_bad_value_names_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        AttackConfig.from_dict(values)
