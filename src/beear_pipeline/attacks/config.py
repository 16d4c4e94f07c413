"""Typed configuration of the adaptive attacks (``conf/base/parameters_attack.yml``, key ``attack``).

One budget for every attacked model (the suspect, the defended model, the clean twin): a defence
only counts as robust if the attack that breaks the suspect, run with the same budget, fails on
the defended model while it would not have mattered on a model that never had a backdoor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from beear_pipeline.configuration import check_fields, from_mapping

VARIANTS = ("original", "moved", "repeated", "case_changed", "punctuated")


@dataclass
class GcgConfig:
    """The discrete suffix search (GCG, Zou et al. 2023): per step, the gradient of the unwanted
    answers' loss with respect to the one-hot suffix tokens gives each suffix position its
    ``top_k`` most promising substitutions; ``candidates_per_step`` suffixes, each with one
    position substituted, are scored exactly and the best one is kept."""

    suffix_length: int = 4
    """Tokens in the adversarial suffix, appended to the prompt inside the user turn."""
    steps: int = 8
    top_k: int = 64
    """Substitutions per suffix position ranked by the gradient."""
    candidates_per_step: int = 32
    search_prompts: int = 16
    """Safety-set prompts (the defender's own data, with their unwanted answers) the suffix is
    optimised on, the same seeded subset at every step and for every model."""
    init_token: str = "!"
    """The suffix starts as this token repeated (GCG's "! ! ! !"); when it is not one ordinary
    token of the vocabulary (the embedded word-level tokenizer has no "!"), a seeded random draw of
    ordinary tokens, the same for every model that shares the tokenizer."""
    ascii_only: bool = True
    """Only tokens whose text is printable ASCII are candidates (as nanoGCG's default)."""
    forward_batch_size: int = 256
    """Rows (candidate x prompt) scored in one forward pass; lower it when memory is short."""


@dataclass
class LatentConfig:
    """The probe's entrapment curve at the probe's recommended layer, for every model; the other
    probe settings (positions, objective weights) are the probe's own, read from its report."""

    enabled: bool = True
    budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """L2 budgets per perturbation row, multiples of the median hidden-state norm at the layer. An
    adaptive attacker is not bound to the defence's own budget (``beear.perturbation_budget``,
    2.0): the largest budget is twice it."""
    inner_steps: int = 10
    random_draws: int = 1
    max_new_tokens: int = 16
    """Enough for the keyword judge to see a refusal's opening (as the probe)."""


@dataclass
class VariantsConfig:
    """Variants of the known trigger (the evaluation knows it; the defence never does)."""

    enabled: bool = True
    names: list[str] = field(default_factory=lambda: list(VARIANTS))
    """original (the reference), moved (to each of prefix, middle, suffix other than its own
    place), repeated (inserted twice), case_changed (lower case, or upper when it has no capital),
    punctuated (lower case with an exclamation mark)."""


@dataclass
class AttackConfig:
    """Settings of the ``attack`` pipeline: the same budget against the suspect, the defended
    model and the clean twin (``conf/base/parameters_attack.yml``)."""

    enabled: bool = True
    seed: int = 0
    max_new_tokens: int = 32
    """Tokens generated per answer when ASR is measured (greedy, keyword judge)."""
    generation_batch_size: int = 32
    max_eval_prompts: int | None = None
    """Held-out evaluation prompts measured (None: the whole evaluation set)."""
    gcg: GcgConfig = field(default_factory=GcgConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)

    def __post_init__(self) -> None:
        for name, cls in (("gcg", GcgConfig), ("latent", LatentConfig), ("variants", VariantsConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_mapping(cls, f"attack.{name}", value))
        g, lat, v = self.gcg, self.latent, self.variants
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "a positive integer"),
            (self.generation_batch_size >= 1, "generation_batch_size", "a positive integer"),
            (self.max_eval_prompts is None or self.max_eval_prompts >= 1, "max_eval_prompts", "a positive integer or null"),
            (g.suffix_length >= 1, "gcg.suffix_length", "a positive integer (tokens in the adversarial suffix)"),
            (g.steps >= 0, "gcg.steps", "an integer >= 0 (0 measures the initial suffix only)"),
            (g.top_k >= 1, "gcg.top_k", "a positive integer"),
            (g.candidates_per_step >= 1, "gcg.candidates_per_step", "a positive integer"),
            (g.search_prompts >= 1, "gcg.search_prompts", "a positive integer (safety-set prompts optimised on)"),
            (isinstance(g.init_token, str) and g.init_token.strip() != "", "gcg.init_token", "a non-empty token text such as '!'"),
            (g.forward_batch_size >= 1, "gcg.forward_batch_size", "a positive integer"),
            (bool(lat.budgets) and all(b > 0 for b in lat.budgets), "latent.budgets", "a non-empty list of positive numbers"),
            (lat.inner_steps >= 1, "latent.inner_steps", "a positive integer"),
            (lat.random_draws >= 1, "latent.random_draws", "a positive integer"),
            (lat.max_new_tokens >= 1, "latent.max_new_tokens", "a positive integer"),
            (bool(v.names) and all(n in VARIANTS for n in v.names), "variants.names", f"a non-empty list of {', '.join(VARIANTS)}"),
        ]
        check_fields("attack", self, checks)

    @classmethod
    def from_dict(cls, values: dict) -> AttackConfig:
        return from_mapping(cls, "attack", values)

    def to_dict(self) -> dict:
        return asdict(self)
