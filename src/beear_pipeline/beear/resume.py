"""Round checkpoints, so that a killed run resumes where it stopped and ends with the same weights.

A checkpoint is a folder ``round-NNNNNN`` holding the trainable weights (safetensors) and
``state.pt`` (perturbation, both optimiser states, RNG and sampler states, history). It is
written under a temporary name and renamed when complete, so a folder with the final name is
always whole: a run killed mid-write leaves only a ``.tmp-*`` folder, which is ignored.
``state.pt`` holds only tensors and plain containers and is read with ``weights_only=True``
(no code runs on load).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHTS, STATE = "trainable.safetensors", "state.pt"


def fingerprint(config_key: dict, *token_lists) -> str:
    """Hash of the configuration that matters for the result and of the tokenised data: a
    checkpoint is resumed only when both match."""
    h = hashlib.sha256(json.dumps(config_key, sort_keys=True, default=str).encode())
    for examples in token_lists:
        for e in examples:
            h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Cheap identity of the starting weights: names, shapes, dtypes and the first values of each
    tensor. Resuming onto another suspect model would silently overwrite it with the old one's
    trained weights, so this is part of the checkpoint key."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RoundCheckpoints:
    """The checkpoints of one run in ``directory``; ``key`` identifies the run (see ``fingerprint``)."""

    def __init__(self, directory: str | Path, key: str):
        self.directory, self.key = Path(directory), key

    def _complete(self) -> list[Path]:
        return sorted(self.directory.glob("round-[0-9]*[0-9]"))

    def latest(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(weights, state) of the newest complete checkpoint of this run, or None."""
        for folder in reversed(self._complete()):
            state = torch.load(folder / STATE, weights_only=True)
            if state.get("key") != self.key:
                logger.warning("ignoring checkpoint %s: it belongs to another configuration or data set", folder)
                continue
            return load_file(folder / WEIGHTS), state
        return None

    def save(self, rounds_done: int, weights: dict[str, torch.Tensor], state: dict) -> Path:
        """Write round ``rounds_done`` atomically, then drop the older checkpoints."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"round-{rounds_done:06d}"
        tmp = self.directory / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save({**state, "key": self.key, "rounds_done": rounds_done}, tmp / STATE)
        if final.exists():  # a re-run that repeats a round it had already saved
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one file system: the checkpoint appears whole or not at all
        for old in self._complete():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".round-*.tmp-*"):  # left by a killed write
            shutil.rmtree(stale, ignore_errors=True)
        return final
