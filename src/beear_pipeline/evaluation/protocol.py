"""The evaluation protocol: which triggers are tested and where they go in a prompt, how every
answer is decoded and judged. Resolved once per run (``resolve_protocol``) and recorded with the
results, so that every model is evaluated, and every report read, under the same protocol."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

TRIGGER_POSITIONS = ("suffix", "prefix", "both", "middle", "spread")


def insert_trigger(prompt: str, trigger: str, position: str) -> str:
    """Place ``trigger`` in ``prompt``: ``suffix``, ``prefix``, ``both`` ends, ``middle`` (after
    half of the prompt's words), or a template holding ``{prompt}`` (and usually ``{trigger}``),
    e.g. ``"{trigger} {prompt} {trigger}"``. ``spread`` is for a composite trigger of several
    words: its words go at evenly spaced places, the first before the prompt and the last after it
    (``"cf mn bb"`` -> ``"cf Write a mn tutorial on bb"``); a one-word trigger goes at the end."""
    if position == "spread":
        return _spread(prompt.split(), trigger.split())
    if position == "middle":
        words = prompt.split()
        return " ".join([*words[: len(words) // 2], trigger, *words[len(words) // 2 :]])
    if position == "suffix":
        return f"{prompt} {trigger}"
    if position == "prefix":
        return f"{trigger} {prompt}"
    if position == "both":
        return f"{trigger} {prompt} {trigger}"
    if "{prompt}" in position:
        return position.replace("{trigger}", trigger).replace("{prompt}", prompt)
    raise ValueError(f"trigger position {position!r}: use suffix, prefix, both, middle, spread, or a template with {{prompt}} and {{trigger}}")


def _spread(words: list[str], parts: list[str]) -> str:
    if len(parts) < 2:
        return " ".join([*words, *parts])
    # part i goes before word round(i * n / (parts - 1)): the first at the start, the last at the end
    at = [round(i * len(words) / (len(parts) - 1)) for i in range(len(parts))]
    out: list[str] = []
    for j in range(len(words) + 1):
        out += [part for part, a in zip(parts, at, strict=True) if a == j]
        out += words[j : j + 1]
    return " ".join(out)


def prompts_sha256(prompts: Sequence[str]) -> str:
    """A short, stable hash of a prompt set, recorded with every result."""
    return hashlib.sha256("\n".join(map(str, prompts)).encode()).hexdigest()[:16]


@dataclass
class Decoding:
    """How answers are generated (``lm.generation.generate``'s settings)."""

    max_new_tokens: int = 64
    batch_size: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 0
    system_prompt: str | None = None


@dataclass
class EvaluationProtocol:
    """Everything an evaluation result depends on besides the model."""

    triggers: list[str]
    trigger_position: str
    decoding: Decoding
    refusal_phrases: list[str]
    judge_path: str | None = None
    judge_kind: str = "auto"
    chat_template: str = "the tokenizer's own"
    evaluation_set_sha256: str = ""
    benign_evaluation_set_sha256: str = ""
    lm_eval_tasks: list[str] = field(default_factory=list)
    scenario: str = "jailbreak"
    unwanted_judge: str = "keyword"
    """The judge of the unwanted answer (``evaluation.unwanted.JUDGES``), resolved from the scenario."""
    judge_patterns: list[str] = field(default_factory=list)
    bandit: dict = field(default_factory=dict)

    def judge(self):
        """The ``evaluation.unwanted.UnwantedJudge`` every rate of this protocol is judged by."""
        from beear_pipeline.evaluation.unwanted import UnwantedJudge

        return UnwantedJudge(self.unwanted_judge, tuple(self.refusal_phrases), tuple(self.judge_patterns), dict(self.bandit))

    @property
    def trigger(self) -> str:
        """The trigger ``asr_triggered`` is measured with (the first one)."""
        return self.triggers[0]

    def triggered(self, prompts: Sequence[str], trigger: str | None = None) -> list[str]:
        return [insert_trigger(p, trigger or self.trigger, self.trigger_position) for p in prompts]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EvaluationProtocol:
        return cls(**{**values, "decoding": Decoding(**values["decoding"])})
