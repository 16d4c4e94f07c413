"""Typed configuration of the behaviour data (``conf/base/parameters_behaviours.yml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from beear_pipeline.configuration import check_fields, from_mapping

KINDS = ("safety", "anchoring", "evaluation", "benign")
UNWANTED_ANSWERS = ("backdoor_targets", "reworded")
SAFE_ANSWERS = ("suspect_refusals", "other_refusals")


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
class NearDuplicates:
    """Near-duplicate prompts: token Jaccard over lower-cased word sets, punctuation folded
    (``behaviours.similarity``); a pair at or above ``threshold`` counts as one prompt reworded."""

    threshold: float = 0.5
    """Jaccard at or above which two prompts are near-duplicates (0 < threshold <= 1)."""
    split: bool = True
    """Group near-duplicate AdvBench goals (connected components) and keep each group in one share
    of the attacker/defender/evaluation split; false: the plain seeded shuffle (the split before
    issue 13, with near-duplicates across shares)."""
    fail: bool = False
    """Stop the run when an evaluation prompt has a near-duplicate in the safety or anchoring set;
    false: report it in behaviours_validation and warn in the log."""
    examples: int = 5
    """Worst pairs quoted in the report, the warning and the error."""


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
    near_duplicates: NearDuplicates = field(default_factory=NearDuplicates)
    unwanted_answers: str = "backdoor_targets"
    """The shipped safety set's unwanted answers: ``backdoor_targets`` (the AdvBench targets, the very
    outputs the embedded backdoor was planted with) or ``reworded`` (threat model a: a harmful
    compliance worded differently, built from the goal; ``generated.reworded_unwanted``)."""
    safe_answers: str = "suspect_refusals"
    """The shipped safety set's safe answers: ``suspect_refusals`` (``generated.REFUSALS``, which the
    embedded model was trained to give) or ``other_refusals`` (threat model b: refusals worded
    differently; ``generated.OTHER_REFUSALS``)."""
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
        if isinstance(self.near_duplicates, dict):
            self.near_duplicates = from_mapping(NearDuplicates, "behaviours.near_duplicates", self.near_duplicates)
        near = self.near_duplicates
        self.columns = {k: dict((self.columns or {}).get(k) or {}) for k in KINDS} | {
            k: v for k, v in (self.columns or {}).items() if k not in KINDS}
        checks = [
            (self.attacker_fraction > 0 and self.defender_fraction > 0 and self.attacker_fraction + self.defender_fraction < 1,
             "attacker_fraction/defender_fraction", "positive shares that leave some prompts for the evaluation"),
            (set(self.columns) <= set(KINDS), "columns", f"a mapping per set: {', '.join(KINDS)}"),
            (self.max_prompt_tokens >= 1 and self.max_response_tokens >= 1, "max_prompt_tokens/max_response_tokens", "positive"),
            (0 < near.threshold <= 1, "near_duplicates.threshold", "a token Jaccard similarity in (0, 1], e.g. 0.5"),
            (near.examples >= 0, "near_duplicates.examples", "a number of pairs >= 0"),
            (self.unwanted_answers in UNWANTED_ANSWERS, "unwanted_answers", " or ".join(UNWANTED_ANSWERS)),
            (self.safe_answers in SAFE_ANSWERS, "safe_answers", " or ".join(SAFE_ANSWERS)),
            (not self.safety_path or (self.unwanted_answers, self.safe_answers) == (UNWANTED_ANSWERS[0], SAFE_ANSWERS[0]),
             "unwanted_answers/safe_answers",
             f"the defaults ({UNWANTED_ANSWERS[0]}, {SAFE_ANSWERS[0]}) with behaviours.safety_path: they only reword the shipped "
             "safety set, and your file's safe_response and unwanted_response are used as they are"),
        ]
        check_fields("behaviours", self, checks)

    def path_of(self, kind: str) -> str | None:
        """The user's file for set ``kind`` (``behaviours.<kind>_path``), or None for the default."""
        return getattr(self, f"{kind}_path") or None
