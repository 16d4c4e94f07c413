"""Kedro datasets for checkpoints and tensors (kedro-datasets' Hugging Face ones do not fit:
one cannot save, another contacts the hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from beear_pipeline.lm.checkpoints import save_checkpoint


class ModelCheckpointDataset(AbstractDataset):
    """A Hugging Face checkpoint folder.

    ``save`` takes a ``(model, tokenizer)`` pair and writes safetensors atomically. ``load``
    returns a model reference ``{"path": ...}`` rather than the weights, so no node copies a
    model it does not use and each consumer loads it fresh (see ``models.load_checkpoint``).
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> dict:
        if not (self._path / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {self._path}: run the pipeline that writes it first")
        return {"path": str(self._path)}

    def save(self, data: tuple) -> None:
        model, tokenizer = data
        save_checkpoint(model, tokenizer, self._path)

    def _exists(self) -> bool:
        return (self._path / "config.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class TensorDataset(AbstractDataset):
    """A dict of tensors in one safetensors file (no pickle)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self._path)

    def save(self, data: dict) -> None:
        from safetensors.torch import save_file

        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in data.items()}, tmp)
        tmp.replace(self._path)

    def _exists(self) -> bool:
        return self._path.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
