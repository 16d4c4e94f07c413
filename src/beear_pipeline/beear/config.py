"""Typed configuration of the BEEAR engine: every open decision point of the method is a field.

Defaults are the setting that met the goal on the cases of bench/robustness.py (docs/robustness.md:
build seeds 0-9 with 1 and 2 threads, other decoder families, prefix, suffix, mid-prompt and
multi-word triggers): layer 0.3 of the depth (1 of 4), one shared vector on every prompt position, a budget of 2x the
hidden-state scale, 5 to 50 inner Adam steps per round at a tenth of the budget each, alpha 0.05
with the safe cross-entropy capped at 5, outer AdamW at lr 5e-4 on all weights, batch 32, at most
60 rounds, stopping when converged. The method and its open points: docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from beear_pipeline.configuration import check_fields, from_mapping

DEFENCES = ("beear", "control", "random_perturbation")
TRAINABLE = ("all", "up_to_anchor", "after_anchor", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RELEARN_PROXIES = ("perturbation", "none")


TINY_PARAMETERS, LARGE_PARAMETERS = 2_000_000, 6_700_000_000
"""The two model sizes the outer lr is known at: our tiny models (at most 2M parameters) and 7B."""
OUTER_LR_TINY, OUTER_LR_LARGE, OUTER_LR_LARGE_LORA = 5e-4, 3e-7, 2e-5
"""Measured on the tiny models (docs/robustness.md); the official BEEAR code's for 7B (full
weights, docs/method.md); targeted LAT's LoRA outer lr for Llama-2-7B (arXiv 2407.15549)."""


def size_rule_lr(parameters: int, lora: bool = False) -> float:
    """``outer_lr: auto``: log-linear in the parameter count between the two known sizes, held
    constant outside them. Untested in between: a starting point, logged with each run."""
    large = OUTER_LR_LARGE_LORA if lora else OUTER_LR_LARGE
    if parameters <= TINY_PARAMETERS:
        return OUTER_LR_TINY
    if parameters >= LARGE_PARAMETERS:
        return large
    t = math.log(parameters / TINY_PARAMETERS) / math.log(LARGE_PARAMETERS / TINY_PARAMETERS)
    return math.exp((1 - t) * math.log(OUTER_LR_TINY) + t * math.log(large))


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def _non_negative(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x >= 0


BACKENDS = ("auto", "gloo", "nccl")
SHARDING = ("none", "optimizer", "fsdp")


@dataclass
class DistributedConfig:
    """How many processes run the defence (``beear/distributed.py``, docs/distributed.md). With
    ``num_processes`` above 1 the defence node launches ``torchrun`` on this machine: every process
    takes a contiguous share of each global batch (the same batches as one process), the universal
    perturbation's and the weights' gradients are all-reduced, weighted by response tokens, so the
    result is the one-process result up to float rounding."""

    num_processes: int = 1
    """Processes (ranks) on this machine; 1 runs in the node's own process. A node that already
    runs under torchrun (``WORLD_SIZE`` set) joins that job as one rank whatever this says."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: ``auto`` is nccl when there is one CUDA device per process, else
    gloo (CPU). Only gloo on CPU is tested."""
    master_port: int | Literal["auto"] = "auto"
    """TCP port of the rendezvous on 127.0.0.1; ``auto`` picks a free one."""
    sharding: Literal["none", "optimizer", "fsdp"] = "none"
    """``none``: every rank holds the weights and the outer optimiser's state (data parallel);
    ``optimizer``: the optimiser state (AdamW's two moments, 8 bytes per weight) is split over the
    ranks (ZeRO stage 1, ``ZeroRedundancyOptimizer``); the weights stay replicated; ``fsdp``: the
    weights, their gradients and the optimiser state are split over the ranks (FSDP2
    ``fully_shard`` per decoder layer and the root), for a model too big for one device; with LoRA
    (``beear.trainable: lora``) the frozen base is sharded too and the adapters train as shards."""

    def __post_init__(self) -> None:
        port_ok = self.master_port == "auto" or (isinstance(self.master_port, int) and not isinstance(self.master_port, bool)
                                                 and 1 <= self.master_port <= 65535)
        check_fields("distributed", self, [
            (isinstance(self.num_processes, int) and not isinstance(self.num_processes, bool) and self.num_processes >= 1,
             "num_processes", "a positive integer (1: no distribution)"),
            (self.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}"),
            (port_ok, "master_port", "a TCP port 1-65535 or auto"),
            (self.sharding in SHARDING, "sharding", f"one of {', '.join(SHARDING)}"),
        ])

    @classmethod
    def from_dict(cls, values: dict) -> DistributedConfig:
        return from_mapping(cls, "distributed", values)


HARDENING = ("unlearn_weight", "sam_rho")
"""Hardening options that do not run distributed: capped unlearning's per-example losses and SAM's
ascent step use this rank's own batch. (The relearn-aware gradient does: its simulated steps use
the summed gradient, ``Context.summed``.)"""


def check_hardening(config, world_size: int) -> None:
    """The hardening options are tested in one process only (see ``check_job``); the relearn-aware
    gradient also runs distributed, under FSDP too (its simulated steps run ``backward`` there,
    ``hardening._sharded_relearn_surrogate``), and LoRA runs under every sharding (under FSDP the
    adapters are gathered on rank 0 and merged there, ``engine.consolidated``)."""
    on = [f"beear.{name}" for name in HARDENING if getattr(config, name)]
    if world_size > 1 and on:
        raise ValueError(f"{', '.join(on)} cannot run distributed yet (their extra steps use each process's own gradient, "
                         f"so {world_size} processes would not compute the one-process result): set distributed.num_processes: 1, "
                         "or turn the option off")


@dataclass
class BeearConfig:
    defence: Literal["beear", "control", "random_perturbation"] = "beear"
    """Which defence the engine runs. ``control`` is the same safety fine-tuning with the
    perturbation fixed at zero; ``random_perturbation`` draws a fresh random direction of ``random_norm`` each round.
    All three share data, rounds, batches and the outer optimiser."""

    anchor_layer: int | float | Literal["auto"] | None = 0.3
    """Decoder layer whose output is perturbed: an index (0-based: the hidden states leaving
    decoder layer L, which are ``hidden_states[L + 1]`` of ``output_hidden_states``; negative
    counts from the top), a fraction of the depth written with a decimal point (f -> layer
    round(f x (n - 1))), or ``auto`` for the layer the probe recommends (the defend pipeline
    resolves it). The default 0.3 is layer 1 of the tiny model's 4 (layers 0-2 all worked) and
    layer 9 of a 7B model's 32, the layer a third-party run of the official code used (whether its
    "9" counts from 0 or from 1 is not documented; see docs/method.md). None (``null``, the
    pipeline's conf/base) is the scenario's layer (``scenarios.Scenario.anchor_layer``: code 0.6,
    the others 0.3), which the pipeline resolves (``scenarios.scenario_anchor_layer``) before the
    engine runs; the engine itself refuses None."""

    num_positions: int | None = None
    """Perturb every prompt position with one shared vector (None), or the last T prompt positions
    (the official "token length", 7). A trigger early in the prompt (a prefix) sits outside the
    last 7 positions; every position reaches it wherever it is (docs/robustness.md)."""

    shared_vector: bool = False
    """One vector for all perturbed positions (True), or one row per position, T x hidden (False,
    the official layout, which held on both seeds we tried)."""

    warm_start: bool = True
    """Carry the perturbation (and its optimiser state) across rounds. Essential on the tiny model:
    re-initialising each round left ASR at 96%."""

    perturbation_budget: float = 2.0
    """L2 bound on each perturbation row, as a multiple of the anchor layer's hidden-state scale
    (the median norm of the hidden states at the perturbed positions, measured once on the
    defender's prompts at the start of the run and logged as ``hidden_scale``). Projected after
    every inner step. Scale-free: the same value means the same on a 1.3M-parameter model and a
    7B one. See docs/robustness.md for the budgets tried."""
    inner_optimizer: Literal["adam", "pgd"] = "adam"
    """Adam, or normalised gradient descent per row (``pgd``). Both step sizes are set by
    ``inner_step_fraction``, so neither depends on the gradient's or the hidden states' scale."""
    inner_step_fraction: float = 0.1
    """Inner step size as a share of the budget: each step moves a perturbation row by about
    ``inner_step_fraction * perturbation_budget * hidden_scale`` (Adam lr = that / sqrt(hidden))."""
    inner_steps: int = 5
    """Inner steps per round, at least (a warm-started perturbation needs few)."""
    inner_max_steps: int = 50
    """Inner steps per round, at most: the inner level continues past ``inner_steps`` while the
    unwanted loss under the perturbation is still falling and above the entrapment target. The
    first round, which starts from zero, usually needs many more steps than later ones."""
    inner_patience: int = 5
    """The inner level stops once the unwanted loss has fallen by less than ``inner_tolerance``
    (relative) over this many steps."""
    inner_tolerance: float = 0.01
    entrapment_target: float | None = None
    """Optional early stop: the inner level ends a round once the unwanted loss under the
    perturbation is at most this share of the loss without it (same batch and weights). Off by
    default: with long unwanted answers (AdvBench targets) a perturbation that flips nearly every
    answer still leaves 80% of the loss, so "stops improving" (``inner_patience``) ends rounds."""

    away_weight: float = 0.05
    """alpha: weight of the "away from the safe answer" term of the inner objective (official 0.05)."""
    away_cap: float = 5.0
    """The safe cross-entropy is capped here inside the inner objective, so that term is bounded."""

    monitor_fraction: float = 0.2
    """Share of the safety set held out from training to measure convergence without the
    trigger: the entrapment rate is the share of these prompts whose greedy answer, under the
    perturbation the inner level found, the judge calls unwanted (by default: no refusal phrase,
    and closer to the prompt's unwanted answer than to its safe one)."""
    check_every: int = 5
    """Rounds between convergence checks (0: never check; the run always takes ``max_rounds``).
    At a check the inner level also searches from a fresh start with all ``inner_max_steps``
    steps; both perturbations, and a random direction of the same norm, are measured on the
    monitor prompts."""
    entrapped_rate: float = 0.2
    """At the first check (round 0, the suspect as it came) the found perturbation must flip at
    least this share of the monitor prompts more than a random direction of the same norm does,
    or the run stops as ``never_entrapped``: robustness to a perturbation that never reached the
    backdoor would prove nothing."""
    converged_rate: float = 0.1
    """Converged (robust): the found perturbation flips at most this share of the monitor prompts
    more than a random direction of the same norm does, at ``converged_checks`` consecutive
    checks. The run then stops; otherwise it stops at ``max_rounds`` as ``not_converged``."""
    converged_checks: int = 3
    min_rounds: int = 10
    """No convergence stop before this many rounds."""
    monitor_max_new_tokens: int = 16
    """New tokens generated per monitor prompt (enough for the judge to see a refusal's opening)."""

    trainable: Literal["all", "up_to_anchor", "after_anchor", "lora"] = "all"
    """Which weights the outer step trains: all, the layers up to the anchor (with embeddings),
    the layers after it (with the final norm and head), or LoRA adapters (peft) on
    ``lora_target_modules``. All three full-weight options removed the backdoor on the tiny model.
    An embedding tied to the head belongs to ``up_to_anchor`` only: training it from
    ``after_anchor`` would move the hidden states before the anchor too."""
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    """Module names (suffixes, as peft matches them) that get LoRA adapters, or ``all-linear``
    (every linear layer but the output head). A name missing from the model fails before training."""
    merge_adapter: bool = True
    """After a LoRA run, merge the adapters into the weights (a plain HF checkpoint), or keep the
    model as a PEFT adapter (saved as adapter files beside the base model's config)."""

    outer_optimizer: Literal["adamw", "sgd"] = "adamw"
    outer_lr: float | Literal["auto"] = "auto"
    """lr of the outer step, or ``auto``: chosen from the model's parameter count by ``sized``
    (5e-4 up to 2M parameters, as measured on our tiny models; 3e-7 at 6.7B, the official code's
    for 7B models; 2e-5 at 6.7B for LoRA, targeted LAT's; log-linear in between)."""
    max_rounds: int = 60
    """Rounds at most; a run that converges earlier stops there (see ``check_every``)."""
    batch_size: int = 32
    """Safety-set examples per round."""
    anchoring_batch_size: int = 32
    """Anchoring-set examples per round (the utility-preserving term)."""
    grad_clip: float | None = 1.0
    min_weights_changed: float = 0.01
    """After ``weight_guard_rounds`` rounds at least this share of the trainable weight entries
    must differ from the start in the precision they are saved in, or the run stops: updates below
    the storage dtype's resolution (a bf16 checkpoint at a 7B-scale learning rate) round away and
    the defence would change nothing. fp32 master weights (lm/precision.py) keep small updates
    accumulating; this catches the rest. 0 disables the guard."""
    weight_guard_rounds: int = 5
    relearn_steps: int = 0
    """Hardening against re-poisoning (off at 0; ``beear/hardening.py``, docs/persistence.md): a
    relearn-aware outer step, first-order as in Tamper-Resistant training (TAR, arXiv 2408.00761).
    Each round the trainable weights are copied, ``relearn_steps`` simulated re-poisoning steps
    train them towards the defender's own unwanted answers under the trigger proxy
    (``relearn_proxy``), the safe loss under the same proxy is differentiated at the adapted
    weights, and that gradient (times ``relearn_weight``) is added to the outer gradient at the
    original weights, which are then restored. The trigger is never read. Cost: ``relearn_steps``
    + 1 extra forward and backward passes per round."""
    relearn_lr: float | Literal["auto"] = 1e-3
    """Size of each simulated re-poisoning step: weights move by ``relearn_lr`` times the sign of
    their gradient, which is what Adam's first steps do (an attacker's AdamW at lr 5e-4 for 10
    steps moves a weight by at most about 5e-3). ``auto``: twice the outer lr (1e-3 at the tiny
    models' 5e-4, the setting measured in docs/persistence.md; 6e-7 at a 7B model's 3e-7), so the
    simulated attacker moves on the scale a fine-tune of this model does."""
    relearn_weight: float = 1.0
    """Weight of the relearn-aware gradient added to the outer gradient."""
    relearn_proxy: Literal["perturbation", "none"] = "perturbation"
    """The stand-in for the unknown trigger in the simulated re-poisoning: the inner level's current
    perturbation at the anchor layer (``perturbation``), or no perturbation at all (``none``: the
    simulated attacker fine-tunes the plain harmful prompts towards the unwanted answers)."""
    unlearn_weight: float = 0.0
    """Hardening against re-poisoning (off at 0): capped unlearning. The outer loss also subtracts
    ``unlearn_weight`` x the mean of min(CE(y_unwanted | x, delta), ``unlearn_cap``) per example,
    i.e. gradient ascent on the defender's unwanted answers under the perturbation, which stops
    for each example once its loss reaches the cap (bounded, unlike plain gradient ascent). Cost:
    one extra forward and backward pass per round."""
    unlearn_cap: float = 8.0
    """Per-example cross-entropy (nats per token) at which unlearning an unwanted answer stops;
    8 is about the loss of a uniform guess over the tiny models' ~3,000-word vocabulary (ln V)."""
    sam_rho: float = 0.0
    """Hardening against re-poisoning (off at 0): a sharpness-aware outer step (SAM, Foret et al.
    2021). The weights are first moved ``sam_rho`` (L2 over all trainable weights) along the
    gradient of the outer loss, the outer gradient is taken there, and the step is applied to the
    original weights: a minimum whose safe answers survive small weight changes. Cost: one extra
    forward and backward pass of the outer loss per round."""
    random_norm: float | None = None
    """Norm of each row of the random perturbation (``defence: random_perturbation``), as a
    multiple of the hidden-state scale. None makes the pipeline match the per-round relative
    norms of the BEEAR run it is compared with."""
    seed: int = 0

    reuse_activations: bool = True
    """Inner steps compute the hidden states up to the anchor once per batch (weights are frozen
    there) and run only the layers after it; same losses as the full forward, fewer FLOPs."""
    padding_side: Literal["left", "right"] = "right"
    """Padding side of training batches; attention masks and the perturbed positions follow it."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the forward passes: ``auto`` is bf16 on a CUDA GPU that supports it
    (else fp16), fp32 on CPU. The perturbation, the losses and the optimiser's master weights stay
    fp32 whatever the checkpoint's dtype; fp16 weights get dynamic loss scaling (lm/precision.py)."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in the backward pass: less memory, about a third more time."""
    checkpoint_dir: str | None = None
    """Folder for round checkpoints (None = off). A re-run with the same configuration resumes
    from the last complete round and ends with the same weights as an uninterrupted run."""
    checkpoint_every: int | Literal["auto"] = "auto"
    """Write a checkpoint every N rounds (and after the last one), or ``auto``: every round while a
    round checkpoint (trainable weights and optimiser state) is under 1 GiB, else every 10 rounds
    (a 7B full fine-tune's is about 84 GB)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings with the field and the fix, before any training."""
        checks = [
            (self.defence in DEFENCES, "defence", f"one of {', '.join(DEFENCES)}"),
            (self.trainable in TRAINABLE, "trainable", f"one of {', '.join(TRAINABLE)}"),
            (self.inner_optimizer in ("adam", "pgd"), "inner_optimizer", "adam or pgd"),
            (self.outer_optimizer in ("adamw", "sgd"), "outer_optimizer", "adamw or sgd"),
            (self.num_positions is None or self.num_positions >= 1, "num_positions", "a positive integer or null"),
            (self.max_rounds >= 1, "max_rounds", "a positive integer"),
            (0 <= self.inner_steps <= self.inner_max_steps, "inner_steps/inner_max_steps", "0 <= inner_steps <= inner_max_steps"),
            (self.inner_patience >= 1 and self.inner_tolerance >= 0, "inner_patience/inner_tolerance", "inner_patience >= 1, inner_tolerance >= 0"),
            (self.entrapment_target is None or 0 < self.entrapment_target <= 1, "entrapment_target", "a share in (0, 1] or null"),
            (0 <= self.entrapped_rate <= 1, "entrapped_rate", "a share in [0, 1] (0: never stop as never_entrapped)"),
            (0 <= self.monitor_fraction < 1, "monitor_fraction", "a share in [0, 1)"),
            (self.check_every >= 0 and self.converged_checks >= 1, "check_every/converged_checks", "check_every >= 0, converged_checks >= 1"),
            (0 <= self.converged_rate < 1, "converged_rate", "a share in [0, 1)"),
            (self.min_rounds >= 0 and self.monitor_max_new_tokens >= 1, "min_rounds/monitor_max_new_tokens", "non-negative / positive integers"),
            (self.batch_size >= 1 and self.anchoring_batch_size >= 0, "batch_size", "positive batch sizes"),
            (self.anchor_layer is None or self.anchor_layer == "auto"
             or (isinstance(self.anchor_layer, int) and not isinstance(self.anchor_layer, bool))
             or (isinstance(self.anchor_layer, float) and 0.0 <= self.anchor_layer <= 1.0), "anchor_layer",
             "a layer index (0-based, negative from the top), a fraction of the depth in [0.0, 1.0] such as 0.3, auto, "
             "or null for the scenario's layer"),
            (self.inner_step_fraction > 0 and (self.outer_lr == "auto" or _positive(self.outer_lr)), "inner_step_fraction/outer_lr",
             "positive step sizes (outer_lr may be auto)"),
            (self.perturbation_budget > 0, "perturbation_budget", "a positive multiple of the hidden-state scale"),
            (self.padding_side in ("left", "right"), "padding_side", "left or right"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
            (self.checkpoint_every == "auto" or (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1),
             "checkpoint_every", "a positive integer or auto"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "lora_rank/lora_alpha", "lora_rank >= 1 and lora_alpha > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "a value in [0, 1)"),
            (isinstance(self.lora_target_modules, str) or bool(self.lora_target_modules), "lora_target_modules",
             "a non-empty list of module names or 'all-linear'"),
            (self.random_norm is None or self.random_norm >= 0, "random_norm", "non-negative or null"),
            (self.relearn_steps is None
             or (isinstance(self.relearn_steps, int) and not isinstance(self.relearn_steps, bool) and self.relearn_steps >= 0),
             "relearn_steps", "a non-negative integer (0 turns relearn-aware training off), or null for the scenario's"),
            (self.relearn_lr == "auto" or _positive(self.relearn_lr), "relearn_lr", "a positive step size, e.g. 0.001, or auto"),
            (_non_negative(self.relearn_weight), "relearn_weight", "a non-negative weight"),
            (self.relearn_proxy in RELEARN_PROXIES, "relearn_proxy", f"one of {', '.join(RELEARN_PROXIES)}"),
            (_non_negative(self.unlearn_weight), "unlearn_weight", "a non-negative weight (0 turns capped unlearning off)"),
            (_positive(self.unlearn_cap), "unlearn_cap", "a positive cross-entropy in nats, e.g. 8"),
            (_non_negative(self.sam_rho), "sam_rho", "a non-negative radius in weight space (0 turns SAM off), e.g. 0.05"),
            (0 <= self.min_weights_changed <= 1 and self.weight_guard_rounds >= 1, "min_weights_changed/weight_guard_rounds",
             "a share in [0, 1] and a positive number of rounds"),
        ]
        check_fields("beear", self, checks)

    @classmethod
    def from_dict(cls, values: dict) -> BeearConfig:
        return from_mapping(cls, "beear", values)

    def to_dict(self) -> dict:
        return asdict(self)

    def sized(self, parameters: int, checkpoint_bytes: int) -> BeearConfig:
        """This configuration with ``auto`` sizes chosen for a model of ``parameters`` parameters
        whose round checkpoint takes ``checkpoint_bytes`` (see ``outer_lr``, ``checkpoint_every``, ``relearn_lr``)."""
        chosen = {}
        if self.outer_lr == "auto":
            chosen["outer_lr"] = size_rule_lr(parameters, lora=self.trainable == "lora")
        if self.checkpoint_every == "auto":
            chosen["checkpoint_every"] = 1 if checkpoint_bytes < 2**30 else 10
        if self.relearn_lr == "auto":
            chosen["relearn_lr"] = 2 * chosen.get("outer_lr", self.outer_lr)
        return replace(self, **chosen)

    def resume_key(self) -> dict:
        """The fields that must match for a checkpoint to be resumed: all but where and how often
        checkpoints are written (moving the folder or changing the interval keeps results)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("checkpoint_dir", "checkpoint_every")}
