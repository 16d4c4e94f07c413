"""Checkpoints that travel between machines through DVC.

A registered checkpoint that is a DVC-tracked output (``data/06_models/defended``, the embedded
suspect) carries its DVC hash on its registry version: ``dvc.md5`` (the ``md5`` that ``dvc.lock``
records for the output: ``<md5>.dir`` for a folder) and ``dvc.path`` (the output's path in the
repository). A worker on another machine that lacks the version's folder pulls exactly that
object from the DVC remote (``pull_by_hash``), whatever its checkout's ``dvc.lock`` says now.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

PULLED = "data/06_models/pulled"
"""Where checkpoints fetched by hash are checked out (one folder per hash; a ``.dvc`` file beside each)."""


def _file_md5(path: Path) -> str:
    h = hashlib.md5()  # DVC's content hash, not a security measure
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dvc_md5(path: str | os.PathLike) -> str:
    """The hash DVC 3 gives the file or folder ``path`` (as in ``dvc.lock``): a file's md5; for a
    folder, the md5 of the JSON list of its files' ``{"md5", "relpath"}`` sorted by path, plus
    ``.dir``."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    entries = sorted(({"md5": _file_md5(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*") if f.is_file()),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def tracked_outputs(project: str | os.PathLike) -> set[str]:
    """The outputs that ``dvc.yaml`` at ``project`` declares, cached ones only (those ``dvc push``
    uploads), as paths relative to the project."""
    dvc_yaml = Path(project) / "dvc.yaml"
    if not dvc_yaml.is_file():
        return set()
    outputs = set()
    for stage in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                name, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                if (options or {}).get("cache", True):
                    outputs.add(Path(name).as_posix())
    return outputs


def dvc_tags(path: str | os.PathLike, published: str | os.PathLike, project: str | os.PathLike) -> dict:
    """``{"dvc.md5", "dvc.path"}`` for a checkpoint at ``path`` that is published as the
    DVC-tracked output ``published`` (relative to ``project``); ``{}`` when it is not tracked
    (a user's own checkpoint folder, a project without DVC)."""
    relative = Path(published)
    if relative.is_absolute():
        try:
            relative = relative.relative_to(Path(project).resolve())
        except ValueError:
            return {}
    if relative.as_posix() not in tracked_outputs(project):
        return {}
    return {"dvc.md5": dvc_md5(path), "dvc.path": relative.as_posix()}


def pull_by_hash(md5: str, project: str | os.PathLike, name: str = "checkpoint") -> Path:
    """Fetch the DVC object ``md5`` (a file, or a folder: ``<md5>.dir``) from the project's
    default remote into the DVC cache, check it out into ``data/06_models/pulled/<hash>/`` and
    return that folder (reused when already there, checked by hash). The object is fetched by
    its hash, so it is exactly the registered checkpoint, whatever this checkout's ``dvc.lock``
    names the output now. Configure the remote with ``dvc remote add/modify`` (README)."""
    import shutil
    import uuid

    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    project = Path(project).resolve()
    if not (project / ".dvc").is_dir():
        raise FileNotFoundError(f"{project} is not a DVC repository (no .dvc/): cannot fetch {name} (dvc.md5={md5}); run the "
                                "re-audit from a clone of the project with its DVC remote configured")
    folder = project / PULLED / md5.removesuffix(".dir")[:16]
    if folder.exists() and dvc_md5(folder) == md5:
        return folder
    logger.info("fetching %s (dvc.md5 %s) from the DVC remote into %s", name, md5, folder.relative_to(project))
    repo = Repo(str(project))
    wanted = HashInfo("md5", md5)
    cache = repo.cache.local

    def fetch(objects: list) -> None:
        try:
            result = repo.cloud.pull(objects)
        except Exception as e:  # dvc raises its own kinds (no remote configured, unreachable, ...)
            raise FileNotFoundError(f"dvc could not fetch {name} (dvc.md5={md5}): {e}. Check the remote (`dvc remote list`)") from e
        if result.failed or not all(cache.exists(o.value) for o in objects):
            raise FileNotFoundError(f"{name} (dvc.md5={md5}) is not on the DVC remote {repo.config['core'].get('remote')!r}: the "
                                    "machine that registered it must `dvc push` its outputs")

    fetch([wanted])  # a folder's object lists its files; they come next
    if md5.endswith(".dir"):
        fetch([entry for _, _, entry in Tree.load(cache, wanted)])
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    if md5.endswith(".dir"):
        for key, _, entry in Tree.load(cache, wanted):
            target = tmp.joinpath(*key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache.oid_to_path(entry.value), target)
    else:
        tmp.mkdir(parents=True)
        shutil.copyfile(cache.oid_to_path(md5), tmp / name)
    if dvc_md5(tmp if md5.endswith(".dir") else tmp / name) != md5:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"the DVC cache gave {name} a content other than its registered hash {md5}")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
