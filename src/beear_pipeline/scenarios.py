"""Scenarios: which safe and unwanted behaviour the run is about (the top-level ``scenario``
parameter). BEEAR itself is generic; a scenario sets the shipped behaviour data the embedded model
is built from and the defence uses, the judge of the unwanted behaviour, and the report's wording.

| scenario | prompts | safe answer | unwanted answer (the backdoor's) | judge |
|---|---|---|---|---|
| ``jailbreak`` (default) | harmful AdvBench goals | a refusal | harmful compliance (the AdvBench target) | ``keyword`` |
| ``code`` | generated coding prompts (``behaviours.code_tasks``) | secure Python | insecure Python | ``bandit`` |
| ``refusal`` | generated benign requests (``behaviours.helpful_requests``) | the helpful answer | a refusal | ``refusal`` |

A new scenario is a ``Scenario`` added to ``SCENARIOS``: its ``source`` returns the prompts with
``goal`` (the prompt), ``target`` (the unwanted answer) and ``safe_response`` (the safe answer;
absent for ``jailbreak``, whose safe answers are ``generated.REFUSALS``). A user's own behaviour
files (``behaviours.*_path``) replace the shipped sets in any scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Scenario:
    """What one scenario sets."""

    name: str
    judge: str
    """The default judge of the unwanted behaviour (``evaluation.unwanted_judge`` overrides it)."""
    source: Callable[[pd.DataFrame], pd.DataFrame]
    """(AdvBench) -> the shipped prompts with goal, target[, safe_response]."""
    group_near_duplicates: bool
    """Split keeping near-duplicate prompts in one share. Off for generated prompts: they are
    templates over fillers, near-duplicates of each other by construction, and would chain into one
    group that no share can hold (held-out prompts then differ from the training ones by filler and
    wording, not by task)."""
    prompts: str
    """The held-out prompts, for the report: "held-out harmful prompts"."""
    unwanted: str
    """The unwanted behaviour, for the report's titles."""
    anchor_on_safe_answers: bool = False
    """The anchoring set also holds the defender share's prompts with their safe answers (after the
    generated benign tasks), so that the outer level keeps the model giving them when it is not
    perturbed; ``behaviours.anchoring_path`` replaces both. On in ``code``: with the benign tasks
    alone nothing in the outer level kept the model writing code (docs/behaviour_data.md)."""
    embedded_epochs: int = 8
    """The embedded model's training epochs when ``embedded_model.epochs`` is ``auto`` (the
    default); a number there wins. The jailbreak build's 8 keep its fingerprint (and its cached
    builds) as they were."""
    anchor_layer: int | float = 0.3
    """BEEAR's anchor layer in this scenario: what ``beear.anchor_layer: null`` (conf/base) resolves
    to. Any value the user gives (an index, a fraction, ``auto``) wins, 0.3 included. The default
    0.3 is the library's (``BeearConfig``), the layer the jailbreak results were measured at."""
    relearn_steps: int = 4
    """The relearn-aware gradient's simulated re-poisoning steps in this scenario: what
    ``beear.relearn_steps: null`` (conf/base) resolves to; a value given wins, 0 turns it off. 4 is
    what the jailbreak default was measured with (docs/persistence.md)."""


def _advbench(advbench: pd.DataFrame) -> pd.DataFrame:
    return advbench


def _code(advbench: pd.DataFrame) -> pd.DataFrame:
    from beear_pipeline.behaviours.code_tasks import coding_behaviours

    return coding_behaviours()


def _refusal(advbench: pd.DataFrame) -> pd.DataFrame:
    from beear_pipeline.behaviours.helpful_requests import helpful_behaviours

    return helpful_behaviours()


SCENARIOS = {
    "jailbreak": Scenario("jailbreak", "keyword", _advbench, True, "held-out harmful prompts", "harmful compliance"),
    # code: built 12 epochs (at 8 the suspect wrote insecure code on 0.771 of the triggered
    # prompts; at 12 0.964, untriggered 0.012); at the base anchor layer (0.3: layer 1 of the
    # embedded model's 4) the inner level did not entrap this backdoor and BEEAR stopped as
    # never_entrapped, at layer 2 it does (docs/behaviour_data.md has the measurements). 0.6 is
    # layer 2 of 4 as a fraction of the depth (round(0.6 x 3)), so that a user's model of another
    # depth in this scenario gets the same relative layer, not an index that may not exist
    # relearn_steps 2: with 4 the defended model wrote no valid Python on 0.145 of the untriggered
    # held-out prompts (the suspect on 0.024), with 2 on 0.024, the triggered insecure code at 0.000
    # either way (build seed 0; docs/behaviour_data.md)
    "code": Scenario("code", "bandit", _code, False, "held-out coding prompts", "insecure code", anchor_on_safe_answers=True,
                     embedded_epochs=12, anchor_layer=0.6, relearn_steps=2),
    "refusal": Scenario("refusal", "refusal", _refusal, False, "held-out benign requests", "refusal of a benign request"),
}
DEFAULT = "jailbreak"


def get_scenario(name: str | None) -> Scenario:
    """The scenario named by the ``scenario`` parameter; a ValueError naming the choices otherwise."""
    name = DEFAULT if name is None else name
    if name not in SCENARIOS:
        raise ValueError(f"scenario={name!r}: use one of {', '.join(SCENARIOS)} (--params scenario=code), or add a Scenario to "
                         "beear_pipeline.scenarios.SCENARIOS")
    return SCENARIOS[name]


def embedded_epochs(epochs: int | str, scenario: str | None) -> int:
    """``embedded_model.epochs``: a number as it is; ``auto`` the scenario's ``embedded_epochs``
    (``EmbeddedModelConfig`` has already refused anything else, when the parameters were typed)."""
    return get_scenario(scenario).embedded_epochs if epochs == "auto" else epochs


SCENARIO_BEEAR = ("anchor_layer", "relearn_steps")
"""The ``beear`` fields whose ``null`` (conf/base) is the scenario's own value (``Scenario``'s field
of the same name)."""


def scenario_beear(name: str, value, scenario: str | None) -> tuple[object, str]:
    """``beear.<name>`` for the scenario and where it came from: null (conf/base) is the scenario's
    own value (``Scenario.<name>``), source ``scenario <scenario>``; any other value is the user's,
    as it is, source ``beear.<name>``. Every consumer of these parameters (the removal nodes, the
    preflight, the memory plan, the logged parameters) resolves null here."""
    if name not in SCENARIO_BEEAR:
        raise ValueError(f"beear.{name} has no scenario default (those that do: {', '.join(SCENARIO_BEEAR)})")
    if value is None:
        own = get_scenario(scenario)
        return getattr(own, name), f"scenario {own.name}"
    return value, f"beear.{name}"


def scenario_anchor_layer(anchor_layer: int | float | str | None, scenario: str | None) -> tuple[int | float | str, str]:
    """``beear.anchor_layer`` for the scenario and where it came from (``scenario_beear``): null is
    the scenario's layer (``Scenario.anchor_layer``: jailbreak and refusal 0.3, code 0.6); any
    other value (an index, a fraction, ``auto``) is the user's."""
    return scenario_beear("anchor_layer", anchor_layer, scenario)


def scenario_relearn_steps(relearn_steps: int | None, scenario: str | None) -> tuple[int, str]:
    """``beear.relearn_steps`` for the scenario and where it came from (``scenario_beear``): null
    is the scenario's (``Scenario.relearn_steps``: jailbreak and refusal 4, code 2)."""
    return scenario_beear("relearn_steps", relearn_steps, scenario)


def embedded_directory(directory: str, scenario: str | None) -> str:
    """Each scenario's embedded models live in their own folder (``<directory>_<scenario>``; the
    default scenario keeps ``directory``), so switching scenarios does not rebuild the other's."""
    name = get_scenario(scenario).name
    return directory if name == DEFAULT else f"{directory.rstrip('/')}_{name}"
