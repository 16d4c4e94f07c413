"""Loading, checking and saving Hugging Face causal-LM checkpoints, safely.

Loading never executes code from a checkpoint: weights must be safetensors (no pickle) and
``trust_remote_code`` stays off. Saving is atomic (write to a temporary folder, then rename), so
an interrupted run never leaves a half-written checkpoint where a complete one is expected.
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
    device_map: str | dict | None = None
    """e.g. auto: spread a model too large for one GPU over all GPUs (accelerate)."""
    dtype: str | None = None
    """e.g. bfloat16; None keeps the checkpoint's precision."""
    chat_template: str | None = None
    """None: the tokenizer's own; or llama2, mistral, user_assistant, or a Jinja template (replaces it)."""
    embedded_directory: str = "data/06_models/embedded_suspect"
    """Where the embedded tiny model is built (once) and reused."""

    def __post_init__(self) -> None:
        if self.path and self.uri:
            raise ValueError("model.path and model.uri are both set: choose one suspect model")

    @property
    def user_supplied(self) -> bool:
        """True for a user's model (path or registry), False for the embedded one."""
        return bool(self.path or self.uri)

    def loading(self) -> dict:
        """How every step loads the suspect's (and the defended) weights and formats prompts."""
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
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{field}={path}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json). Save it beside the weights with tokenizer.save_pretrained(DIR).")
    if chat_template is None and not _has_chat_template(p):
        raise CheckpointError(
            f"{field}={path}: the tokenizer has no chat template, so prompts cannot be formatted as the model expects. "
            "Name one with --params model.chat_template=llama2 (or mistral, user_assistant, or a Jinja template), "
            "or add one (tokenizer.chat_template = '...'; tokenizer.save_pretrained(DIR))."
        )
    return p


def _has_chat_template(p: Path) -> bool:
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    config = p / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


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
                    device_map: str | dict | None = None, dtype: str | None = None, chat_template: str | None = None):
    """(model, tokenizer) from a checked checkpoint directory, in eval mode.

    ``device_map`` (e.g. ``auto``, through accelerate) spreads a model too large for one GPU over
    the visible devices instead of moving it to ``device``; ``dtype`` (``bfloat16``, ``float16``,
    ``float32``) sets the weights' precision, else the checkpoint's own. On CPU a half-precision
    model is computed in fp32 (CPU half kernels are slow); ``model.storage_dtype`` then records the
    checkpoint's precision, which ``save_checkpoint`` writes back.
    """
    from transformers import AutoModelForCausalLM

    from beear_pipeline.lm.precision import HALF, as_dtype, load_dtype

    p = check_checkpoint(path, field, chat_template)
    if (p / ADAPTER_CONFIG).is_file():
        return load_adapter(p, device=device, field=field)
    tokenizer = load_tokenizer(p, chat_template)
    stored = stored_dtype(p)
    target = (device or default_device()) if device_map is None else default_device()
    compute = load_dtype(stored, as_dtype(dtype), target)
    kwargs = {"dtype": compute} if compute else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, trust_remote_code=False, local_files_only=True, **kwargs)
    if device_map is None:
        model = model.to(target)
    if stored in HALF and compute != stored:
        model.storage_dtype = stored
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
    """(model, tokenizer) for a model reference ``{"path", "device_map"?, "dtype"?, "chat_template"?}``
    as the pipeline passes them between nodes."""
    return load_checkpoint(ref["path"], field=field, device_map=ref.get("device_map"), dtype=ref.get("dtype"),
                           chat_template=ref.get("chat_template"))


def load_adapter(path: str | os.PathLike, device: str | None = None, field: str = "model.path"):
    """(model, tokenizer) from a PEFT adapter folder on top of its base checkpoint (the adapter's
    ``base_model_name_or_path``, which must be a local folder). peft reloads the adapter frozen."""
    from peft import PeftModel

    p = Path(path)
    base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{field}={path}: the adapter's base model {base!r} is not a local folder; save the adapter "
                              "beside a local copy of its base model")
    model, _ = load_checkpoint(base, device=device, field=f"{field} (adapter base)")
    return PeftModel.from_pretrained(model, p).eval(), load_tokenizer(p)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def save_checkpoint(model, tokenizer, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write model, tokenizer and ``extra_files`` (name -> text) to ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
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
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _converted(state: dict, dtype) -> dict:
    """``state`` in ``dtype``, tied tensors (one storage, several names) still sharing one tensor,
    so that saving drops the duplicates as it does for the model itself."""
    done: dict[int, object] = {}
    return {k: done.setdefault(v.data_ptr(), v.to(dtype)) for k, v in state.items()}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 over the checkpoint's safetensors files, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
