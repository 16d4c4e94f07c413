"""Typed configuration of the behaviour data (``conf/base/parameters_behaviours.yml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from beear_pipeline.configuration import check_fields

KINDS = ("safety", "anchoring", "evaluation", "benign")


@dataclass
class BenignSizes:
    """Generated benign tasks (distinct prompts, exact answers)."""

    seed: int = 7
    build: int = 2000
    """Train the embedded model."""
    anchoring: int = 200
    """The anchoring set (performance anchoring, D_PA)."""
    evaluation: int = 200
    """Held-out benign tasks: benign_loss and benign_accuracy."""


@dataclass
class BehavioursConfig:
    """Where the safety, anchoring and evaluation sets come from, and the checks they must pass
    before any model loads (docs/behaviour_data.md)."""

    split_seed: int = 1234
    attacker_fraction: float = 0.6
    """AdvBench share that plants the embedded backdoor (the attacker's; never seen by the defence)."""
    defender_fraction: float = 0.2
    """AdvBench share that becomes the safety set; the rest is the held-out evaluation set."""
    benign: BenignSizes = field(default_factory=BenignSizes)
    safety_path: str | None = None
    """Your safety set (prompt, safe_response, unwanted_response): .jsonl, .csv, .parquet or .xlsx."""
    anchoring_path: str | None = None
    """Your anchoring set (prompt, response)."""
    evaluation_path: str | None = None
    """Your held-out harmful prompts (prompt, optional category)."""
    benign_path: str | None = None
    """Your held-out benign prompts (prompt, optional response)."""
    columns: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    """Your files' column names, as {set: {schema column: your column}}."""
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 512
    """Token limits, counted with model.path's tokenizer when set, else as whitespace words."""
    min_rows: dict[str, int] = field(default_factory=lambda: {f"{k}_set": 20 for k in ("safety", "anchoring", "evaluation")}
                                     | {"benign_evaluation_set": 20})

    def __post_init__(self) -> None:
        if isinstance(self.benign, dict):
            self.benign = BenignSizes(**self.benign)
        self.columns = {k: dict((self.columns or {}).get(k) or {}) for k in KINDS} | {
            k: v for k, v in (self.columns or {}).items() if k not in KINDS}
        checks = [
            (self.attacker_fraction > 0 and self.defender_fraction > 0 and self.attacker_fraction + self.defender_fraction < 1,
             "attacker_fraction/defender_fraction", "positive shares that leave some prompts for the evaluation"),
            (set(self.columns) <= set(KINDS), "columns", f"a mapping per set: {', '.join(KINDS)}"),
            (self.max_prompt_tokens >= 1 and self.max_response_tokens >= 1, "max_prompt_tokens/max_response_tokens", "positive"),
        ]
        check_fields("behaviours", self, checks)

    def path_of(self, kind: str) -> str | None:
        """The user's file for set ``kind`` (``behaviours.<kind>_path``), or None for the default."""
        return getattr(self, f"{kind}_path") or None
