"""A memory and disk plan for a BEEAR run, from a checkpoint's ``config.json`` alone, before any
weight is loaded.

The model is built on PyTorch's ``meta`` device (shapes without storage: no weights are read, no
network, ``trust_remote_code`` off) and its parameters are split exactly as the engine's trainable
scopes split them (``beear.scopes.parameter_sections``). The rest is arithmetic on the shape. Each
part of a round runs on top of what the whole run keeps:

    kept     = runtime + weights + fp32 master weights + gradients + optimiser state
    peak     = kept + max(outer level, inner level, optimiser step)
    and, after training, the final audit (``find_perturbation``): runtime + weights + the last
    gradients + one inner level

The activation terms count, per token and decoder layer, the tensors autograd keeps for the
backward pass of a Llama-family decoder (RMSNorm, SDPA attention with a padding mask, gated MLP),
as ``torch.autograd.graph.saved_tensors_hooks`` lists them for fp32, bf16 and fp16 weights with and
without autocast and for LoRA; other decoders are approximated by the same terms. Under autocast
a linear layer keeps a cast copy of its input when that is not in the autocast dtype, and of its
weight when the weights are not. The plan is checked against the measured peak of real engine rounds
in ``tests/lm/test_plan.py``; the terms, the measurements and plans for 7B-70B models are in
docs/memory-plan.md.

Not modelled: the CUDA caching allocator's fragmentation (``check`` keeps ``headroom`` for it),
generation (the monitor checks, the evaluation; a KV cache far smaller than a training forward
pass), the probe and the evaluation's persistence check (a plain fine-tune of all weights).

Importing this module is cheap (no torch, no transformers): a Kedro hook can plan before loading.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beear_pipeline.beear.config import BeearConfig

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}
HALF = ("float16", "bfloat16")
RUNTIME_BYTES = GiB
"""Memory that is not the model's: on a GPU the CUDA context, cuBLAS workspaces and kernels
(0.5-1 GiB), on a CPU the interpreter with torch, transformers, peft, Kedro and MLflow (0.5 GB measured)."""
DEFENCES = 3
"""The pipeline trains three models alike: BEEAR, the control and the random baseline."""
LORA_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
               "o_proj": "attention output", "gate_proj": "MLP input", "up_proj": "MLP input", "down_proj": "MLP product"}
"""Which tensor each Llama-family linear layer reads: adapters reading the same one share it
unless each makes its own cast copy. Another name is counted as reading a tensor of its own."""


class PlanError(ValueError):
    """The run will not fit: the message names what does not fit and the settings that would."""


@dataclass
class PlanConfig:
    """How to plan (``conf/base/parameters_plan.yml``, key ``plan``; ``kedro run --pipeline=plan``)."""

    sequence_length: int = 256
    """The longest example of a batch, in tokens after the chat template (batches are padded to
    it). The shipped AdvBench-based sets are about 100 tokens under Llama-2's template."""
    device: str = "auto"
    """auto (cuda when a GPU is visible, else cpu), cuda or cpu."""
    headroom: float = 0.1
    """Share of the device memory left for the allocator's fragmentation and other processes."""
    check: bool = False
    """Fail (``PlanError``, naming the fix) when the run will not fit this machine's free device
    memory or disk; otherwise the plan only says whether it fits."""
    device_memory_gib: float | None = None
    """Check against a device of this size (e.g. 80 for an 80 GB GPU) instead of this machine's free memory."""
    output_dir: str = "data/06_models"
    """Where the removal pipeline saves the defended models (conf/base/catalog.yml): its free disk is checked."""
    before_loading: bool = True
    """Every pipeline that loads a user's checkpoint (``defend``, ``probe``, ...) checks this plan
    first and stops, naming the fix, when the run will not fit this machine's free memory or disk.
    false tries anyway (the plan counts a Llama-family decoder; another may differ)."""

    def __post_init__(self) -> None:
        from beear_pipeline.configuration import check_fields

        check_fields("plan", self, [
            (isinstance(self.sequence_length, int) and self.sequence_length >= 1, "sequence_length", "a positive number of tokens"),
            (self.device in ("auto", "cuda", "cpu"), "device", "auto, cuda or cpu"),
            (0 <= self.headroom < 1, "headroom", "a share in [0, 1)"),
            (self.device_memory_gib is None or self.device_memory_gib > 0, "device_memory_gib", "a positive size in GiB, or null"),
        ])


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, counted on the meta device."""

    name: str
    architecture: str
    storage_dtype: str
    """The precision the weights are stored (and saved) in: config.json's, or ``model.dtype``."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    parameters: int
    before: int
    """Parameters registered before the first decoder layer (embeddings; a tied head too)."""
    layer_parameters: tuple[int, ...]
    after: int
    """Parameters after the last decoder layer (final norm, untied head)."""
    head: int
    """Parameters of the output head (the embedding when it is tied)."""
    largest_tensor: int
    """Elements of the largest parameter tensor (the optimiser's per-tensor temporaries)."""
    lora_in_out: int
    """Sum of in + out features over the linear layers ``lora_target_modules`` selects: LoRA
    adds rank x (in + out) parameters to each."""
    lora_modules: tuple[tuple[str, int], ...] = ()
    """(name, in_features) of each linear layer LoRA adapts in one decoder layer."""

    @property
    def storage_bytes(self) -> int:
        return DTYPE_BYTES[self.storage_dtype]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what the run holds, from the stored precision, ``beear.precision`` and
    the device (as ``lm.precision.load_dtype`` and ``beear.engine.autocast_dtype`` decide)."""

    weights: int
    """Weights in memory: as stored, except half precision on CPU, which is computed in fp32."""
    autocast: str | None
    """The autocast dtype, or None (plain computation in the weights' dtype)."""
    activation: int
    """What linear layers, attention and the MLP output: the autocast dtype, else the weights'."""
    residual: int
    """The residual stream between layers: the weights' dtype; fp32 when autocast mixes fp16 and
    bf16 (the first residual addition promotes to fp32)."""
    weight_copies: bool
    """Autocast casts each weight per forward pass (the weights are not in the autocast dtype)."""

    @property
    def label(self) -> str:
        names = {4: "fp32", 2: "half"}
        return f"{self.autocast} autocast" if self.autocast else f"{names.get(self.weights, self.weights)} (no autocast)"


def precision_of(storage: str, precision: str, device: str) -> Precision:
    """The run's precision for weights stored as ``storage``, ``beear.precision`` and ``device``
    (``cuda`` or ``cpu``). ``precision: auto`` on a GPU assumes bf16 support (Ampere or newer)."""
    compute = "float32" if device == "cpu" and storage in HALF else storage
    if precision == "fp32" or (precision == "auto" and device != "cuda"):
        autocast = None
    else:
        autocast = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16"}[precision]
    w = DTYPE_BYTES[compute]
    residual = w if autocast is None or compute in ("float32", autocast) else 4
    return Precision(weights=w, autocast=autocast, activation=2 if autocast else w, residual=residual,
                     weight_copies=autocast is not None and compute != autocast)


def read_shape(path: str | Path, dtype: str | None = None, lora_target_modules: list[str] | str = "all-linear",
               name: str | None = None) -> ModelShape:
    """The shape of the checkpoint in ``path`` from its ``config.json`` alone; ``dtype`` (e.g.
    ``model.dtype``) overrides the stored precision."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PlanError(f"model.path={path}: no config.json; the plan needs only that file of the checkpoint")
    try:
        config = AutoConfig.from_pretrained(Path(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"model.path={path}: config.json is not a configuration transformers knows without remote code ({e})") from e
    return shape_of(config, dtype, lora_target_modules, name or Path(path).resolve().name)


def shape_of(config, dtype: str | None = None, lora_target_modules: list[str] | str = "all-linear", name: str = "model") -> ModelShape:
    """The shape of a model built from a transformers ``config`` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from beear_pipeline.beear.scopes import parameter_sections

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    sections = parameter_sections(model)
    layers = sorted((k for k in sections if k.startswith("layer.")), key=lambda k: int(k.split(".")[1]))
    stored = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    stored = str(stored).removeprefix("torch.")
    if stored not in DTYPE_BYTES:
        raise PlanError(f"model.dtype={stored!r}: use float32, bfloat16 or float16")
    hidden = config.hidden_size
    heads = config.num_attention_heads
    lora_total, lora_modules = _lora_targets(model, lora_target_modules)
    return ModelShape(
        name=name, architecture=type(model).__name__, storage_dtype=stored, layers=len(layers), hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
        parameters=sum(p.numel() for p in model.parameters()), before=_count(sections["before"]),
        layer_parameters=tuple(_count(sections[k]) for k in layers), after=_count(sections["after"]),
        head=model.get_output_embeddings().weight.numel(), largest_tensor=max(p.numel() for p in model.parameters()),
        lora_in_out=lora_total, lora_modules=lora_modules,
    )


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _lora_targets(model, targets: list[str] | str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """in + out features summed over the linear layers peft would adapt (``all-linear`` is every
    linear layer but the output head; a list matches module-name suffixes; another string is a
    regular expression on the full name), and (name, in_features) of those in the first decoder layer."""
    import torch

    from beear_pipeline.lm.residual import decoder_layers

    head = model.get_output_embeddings()
    first = {id(m) for m in decoder_layers(model)[0].modules()}
    total, modules = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear":
            chosen = True
        elif isinstance(targets, str):
            chosen = re.fullmatch(targets, name) is not None
        else:
            chosen = any(name == t or name.endswith("." + t) for t in targets)
        if chosen:
            total += module.in_features + module.out_features
            if id(module) in first:
                modules.append((name.rsplit(".", 1)[-1], module.in_features))
    return total, tuple(modules)


# ---- what autograd keeps, per token ----

def layer_activation_bytes(shape: ModelShape, p: Precision, seq: int, weights: str, lora_rank: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer on the gradient's path. ``weights``:
    ``frozen`` (only the input's gradient is needed: the inner level, the layers a gradient
    crosses), ``all`` (the layer's weights train) or ``lora`` (its adapters train)."""
    h, i, a, r = shape.hidden, shape.intermediate, p.activation, p.residual
    norm = 4 * h + 4                # each RMSNorm keeps its input in fp32 (upcast unless fp32 already) and 1/rms
    kept = (2 * norm
            + 4 * a * h             # SDPA keeps q, k, v (k, v repeated to every head under a padding mask) and its output,
            + 4 * shape.heads       # its log-sum-exp, fp32, per head,
            + a * seq               # and the (batch, 1, seq, seq) mask, converted to a float bias in every layer
            + 3 * a * i)            # the MLP keeps gate (SiLU's input), SiLU's output and up (the factors of their product)
    if weights == "all":
        # autocast casts a norm's output anew for each linear layer reading it (q, k, v; gate, up)
        casts = 5 if r != a else 2
        kept += (2 * r * h          # each norm's normalised input (its weight's gradient)
                 + casts * a * h    # the inputs of q/k/v and gate/up (their weights' gradients)
                 + a * i)           # down_proj's input; o_proj's is SDPA's output, kept already
    elif weights == "lora":
        kept += lora_activation_bytes(shape, p, lora_rank)
    return kept


def lora_activation_bytes(shape: ModelShape, p: Precision, rank: int) -> int:
    """Per token and layer, what LoRA adapters keep beyond a frozen layer: each adapter's rank-sized
    intermediate, and the inputs of the adapted layers. peft casts an input to the adapters' fp32
    and autocast back to half, so under autocast (or with half weights) each adapter keeps a copy
    of its own; in plain fp32 adapters reading the same tensor share it (o_proj's is SDPA's output)."""
    own_copy = p.autocast is not None or p.weights != 4
    size = p.activation if p.autocast else 4
    widths = {"MLP product": shape.intermediate}
    kept, shared = 0, set()
    for name, in_features in shape.lora_modules:
        kept += rank * size
        reads = LORA_INPUTS.get(name, name)
        if own_copy:
            kept += in_features * size
        elif reads not in shared and reads != "attention output":
            shared.add(reads)
            kept += widths.get(reads, in_features) * size
    return kept


def head_activation_bytes(shape: ModelShape, p: Precision, trains: bool) -> int:
    """Per token, the final norm, the head's input when the head trains, and the fp32
    log-softmax cross-entropy keeps (vocab x 4)."""
    return 4 * shape.hidden + 4 + (p.residual + p.activation) * shape.hidden * trains + 4 * shape.vocab


def loss_transient_bytes(shape: ModelShape) -> int:
    """Per token of one batch, beside what is kept, in the backward pass: the fp32 gradients of the
    log-softmax and of its input. (The forward pass's, the logits and their fp32 copy, are
    (activation + 4) x vocab: no more.)"""
    return 8 * shape.vocab


@dataclass
class MemoryPlan:
    """Predicted peak device memory and disk use of a BEEAR run (bytes).

    ``activations`` holds what each part of the run adds on top of what it runs with (the outer
    level's and inner level's activations, the optimiser step's temporaries, the final audit's
    activations); ``phases`` the device memory at each part's peak; ``memory`` the terms of the
    largest, ``phase``, which sum to ``peak_device_bytes``."""

    shape: ModelShape
    beear: BeearConfig
    sequence_length: int
    device: str
    anchor_layer: int
    trainable_parameters: int
    precision: Precision
    memory: dict[str, int]
    activations: dict[str, int]
    phases: dict[str, int]
    phase: str
    peak_device_bytes: int
    checkpoint_bytes: int
    defended_model_bytes: int
    disk_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoints_bytes(self) -> int:
        """Disk under ``beear.checkpoint_dir``: one checkpoint per defence, and one more while a
        new round is written before the previous one is removed."""
        return (DEFENCES + 1) * self.checkpoint_bytes if self.beear.checkpoint_dir else 0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["beear"] = {k: out["beear"][k] for k in _RUN_FIELDS}
        out["shape"]["layer_parameters"] = list(self.shape.layer_parameters)
        out["shape"]["lora_modules"] = [list(m) for m in self.shape.lora_modules]
        out["checkpoints_bytes"] = self.checkpoints_bytes
        return out

    def metrics(self, prefix: str = "plan.") -> dict[str, float]:
        """The plan's headline figures in GiB, for MLflow."""
        figures = {"peak_device_gib": self.peak_device_bytes, "disk_gib": self.disk_bytes, "checkpoint_gib": self.checkpoint_bytes,
                   "defended_model_gib": self.defended_model_bytes, "weights_gib": self.memory.get("weights", 0)}
        figures.update({f"{k.replace(' ', '_')}_gib": v for k, v in self.phases.items()})
        out = {f"{prefix}{k}": round(v / GiB, 4) for k, v in figures.items()}
        out[f"{prefix}trainable_parameters"] = float(self.trainable_parameters)
        return out

    def table(self) -> str:
        """The plan as a markdown table."""
        s, b = self.shape, self.beear
        run = (f"trainable `{b.trainable}` ({_count_str(self.trainable_parameters)}), {b.outer_optimizer}, batch "
               f"{b.batch_size} + {b.anchoring_batch_size} x {self.sequence_length} tokens, {self.precision.label} on "
               f"{self.device}, gradient checkpointing {'on' if b.gradient_checkpointing else 'off'}, anchor layer {self.anchor_layer}")
        rows = [("model", f"{s.name} ({s.architecture}), {_count_str(s.parameters)} parameters, {s.layers} layers, {s.storage_dtype}"),
                ("run", run)]
        rows += [(k.replace("_", " "), _gib(v)) for k, v in self.memory.items()]
        rows += [("**peak device memory**", f"**{_gib(self.peak_device_bytes)}** ({self.phase})")]
        rows += [(f"at the {k}" if k != self.phase else f"at the {k} (the peak)", _gib(v)) for k, v in self.phases.items()]
        rows += [("round checkpoint", _gib(self.checkpoint_bytes) if b.checkpoint_dir else "off (beear.checkpoint_dir: null)"),
                 ("defended model", _gib(self.defended_model_bytes)),
                 ("**disk needed**", f"**{_gib(self.disk_bytes)}** ({DEFENCES} models"
                                     + (f" + {DEFENCES + 1} round checkpoints)" if b.checkpoint_dir else ")"))]
        lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])

    def check(self, device_bytes: int | None, disk_bytes: int | None, headroom: float = 0.1,
              checkpoint_disk_bytes: int | None = None) -> None:
        """Raise ``PlanError`` when the peak does not fit in ``(1 - headroom) x device_bytes`` or the
        disk use in ``disk_bytes`` (None: not checked), naming the settings that would fit.
        ``headroom`` leaves room for the allocator's fragmentation and other processes. When the
        round checkpoints go to another file system, ``checkpoint_disk_bytes`` is its free space
        and ``disk_bytes`` is checked against the defended models alone."""
        problems = []
        usable = None if device_bytes is None else device_bytes * (1 - headroom)
        if usable is not None and self.peak_device_bytes > usable:
            fixes = "; ".join(self._device_fixes(usable))
            problems.append(f"device memory: the run needs {_gib(self.peak_device_bytes)} at its peak ({self.phase}), "
                            f"{1 - headroom:.0%} of the {_gib(device_bytes)} available on {self.device} is {_gib(usable)}. "
                            f"Fix: {fixes}")
        separate = checkpoint_disk_bytes is not None and self.beear.checkpoint_dir
        needed = self.disk_bytes - self.checkpoints_bytes if separate else self.disk_bytes
        if disk_bytes is not None and needed > disk_bytes:
            problems.append(f"disk: the run writes {_gib(needed)}, {_gib(disk_bytes)} are free. " + self._disk_fixes())
        if separate and self.checkpoints_bytes > checkpoint_disk_bytes:
            problems.append(f"disk: the round checkpoints need {_gib(self.checkpoints_bytes)} under beear.checkpoint_dir="
                            f"{self.beear.checkpoint_dir}, {_gib(checkpoint_disk_bytes)} are free there. " + self._disk_fixes())
        if problems:
            raise PlanError(f"{self.shape.name} will not fit:\n- " + "\n- ".join(problems))

    def _replan(self, shape: ModelShape | None = None, **changes) -> MemoryPlan:
        return plan_memory(shape or self.shape, dataclasses.replace(self.beear, **changes), self.sequence_length, self.device)

    def _device_fixes(self, usable: float) -> list[str]:
        """Each single change that lowers the peak, with the peak it gives; when none fits alone,
        all of them together."""
        b, p = self.beear, self.precision
        candidates: list[tuple[str, dict, str | None]] = []  # (setting, beear changes, stored dtype)
        if not b.gradient_checkpointing and self.phase == "outer level":
            candidates.append(("beear.gradient_checkpointing=true", {"gradient_checkpointing": True}, None))
        if b.trainable != "lora":
            candidates.append(("beear.trainable=lora", {"trainable": "lora"}, None))
        if b.outer_optimizer == "adamw" and b.trainable != "lora":
            candidates.append(("beear.outer_optimizer=sgd", {"outer_optimizer": "sgd"}, None))
        if p.weight_copies or (self.device == "cuda" and self.shape.storage_dtype == "float32"):
            candidates.append(("model.dtype=bfloat16", {}, "bfloat16"))
        if self.phase == "final audit":
            candidates.append(("beear.check_every=0 (no convergence checks and no final audit)", {"check_every": 0}, None))
        size = b.batch_size // 2
        while size >= 1:  # the largest smaller batch that fits, else the smallest
            changes = {"batch_size": size, "anchoring_batch_size": min(size, b.anchoring_batch_size)}
            if self._replan(**changes).peak_device_bytes <= usable or size == 1:
                candidates.append((f"beear.batch_size={size} and beear.anchoring_batch_size={changes['anchoring_batch_size']}", changes, None))
                break
            size //= 2
        tried = [(name, self._replan(dataclasses.replace(self.shape, storage_dtype=dtype) if dtype else None, **changes))
                 for name, changes, dtype in candidates]
        lower = [(name, q) for name, q in tried if q.peak_device_bytes < self.peak_device_bytes]
        fixes = [f"{name} -> {_gib(q.peak_device_bytes)} ({'fits' if q.peak_device_bytes <= usable else 'not enough alone'})"
                 for name, q in lower]
        if len(lower) > 1 and all(q.peak_device_bytes > usable for _, q in lower):
            fixes.append(self._together([c for c in candidates if any(c[0] == n for n, _ in lower)], usable))
        if self.device == "cuda":
            fixes.append("model.device_map=auto to spread the model over more GPUs")
        return fixes

    def _together(self, candidates: list[tuple[str, dict, str | None]], usable: float) -> str:
        """The changes of ``candidates`` at once, with the largest batch that then fits."""
        names = [name for name, changes, _ in candidates if "batch_size" not in changes]
        together = {k: v for _, changes, _ in candidates for k, v in changes.items() if "batch_size" not in changes}
        dtype = next((d for _, _, d in candidates if d), None)
        shape = dataclasses.replace(self.shape, storage_dtype=dtype) if dtype else None
        size = self.beear.batch_size
        while True:
            batch = {"batch_size": size, "anchoring_batch_size": min(size, self.beear.anchoring_batch_size)}
            q = self._replan(shape, **together, **batch)
            if q.peak_device_bytes <= usable or size == 1:
                break
            size //= 2
        names.append(f"beear.batch_size={size} and beear.anchoring_batch_size={batch['anchoring_batch_size']}")
        out = f"together, {', '.join(names)} -> {_gib(q.peak_device_bytes)} ({'fits' if q.peak_device_bytes <= usable else 'still not enough'})"
        if q.phase == "final audit" and q.peak_device_bytes > usable:
            audit_free = self._replan(shape, **together, **batch, check_every=0)
            out += (f", its peak being the final audit (an inner level on each defended model); with beear.check_every=0 too (no convergence "
                    f"checks, no final audit) -> {_gib(audit_free.peak_device_bytes)}")
        return out

    def _disk_fixes(self) -> str:
        where = self.beear.checkpoint_dir or "data/06_models"
        return (f"Fix: free space at {where}, or set beear.checkpoint_dir to a larger disk; beear.checkpoint_dir=null "
                f"saves {_gib(self.checkpoints_bytes)} but a killed run restarts from round 0; "
                "beear.trainable=lora checkpoints only the adapters and their optimiser state; beear.outer_optimizer=sgd keeps no "
                "optimiser state. (beear.checkpoint_every changes how often a checkpoint is written, not its size: only the last "
                "round's is kept.)")


_RUN_FIELDS = ("trainable", "lora_rank", "lora_target_modules", "merge_adapter", "outer_optimizer", "batch_size",
               "anchoring_batch_size", "precision", "gradient_checkpointing", "anchor_layer", "num_positions", "shared_vector",
               "reuse_activations", "defence", "check_every", "monitor_fraction", "checkpoint_dir", "checkpoint_every")


def plan_memory(shape: ModelShape, beear: BeearConfig, sequence_length: int = 256, device: str = "cuda") -> MemoryPlan:
    """The plan for ``beear`` on a model of ``shape``, batches padded to ``sequence_length`` (the
    longest example of a batch, in tokens after the chat template: the shipped AdvBench-based sets
    are about 100 under Llama-2's template), on ``device`` (``cuda`` or ``cpu``, where
    ``precision: auto`` means bf16 autocast or plain fp32). With ``anchor_layer: auto`` (chosen
    later by the probe) the plan is the largest over every layer."""
    from beear_pipeline.lm.residual import layer_index

    if beear.anchor_layer == "auto":
        plans = [plan_memory(shape, dataclasses.replace(beear, anchor_layer=k), sequence_length, device) for k in range(shape.layers)]
        worst = max(plans, key=lambda q: (q.peak_device_bytes, q.disk_bytes))
        worst.beear = beear
        worst.notes.append("beear.anchor_layer: auto is chosen by the probe: this is the largest plan over every anchor layer")
        return worst
    k = layer_index(beear.anchor_layer, shape.layers)
    p = precision_of(shape.storage_dtype, beear.precision, device)
    seq, L, lora = sequence_length, shape.layers, beear.trainable == "lora"
    lora_params = beear.lora_rank * shape.lora_in_out if lora else 0
    trainable = {"all": shape.parameters, "lora": lora_params,
                 "up_to_anchor": shape.before + sum(shape.layer_parameters[: k + 1]),
                 "after_anchor": sum(shape.layer_parameters[k + 1:]) + shape.after}[beear.trainable]
    rows = 1 if beear.shared_vector or beear.num_positions is None else beear.num_positions
    perturbation = 4 * rows * shape.hidden * 4  # delta, its gradient and the inner Adam's two moments, fp32
    # the engine steps fp32 copies of half-precision trainable weights (a bf16 weight would swallow
    # updates smaller than 1/256 of itself); LoRA adapters are fp32 already
    masters = 4 * trainable if p.weights < 4 and not lora else 0
    kept = {
        "runtime": RUNTIME_BYTES,
        "weights": shape.parameters * p.weights + 4 * lora_params,  # in memory; peft keeps LoRA adapters in fp32
        "master_weights": masters,
        # one per trainable weight in its dtype, and the masters' fp32 ones; both stay from one
        # outer step through the next round's inner level and forward passes (zeroed just before backward)
        "gradients": trainable * (4 if lora else p.weights) + masters,
        "optimizer_state": 8 * trainable * (beear.outer_optimizer == "adamw") + perturbation,  # AdamW: two fp32 moments
    }

    # the outer level: the safety and the anchoring batch, one graph each, through every layer that
    # trains or that a gradient crosses on its way to the trained weights
    tokens = (beear.batch_size + beear.anchoring_batch_size) * seq
    largest = max(beear.batch_size, beear.anchoring_batch_size) * seq
    graphs = 1 + (beear.anchoring_batch_size > 0)
    trained = {"all": range(L), "lora": range(L), "up_to_anchor": range(k + 1), "after_anchor": range(k + 1, L)}[beear.trainable]
    crossed = range(k + 1, L) if beear.trainable == "up_to_anchor" else range(0)  # frozen, but on the gradient's path
    mode = "lora" if lora else "all"
    head_trains = beear.trainable in ("all", "after_anchor")
    layer_trained = layer_activation_bytes(shape, p, seq, mode, beear.lora_rank)
    layer_frozen = layer_activation_bytes(shape, p, seq, "frozen")
    copies = _weight_copies(shape, p, [*trained, *crossed], lora_params)  # per forward pass, under autocast
    head_copy = _weight_copies(shape, p, [], 0)
    # the loss's transients, on the larger batch: the logits and their fp32 copy at the end of the
    # forward pass; the log-softmax's gradients in the backward pass, by when the engine has freed
    # the previous step's gradients (it zeroes them just before the backward pass)
    loss = max(largest * (p.activation + 4) * shape.vocab, largest * loss_transient_bytes(shape) - kept["gradients"])
    if beear.gradient_checkpointing:
        # each layer keeps only its input. In the backward pass one layer of one batch at a time is
        # recomputed (its activations and weight copies), after that batch's loss transients are gone
        on_path = len(trained) + len(crossed)
        recomputed = largest * layer_trained + (copies - head_copy) // max(on_path, 1)
        outer = (tokens * (on_path * p.residual * shape.hidden + head_activation_bytes(shape, p, head_trains))
                 + graphs * head_copy + max(recomputed, loss))
    else:
        outer = (tokens * (len(trained) * layer_trained + len(crossed) * layer_frozen + head_activation_bytes(shape, p, head_trains))
                 + graphs * copies + loss)

    # the inner level: weights frozen, the unwanted and the safe batch, one graph each, through the
    # layers after the anchor only (the anchor layer's outputs are cached once per batch). It runs
    # in eval mode, where transformers never checkpoints.
    inner = 0
    if beear.defence == "beear":
        inner = _inner_level(shape, p, beear, k, seq)
    # the optimiser step's temporaries: foreach AdamW on a GPU makes an fp32 copy of every
    # trainable tensor at once; on CPU it steps one tensor at a time
    step = 4 * (trainable if device == "cuda" else 2 * min(trainable, shape.largest_tensor))
    activations = {"outer level": outer, "inner level": inner, "optimizer step": step}
    terms = {"outer level": {**kept, "activations": outer}, "inner level": {**kept, "activations": inner},
             "optimizer step": {**kept, "step_temporaries": step}}
    if beear.check_every and beear.monitor_fraction:
        # after the last round the removal pipeline measures every defended model with
        # find_perturbation: the run's optimiser is gone, the last gradients are not; the
        # inner level alone builds no master weights (engine._Run(outer=False))
        audit = _inner_level(shape, p, beear, k, seq)
        activations["final audit"] = audit
        terms["final audit"] = {"runtime": RUNTIME_BYTES, "weights": shape.parameters * p.weights,
                                "gradients": 0 if lora else trainable * p.weights, "optimizer_state": perturbation,
                                "activations": audit}
    phases = {name: sum(t.values()) for name, t in terms.items()}
    phase = max(phases, key=phases.get)

    notes = []
    if beear.gradient_checkpointing and phase != "outer level":
        notes.append(f"gradient checkpointing does not lower this peak ({phase}): the inner level runs in eval mode, which "
                     "transformers never checkpoints; a smaller beear.batch_size or a later beear.anchor_layer does")
    if p.weight_copies:
        notes.append(f"the weights ({shape.storage_dtype} in memory as {_dtype_name(p.weights)}) are not in the autocast dtype "
                     f"({p.autocast}): each forward pass keeps a cast copy of every weight on the gradient's path "
                     f"({_gib(copies)}); model.dtype={p.autocast} avoids them")
    if device == "cuda" and beear.precision == "auto":
        notes.append("precision: auto is counted as bf16 autocast (a GPU without bf16 uses fp16: the same sizes)")
    if shape.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        notes.append(f"activations are counted as for a Llama-family decoder; {shape.architecture} may differ")

    # a round checkpoint: the trainable weights at full precision (the fp32 masters), the outer
    # optimiser's state, the perturbation and its optimiser (resume.py)
    checkpoint = 4 * trainable + 8 * trainable * (beear.outer_optimizer == "adamw") + perturbation
    defended = 4 * lora_params if lora and not beear.merge_adapter else shape.parameters * shape.storage_bytes
    disk = DEFENCES * defended + ((DEFENCES + 1) * checkpoint if beear.checkpoint_dir else 0)
    return MemoryPlan(shape=shape, beear=beear, sequence_length=seq, device=device, anchor_layer=k, trainable_parameters=trainable,
                      precision=p, memory=terms[phase], activations=activations, phases=phases, phase=phase,
                      peak_device_bytes=phases[phase], checkpoint_bytes=checkpoint, defended_model_bytes=defended,
                      disk_bytes=disk, notes=notes)


def _inner_level(shape: ModelShape, p: Precision, beear: BeearConfig, k: int, seq: int) -> int:
    """The inner level's activations: two graphs (the unwanted and the safe batch) through the
    frozen layers after the anchor and the head, the cached anchor outputs, the loss's transients."""
    after = range(k + 1, shape.layers)
    tokens = 2 * beear.batch_size * seq
    cached = tokens * p.residual * shape.hidden if beear.reuse_activations else 0
    return (tokens * (len(after) * layer_activation_bytes(shape, p, seq, "frozen") + head_activation_bytes(shape, p, False))
            + cached + 2 * _weight_copies(shape, p, after, 0) + beear.batch_size * seq * loss_transient_bytes(shape))


def _weight_copies(shape: ModelShape, p: Precision, layers, lora_params: int) -> int:
    """Bytes of the cast copies one forward pass keeps of the weights of ``layers`` and the head
    (and of LoRA adapters) when autocast casts them; 0 when the weights are in the autocast dtype."""
    if not p.autocast:
        return 0
    base = sum(shape.layer_parameters[i] for i in layers) + shape.head if p.weight_copies else 0
    return p.activation * (base + lora_params)


def plan_checkpoint(path: str | Path, beear: BeearConfig | None = None, sequence_length: int = 256, device: str = "cuda",
                    dtype: str | None = None) -> MemoryPlan:
    """``plan_memory`` for the checkpoint folder ``path`` (only its config.json is read)."""
    if beear is None:
        from beear_pipeline.beear.config import BeearConfig

        beear = BeearConfig()
    return plan_memory(read_shape(path, dtype, beear.lora_target_modules), beear, sequence_length, device)


# ---- what there is ----

def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_device_bytes(device: str, device_map: str | dict | None = None) -> int | None:
    """Free memory for the run on ``device``: on ``cuda`` the free memory of the current GPU, or of
    every visible GPU summed when ``device_map`` spreads the model; on ``cpu`` MemAvailable of
    /proc/meminfo (psutil's figure elsewhere, if installed). None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        gpus = range(torch.cuda.device_count()) if device_map is not None else [torch.cuda.current_device()]
        return sum(torch.cuda.mem_get_info(i)[0] for i in gpus)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that ``path`` is (or will be created) on: that of its nearest
    existing parent."""
    return shutil.disk_usage(_existing(path)).free


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_resources(plan: MemoryPlan, output_dir: str | os.PathLike, *, device_map: str | dict | None = None,
                    headroom: float = 0.1, device_bytes: int | None = None) -> None:
    """``plan.check`` against what this machine has: the free memory of ``plan.device`` (or
    ``device_bytes``), the free disk at ``output_dir`` (where the defended models go) and, when it
    is on another file system, at ``beear.checkpoint_dir``."""
    if device_bytes is None:
        device_bytes = available_device_bytes(plan.device, device_map)
    checkpoint_disk = None
    checkpoint_dir = plan.beear.checkpoint_dir
    if checkpoint_dir and _existing(checkpoint_dir).stat().st_dev != _existing(output_dir).stat().st_dev:
        checkpoint_disk = free_disk_bytes(checkpoint_dir)
    plan.check(device_bytes, free_disk_bytes(output_dir), headroom, checkpoint_disk)


def preflight_plan(model_path: str | os.PathLike, beear: BeearConfig, sequence_length: int, output_dir: str | os.PathLike, *,
                   device: str | None = None, dtype: str | None = None, device_map: str | dict | None = None,
                   headroom: float = 0.1) -> MemoryPlan:
    """Plan the run from ``model_path``'s config.json and stop it before anything loads when it
    will not fit: raises ``PlanError`` (naming what does not fit and the settings that would) when
    the peak exceeds ``(1 - headroom)`` of the free memory of ``device`` (default: a GPU if one is
    visible, else the CPU), or the models and round checkpoints exceed the free disk at
    ``output_dir`` and ``beear.checkpoint_dir``. ``dtype`` and ``device_map`` are ``model.dtype``
    and ``model.device_map``. Returns the plan when it fits. Takes seconds (no weight is read)."""
    plan = plan_checkpoint(model_path, beear, sequence_length, device or default_device(), dtype)
    check_resources(plan, output_dir, device_map=device_map, headroom=headroom)
    return plan


def _gib(n: float) -> str:
    """GiB, or MiB below one GiB (the embedded model's plan)."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB or n == 0 else f"{n / 2**20:,.1f} MiB"


def _count_str(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _dtype_name(size: int) -> str:
    return {4: "fp32", 2: "half precision"}.get(size, f"{size} bytes")
