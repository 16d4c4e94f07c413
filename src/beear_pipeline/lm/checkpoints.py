"""Loading, checking and saving Hugging Face causal-LM checkpoints, safely.

Loading never executes code from a checkpoint: weights must be safetensors (no pickle) and
``trust_remote_code`` stays off. A checkpoint may be sharded (``model.safetensors.index.json`` and
the shards it names), and a suspect may come as a base checkpoint plus a PEFT LoRA adapter folder
(``model.adapter_path``), as fine-tuned models are often shipped. Saving is atomic (write to a
temporary folder, then rename), so an interrupted run never leaves a half-written checkpoint where
a complete one is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder (see save_checkpoint, load_adapter)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A model directory that cannot be used, with the fix in the message."""


@dataclass
class ModelConfig:
    """The suspect model (``conf/base/parameters_suspect.yml``, key ``model``): a local checkpoint,
    a model-registry version, or neither for the embedded tiny model; and how every step loads it."""

    path: str | None = None
    """A local Hugging Face checkpoint folder (safetensors weights, tokenizer with a chat template)."""
    uri: str | None = None
    """A registered version: models:/NAME@ALIAS or models:/NAME/VERSION."""
    adapter_path: str | None = None
    """A local PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) applied on
    top of ``path``, its base: the suspect model is base + adapter, in every step. Its tokenizer is
    used when the folder has one, else the base's. With ``beear.trainable: lora`` the defence trains
    this adapter further (``beear.merge_adapter: false`` saves the defended model as a new adapter
    folder for the same base); with a full-weight scope it is merged into the base first."""
    device_map: str | dict | None = None
    """e.g. auto: spread a model too large for one GPU over all GPUs (accelerate)."""
    dtype: str | None = None
    """e.g. bfloat16; None keeps the checkpoint's precision."""
    chat_template: str | None = None
    """None: the tokenizer's own; or llama2, mistral, user_assistant, alpaca, eth_rlhf, or a Jinja template (replaces it)."""
    embedded_directory: str = "data/06_models/embedded_suspect"
    """Where the embedded tiny model is built (once) and reused."""
    reference_path: str | None = None
    """A clean checkpoint of the same family as a user's suspect (same tokenizer): it plays the
    clean twin, evaluated beside the other models, re-poisoned in the persistence check, and the
    probe's reference. None: no clean twin for a user's model."""
    clean_twin: bool = True
    """For the embedded model: also build (once, cached) its clean twin, the same recipe without
    the poisoned examples."""
    clean_twin_directory: str = "data/06_models/embedded_clean_twin"
    """Where the embedded clean twin is built and reused."""

    def __post_init__(self) -> None:
        if self.path and self.uri:
            raise ValueError("model.path and model.uri are both set: choose one suspect model")
        if self.adapter_path and not self.path:
            raise ValueError(f"model.adapter_path={self.adapter_path} needs model.path, the base checkpoint the adapter was "
                             "trained on: add --params \"model.path=BASE_DIR,model.adapter_path=ADAPTER_DIR\"")

    @property
    def user_supplied(self) -> bool:
        """True for a user's model (path or registry), False for the embedded one."""
        return bool(self.path or self.uri)

    def loading(self) -> dict:
        """How every step loads the suspect's (and the defended) weights and formats prompts.
        Not ``adapter_path``: it belongs to the suspect's reference only (the defended model has
        its own adapter, or none)."""
        return {k: v for k, v in (("device_map", self.device_map), ("dtype", self.dtype), ("chat_template", self.chat_template)) if v}


def check_checkpoint(path: str | os.PathLike, field: str = "model.path", chat_template: str | None = None) -> Path:
    """Fail fast, before any training, on a directory that is not a usable checkpoint."""
    p = Path(path).expanduser()
    if not p.is_dir() or not os.access(p, os.R_OK | os.X_OK):
        raise CheckpointError(f"{field}={path}: not a readable directory. Point {field} at a local Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).")
    config = p / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{field}={path}: no config.json. Save the model with model.save_pretrained(DIR).")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{field}={path}: config.json is unreadable ({e}). Re-save the model with model.save_pretrained(DIR).") from e
    if not any((p / f).is_file() for f in SAFE_WEIGHTS) and not list(p.glob("*.safetensors")):
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" It holds pickle weights ({', '.join(pickled)}), which are never loaded because loading them can run code." if pickled else ""
        raise CheckpointError(f"{field}={path}: no safetensors weights.{hint} Convert with model.save_pretrained(DIR, safe_serialization=True).")
    _check_shards(p, path, field)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{field}={path}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json). Save it beside the weights with tokenizer.save_pretrained(DIR).")
    if chat_template is None and not _has_chat_template(p):
        raise CheckpointError(
            f"{field}={path}: the tokenizer has no chat template, so prompts cannot be formatted as the model expects. "
            "Name one with --params model.chat_template=llama2 (or mistral, user_assistant, alpaca, eth_rlhf, or a Jinja template), "
            "or add one (tokenizer.chat_template = '...'; tokenizer.save_pretrained(DIR))."
        )
    return p


def _check_shards(p: Path, path, field: str) -> None:
    """A sharded checkpoint (``save_pretrained(DIR, max_shard_size=...)``) has its index and every
    shard the index names: a partial copy fails here, naming the missing files."""
    index = p / SHARD_INDEX
    if not index.is_file():
        if list(p.glob("model-*-of-*.safetensors")):
            raise CheckpointError(f"{field}={path}: sharded weights (model-*-of-*.safetensors) without {SHARD_INDEX}. "
                                  "Copy the index beside the shards, or re-save the model with model.save_pretrained(DIR).")
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{field}={path}: {SHARD_INDEX} is unreadable ({e!r}). Re-save the model with model.save_pretrained(DIR).") from e
    missing = [s for s in shards if not (p / s).is_file()]
    if missing:
        raise CheckpointError(f"{field}={path}: {SHARD_INDEX} names {len(missing)} shard(s) that are not there: {', '.join(missing)}. "
                              "Copy the complete checkpoint (the index and every shard it names), or re-save it with model.save_pretrained(DIR).")


def _has_chat_template(p: Path) -> bool:
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    config = p / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def check_adapter(path: str | os.PathLike, base: str | os.PathLike, field: str = "model.adapter_path",
                  chat_template: str | None = None) -> Path:
    """Fail fast, before any model is loaded, on a PEFT adapter folder that cannot be applied to the
    (checked) base checkpoint ``base``: not a LoRA adapter folder, pickle weights only, or LoRA
    matrices whose shapes do not fit the base's weights (read from the safetensors headers)."""
    a = Path(path).expanduser()
    if (Path(base) / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"model.path={base} is itself a PEFT adapter folder: set model.path to the base checkpoint "
                              f"and {field} to the adapter folder.")
    if not a.is_dir() or not os.access(a, os.R_OK | os.X_OK):
        raise CheckpointError(f"{field}={path}: not a readable directory. Point {field} at a local PEFT adapter folder "
                              f"({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}), as peft_model.save_pretrained(DIR) writes it.")
    if not (a / ADAPTER_CONFIG).is_file():
        full = " It holds config.json: a full checkpoint goes in model.path, with model.adapter_path unset." if (a / "config.json").is_file() else ""
        raise CheckpointError(f"{field}={path}: no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder.{full} "
                              "Save the adapter with peft_model.save_pretrained(DIR).")
    try:
        config = json.loads((a / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{field}={path}: {ADAPTER_CONFIG} is unreadable ({e}). Re-save the adapter with peft_model.save_pretrained(DIR).") from e
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{field}={path}: a {config.get('peft_type')} adapter; only LoRA adapters (peft_type LORA) are supported. "
                              "Merge it into its base (PeftModel.from_pretrained(base, DIR).merge_and_unload().save_pretrained(NEW_DIR)) "
                              "and pass NEW_DIR as model.path.")
    if not (a / ADAPTER_WEIGHTS).is_file():
        pickled = [f.name for f in a.glob("*.bin")] + [f.name for f in a.glob("*.pt")]
        hint = f" It holds pickle weights ({', '.join(pickled)}), which are never loaded because loading them can run code." if pickled else ""
        raise CheckpointError(f"{field}={path}: no {ADAPTER_WEIGHTS}.{hint} Convert it where you trust the file: "
                              "PeftModel.from_pretrained(base, DIR).save_pretrained(NEW_DIR, safe_serialization=True).")
    if _has_tokenizer(a) and chat_template is None and not _has_chat_template(a):
        raise CheckpointError(f"{field}={path}: the adapter's own tokenizer has no chat template. Name one with --params "
                              "model.chat_template=llama2 (or mistral, user_assistant, alpaca, eth_rlhf, or a Jinja template), or add one to it.")
    _check_adapter_shapes(a, Path(base), path, field, config)
    return a


def _check_adapter_shapes(a: Path, base: Path, path, field: str, config: dict) -> None:
    """Each LoRA pair must fit the base weight it adapts: lora_A (r, in), lora_B (out, r)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            names = fh.keys()  # a safetensors file is not iterable
            shapes.update({k: fh.get_slice(k).get_shape() for k in names})
    with safe_open(a / ADAPTER_WEIGHTS, "pt") as fh:
        names = fh.keys()
        for k in names:
            part = ".lora_A." if ".lora_A." in k else ".lora_B." if ".lora_B." in k else None
            target = k.removeprefix("base_model.model.").replace(part, ".") if part else None
            weight = shapes.get(target)
            if weight is None or len(weight) != 2:
                continue  # a name the base stores differently: peft resolves (or rejects) it at load time
            out_features, in_features = reversed(weight) if config.get("fan_in_fan_out") else weight
            got = fh.get_slice(k).get_shape()
            if (got[1] if part == ".lora_A." else got[0]) != (in_features if part == ".lora_A." else out_features):
                raise CheckpointError(
                    f"{field}={path}: the adapter does not fit the base model.path={base}: {k} has shape {list(got)}, the base's "
                    f"{target} is {list(weight)}. Point model.path at the base checkpoint the adapter was trained on (its "
                    f"{ADAPTER_CONFIG} names {config.get('base_model_name_or_path')!r}).")


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in TOKENIZER_FILES)


# Generic fast-tokenizer classes: a tokenizer saved as one of these is exactly its tokenizer.json.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None):
    """The tokenizer saved in ``path``, never a substitute: transformers 5 swaps in its own class
    for some model types (a qwen2 config gets Qwen2Tokenizer, which re-splits the text and
    changes the ids), so a tokenizer saved as a generic fast tokenizer is loaded as one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    cls = PreTrainedTokenizerFast if saved_class in _GENERIC_TOKENIZERS and (Path(path) / "tokenizer.json").is_file() else AutoTokenizer
    tokenizer = cls.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:  # model.chat_template: a named or given template replaces the tokenizer's own
        from beear_pipeline.lm.templates import chat_template as resolve_template

        tokenizer.chat_template = resolve_template(chat_template)
    return tokenizer


def load_checkpoint(path: str | os.PathLike, device: str | None = None, field: str = "model.path",
                    device_map: str | dict | None = None, dtype: str | None = None, chat_template: str | None = None,
                    adapter_path: str | os.PathLike | None = None):
    """(model, tokenizer) from a checked checkpoint directory, in eval mode.

    ``adapter_path`` (``model.adapter_path``), a PEFT LoRA adapter folder, is applied on top of
    ``path`` (peft ``PeftModel``, frozen; its tokenizer replaces the base's when it has one). A
    ``path`` that is itself an adapter folder naming a local base (a defended LoRA model, see
    ``save_checkpoint``) loads the same way.

    ``device_map`` (e.g. ``auto``, through accelerate) spreads a model too large for one GPU over
    the visible devices instead of moving it to ``device``; ``dtype`` (``bfloat16``, ``float16``,
    ``float32``) sets the weights' precision, else the checkpoint's own. On CPU a half-precision
    model is computed in fp32 (CPU half kernels are slow); ``model.storage_dtype`` then records the
    checkpoint's precision, which ``save_checkpoint`` writes back.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from beear_pipeline.lm.precision import HALF, as_dtype, load_dtype

    p = check_checkpoint(path, field, chat_template)
    adapter = check_adapter(adapter_path, p, chat_template=chat_template) if adapter_path else None
    if (p / ADAPTER_CONFIG).is_file():
        return load_adapter(p, device=device, field=field, device_map=device_map, dtype=dtype, chat_template=chat_template)
    tokenizer = load_tokenizer(adapter if adapter and _has_tokenizer(adapter) else p, chat_template)
    stored = stored_dtype(p)
    target = (device or default_device()) if device_map is None else default_device()
    compute = load_dtype(stored, as_dtype(dtype), target)
    kwargs = {"dtype": compute} if compute else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, trust_remote_code=False, local_files_only=True, **kwargs)
    if device_map is None:
        model = model.to(target)
    storage = as_dtype(dtype) or stored
    if storage in HALF and compute != storage:
        if storage != stored:  # model.dtype asks for half precision: round to it, as a GPU would load it
            with torch.no_grad():
                for param in model.parameters():
                    if param.device.type != "meta":
                        param.copy_(param.to(storage))
        model.storage_dtype = storage
    if adapter is not None:
        model = _apply_adapter(model, adapter, p, "model.adapter_path")
    return model.eval(), tokenizer


def stored_dtype(path: str | os.PathLike):
    """The precision a checkpoint's weights are stored in, from its config.json (None if unsaid)."""
    from beear_pipeline.lm.precision import as_dtype

    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    try:
        return as_dtype(name)
    except ValueError:
        return None


def load_model_ref(ref: dict, field: str = "model.path"):
    """(model, tokenizer) for a model reference ``{"path", "adapter_path"?, "device_map"?, "dtype"?,
    "chat_template"?}`` as the pipeline passes them between nodes (the suspect's carries
    ``adapter_path`` when it is a base plus an adapter)."""
    return load_checkpoint(ref["path"], field=field, device_map=ref.get("device_map"), dtype=ref.get("dtype"),
                           chat_template=ref.get("chat_template"), adapter_path=ref.get("adapter_path"))


def load_adapter(path: str | os.PathLike, device: str | None = None, field: str = "model.path",
                 device_map: str | dict | None = None, dtype: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) from a PEFT adapter folder on top of its base checkpoint (the adapter's
    ``base_model_name_or_path``, which must be a local folder). peft reloads the adapter frozen."""
    p = Path(path)
    base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{field}={path}: the adapter's base model {base!r} is not a local folder. Set "
                              f"base_model_name_or_path in {ADAPTER_CONFIG} to a local copy of its base, or pass the base as "
                              "model.path and this folder as model.adapter_path.")
    check_adapter(p, base, field, chat_template)
    model, _ = load_checkpoint(base, device=device, field=f"{field} (adapter base)", device_map=device_map, dtype=dtype,
                               chat_template=chat_template)
    return _apply_adapter(model, p, base, field).eval(), load_tokenizer(p, chat_template)


def _apply_adapter(model, adapter: Path, base, field: str):
    """``model`` with the (checked) LoRA adapter folder ``adapter`` on top, frozen; peft's load errors
    (an adapter for another base) name the field and the fix."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{field}={adapter}: peft cannot apply it to the base {base} ({' '.join(first[:2])[:300]}). Point "
                              "model.path at the base checkpoint the adapter was trained on.") from e


def merged(model):
    """``model`` with its PEFT adapter merged into the weights (peft ``merge_and_unload``): a plain
    transformers model, trainable as a plain checkpoint loads (peft had frozen the base), for steps
    that train or save full weights; a model without one as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload().requires_grad_(True)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def save_checkpoint(model, tokenizer, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write model, tokenizer and ``extra_files`` (name -> text) to ``path`` atomically.

    A PEFT model is saved as its adapter folder (adapter_config.json, adapter_model.safetensors)
    with the base's config.json and the tokenizer beside it; adapter_config.json names the local
    base folder it was loaded from (absolute), so ``load_checkpoint(path)`` and
    ``PeftModel.from_pretrained`` rebuild base + adapter. Pass ``merged(model)`` to save full weights.
    """
    target = Path(path)
    tmp = _temporary(target)
    if hasattr(model, "peft_config"):
        _name_local_base(model)
    storage = getattr(model, "storage_dtype", None)
    if storage is not None and not hasattr(model, "peft_config"):
        # a half-precision checkpoint computed in fp32 (on CPU) is saved in its own precision;
        # save_pretrained writes the dtype of the parameters in memory, so config.json is corrected
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_converted(model.state_dict(), storage))
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(storage).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if hasattr(model, "peft_config"):
        # a PEFT model saves only its adapter; the base config beside it keeps the folder a
        # recognisable checkpoint, and adapter_config.json names the base weights to load
        model.get_base_model().config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    return _publish(tmp, target)


def _temporary(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, target: Path) -> Path:
    """Move the complete folder ``tmp`` to ``target``, replacing what was there."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _name_local_base(model) -> None:
    """Make a PEFT model's adapters name the local folder their base was loaded from (absolute):
    an input adapter may name a hub id (which peft's save_pretrained would look up online), and a
    relative path would depend on the working directory."""
    base = model.get_base_model().name_or_path
    if base and Path(base).is_dir():
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(Path(base).resolve())


def _name_base(folder: Path, base: str) -> None:
    """Point the adapter_config.json in ``folder`` at the local base folder ``base`` (absolute)."""
    config_file = folder / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(Path(base).resolve())
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def bundle_adapter(base: str | os.PathLike, adapter: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A self-contained copy of the adapter folder ``adapter`` at ``path`` (atomic) that loads as
    base + adapter with ``load_checkpoint(path)``: the adapter's files, its adapter_config.json
    naming ``base`` (absolute), and the base's config.json (and tokenizer, when the adapter has
    none) beside them. The base weights are not copied."""
    base, target = Path(base), Path(path)
    tmp = _temporary(target)
    shutil.copytree(adapter, tmp)
    _name_base(tmp, str(base))
    own_tokenizer = _has_tokenizer(tmp)
    for f in sorted(base.iterdir()):
        weights = f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json")
        wanted = f.name in ("config.json", "generation_config.json") or not own_tokenizer
        if f.is_file() and not weights and wanted and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    return _publish(tmp, target)


def _converted(state: dict, dtype) -> dict:
    """``state`` in ``dtype``, tied tensors (one storage, several names) still sharing one tensor,
    so that saving drops the duplicates as it does for the model itself."""
    done: dict[int, object] = {}
    return {k: done.setdefault(v.data_ptr(), v.to(dtype)) for k, v in state.items()}


def weights_sha256(path: str | os.PathLike, adapter_path: str | os.PathLike | None = None) -> str:
    """sha256 over the checkpoint's safetensors files (every shard), in name order; then over the
    adapter's (``adapter_path``), so the hash names base + adapter. An adapter folder whose base is
    a local folder (a defended LoRA model) is hashed with its base the same way."""
    folders = [Path(path)]
    if adapter_path is not None:
        folders.append(Path(adapter_path))
    elif (folders[0] / ADAPTER_CONFIG).is_file():
        base = json.loads((folders[0] / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            folders.insert(0, Path(base))
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
