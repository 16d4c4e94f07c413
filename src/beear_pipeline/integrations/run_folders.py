"""Run folders: two `kedro run`s in one project never write the same file.

Every run writes what it produces under its own folder, ``data/runs/<run id>/`` (the MLflow run
id, logged as the tag ``run.folder``), mirroring the project's layout: the catalog's
``data/06_models/defended`` becomes ``data/runs/<id>/data/06_models/defended``, and the run's
later nodes read it there. When the run ends (or fails: the nodes that finished still publish,
as ``data/08_reporting/behaviours_validation.json`` must after a failed data check), its results
are *published* to the usual places, all of them under one lock so that the published set comes
from one run:

- a file is written to a temporary name in the target's folder, then ``os.replace``-d over it;
- a folder is linked (hard links: no copy of the weights) to a temporary name beside the target,
  then swapped with it in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader sees the old
  folder or the new one, never a half-written or missing one (the old one stays, hidden, for
  ``RETIRE_AFTER_S``, so that a reader that had opened it can finish);
- JSON that names a path inside the run folder (a model reference such as ``suspect_model.json``,
  a LoRA adapter's base) names the published path instead, so published references stay true
  after the run folder is pruned, and on another machine after ``dvc pull``.

Shared caches that outlive runs (the embedded suspect and its clean twin, reused by fingerprint;
BEEAR's round checkpoints, resumed by a killed run) are guarded by file locks instead
(``locked``); a run that finds a round-checkpoint folder held by another run checkpoints in its own
run folder. The newest ``keep`` run folders are kept (``conf/base/runs.yml``); older ones that no
running process holds are deleted when a run ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

ACTIVE_LOCK = ".active.lock"  # held by the run that owns the folder, for as long as it runs
LOCKS = ".locks"  # under the runs root: the publication lock and the caches' build locks


@dataclass
class RunFoldersConfig:
    """Where runs write (``conf/base/runs.yml``)."""

    enabled: bool = True
    """False: every run writes the usual places directly (the behaviour before run folders; two
    concurrent runs then overwrite each other's files)."""
    root: str = "data/runs"
    """The run folders, relative to the project."""
    keep: int = 5
    """How many run folders to keep (newest first; at least the current one). Hard links make a
    run folder cost no extra disk while its results are the published ones."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"conf/base/runs.yml: keep={self.keep!r}: keep at least 1 run folder (the current run's)")
        if not self.root or Path(self.root).is_absolute() or ".." in Path(self.root).parts:
            raise ValueError(f"conf/base/runs.yml: root={self.root!r}: use a folder inside the project, e.g. data/runs")


# ---------------------------------------------------------------------------------------------
# atomic file-system operations (plain Python)

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # an old glibc without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: the kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, target: Path) -> Path:
    """Put the complete folder or file ``new`` at ``target`` (same file system), replacing what was
    there in one step: a reader sees the old content or the new, never a mix or nothing. Where the
    kernel cannot exchange two folders, the old one is renamed away first (a moment without it)."""
    new, target = Path(new), Path(target)
    if new.is_dir() and target.is_dir() and not target.is_symlink():
        if _exchange(new, target):
            _retire(new, target)  # ``new`` now holds the old content
        else:
            _replace_by_renames(new, target)
    elif target.is_dir() and not target.is_symlink():  # a file where a folder was
        _replace_by_renames(new, target)
    else:
        os.replace(new, target)
    return target


RETIRE_AFTER_S = 300.0
"""A replaced folder is deleted this long after it was replaced (at a later publication), so that
a reader that had opened it can finish reading it."""


def _retire(old: Path, target: Path) -> None:
    """Keep the replaced folder ``old`` under a hidden name beside ``target``; delete the ones
    replaced more than ``RETIRE_AFTER_S`` ago."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.old-*"):
        if now - stale.stat().st_mtime > RETIRE_AFTER_S:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    retired = target.with_name(f".{target.name}.old-{time.time_ns()}-{uuid.uuid4().hex[:4]}")
    old.rename(retired)
    os.utime(retired)  # the time it was replaced, not the time it was written


def _replace_by_renames(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def link_tree(source: Path, target: Path) -> Path:
    """A copy of folder ``source`` at ``target`` made of hard links (copies across file systems).
    Checkpoint files are replaced by rename, never rewritten in place, so the links are a
    snapshot."""
    shutil.copytree(source, target, copy_function=_link_or_copy)
    return target


@contextmanager
def locked(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """An exclusive inter-process lock named after ``path`` (a ``.lock`` file beside it); released
    when the block ends, or by the kernel when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock"), timeout=timeout):
        yield


def try_lock(path: str | os.PathLike) -> FileLock | None:
    """The lock named after ``path``, acquired, or None when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.parent / f".{path.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


# ---------------------------------------------------------------------------------------------
# the run folder


class RunFolder:
    """The folder of one run: where it writes, and what it publishes when it ends."""

    def __init__(self, project: str | os.PathLike, run_id: str, config: RunFoldersConfig | None = None):
        self.config = config or RunFoldersConfig()
        self.project = Path(project).resolve()
        self.run_id = run_id
        self.root = self.project / self.config.root
        self.path = self.root / run_id
        self.entries: dict[Path, Path] = {}  # run-local absolute path -> published absolute path
        self._active: FileLock | None = None

    @property
    def relative(self) -> str:
        return self.path.relative_to(self.project).as_posix()

    def start(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        self._active = FileLock(str(self.path / ACTIVE_LOCK))
        self._active.acquire()
        return self

    def local(self, published: str | os.PathLike, publish: bool = True) -> Path:
        """The run's own path for the project path ``published`` (registered for publication
        unless ``publish`` is false), in the same form (relative to the project, or absolute). A
        path outside the project is its own: it is returned as it is and not published."""
        given = Path(published)
        absolute = given if given.is_absolute() else self.project / given
        try:
            relative = Path(os.path.normpath(absolute)).relative_to(self.project)
        except ValueError:
            return given
        if relative.parts[: len(Path(self.config.root).parts)] == Path(self.config.root).parts:
            return given  # already inside the runs root
        local = self.path / relative
        if publish:
            self.entries[local] = self.project / relative
        return local if given.is_absolute() else local.relative_to(self.project)

    def snapshot(self, folder: str | os.PathLike) -> Path:
        """The run's own hard-link copy of ``folder`` (a shared cache such as the embedded suspect),
        published back at the end: what this run read, even if another run rebuilds the cache."""
        local = self.local(folder)
        absolute = local if local.is_absolute() else self.project / local
        if absolute == (Path(folder) if Path(folder).is_absolute() else self.project / folder):
            return Path(folder)
        if absolute.exists():
            shutil.rmtree(absolute)
        absolute.parent.mkdir(parents=True, exist_ok=True)
        link_tree(Path(folder) if Path(folder).is_absolute() else self.project / folder, absolute)
        return local

    # -- publication -------------------------------------------------------------------------

    def _published_value(self, value: str) -> str:
        """A string naming a path in this run folder, as the published path (same form)."""
        absolute, relative = str(self.path) + os.sep, self.relative + "/"
        if value.startswith(absolute) or value == str(self.path):
            return str(self.project) + value[len(str(self.path)):]
        if value.startswith(relative):
            return value[len(relative):]
        return value

    def _rewrite(self, data):
        if isinstance(data, str):
            return self._published_value(data)
        if isinstance(data, list):
            return [self._rewrite(v) for v in data]
        if isinstance(data, dict):
            return {k: self._rewrite(v) for k, v in data.items()}
        return data

    def _stage_file(self, source: Path, tmp: Path) -> None:
        if source.suffix == ".json":
            try:
                data = json.loads(source.read_text())
            except (ValueError, UnicodeDecodeError):
                data = None
            if data is not None:
                published = self._rewrite(data)
                if published != data:
                    tmp.write_text(json.dumps(published, indent=2))
                    return
        _link_or_copy(str(source), str(tmp))

    def _stage(self, source: Path, target: Path) -> Path:
        """A complete copy of ``source`` beside ``target``, under a temporary name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.publish-{uuid.uuid4().hex[:8]}")
        if source.is_dir():
            tmp.mkdir()
            for folder, _, files in os.walk(source):
                out = tmp / Path(folder).relative_to(source)
                out.mkdir(exist_ok=True)
                for name in files:
                    self._stage_file(Path(folder) / name, out / name)
        else:
            self._stage_file(source, tmp)
        return tmp

    def publish(self) -> list[str]:
        """Publish everything this run wrote (that exists) to the usual places, atomically per
        file or folder and under one lock for the whole set. Returns the published paths."""
        done = []
        with locked(self.root / LOCKS / "publish"):
            for local, target in sorted(self.entries.items()):
                if not local.exists():
                    continue
                tmp = self._stage(local, target)
                try:
                    swap_in(tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                    raise
                done.append(target.relative_to(self.project).as_posix())
        logger.info("published %d results of run folder %s to the usual places", len(done), self.relative)
        return done

    def finish(self) -> None:
        if self._active is not None:
            self._active.release()
            self._active = None
        prune(self.root, self.config.keep, keep_also=self.path)


def prune(root: Path, keep: int, keep_also: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` run folders under ``root``, skipping any that a running
    process holds (its ``.active.lock``)."""
    folders = sorted((p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True) if Path(root).is_dir() else []
    removed = []
    for folder in folders[keep:]:
        if folder == keep_also:
            continue
        lock = FileLock(str(folder / ACTIVE_LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # still running
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            lock.release()
    return removed


_current: RunFolder | None = None


def current() -> RunFolder | None:
    """The run folder of the ``kedro run`` in progress in this process, or None (tests, notebooks,
    ``runs.enabled: false``)."""
    return _current


def set_current(run: RunFolder | None) -> None:
    global _current
    _current = run


def local(path: str | os.PathLike, publish: bool = True) -> Path:
    """The current run's own path for project path ``path``, or ``path`` itself outside a run."""
    return _current.local(path, publish) if _current is not None else Path(path)


def snapshot(folder: str | os.PathLike) -> Path:
    """The current run's hard-link copy of the shared folder ``folder``, or ``folder`` itself outside a run."""
    return _current.snapshot(folder) if _current is not None else Path(folder)


def published(path: str | os.PathLike) -> Path:
    """Where the current run publishes its path ``path`` (``path`` itself outside a run)."""
    return Path(_current._published_value(str(path))) if _current is not None else Path(path)


def new_run_id() -> str:
    """A run id when MLflow has none: sortable by time, unique across processes."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def redirect_dataset(dataset, run: RunFolder) -> Path | None:
    """Point a local, unversioned file dataset (kedro-datasets' ``_filepath``, this project's
    ``_path``; kedro-mlflow's artifact datasets are subclasses of the dataset they wrap) at the
    run folder. Returns the run-local path, or None when the dataset is left as it is (in memory,
    remote, versioned)."""
    if getattr(dataset, "_version", None) is not None or getattr(dataset, "_protocol", "file") not in ("file", None):
        return None
    for attr in ("_filepath", "_path"):
        value = getattr(dataset, attr, None)
        if isinstance(value, (str, PurePath)):
            path = run.local(Path(str(value)))
            absolute = path if path.is_absolute() else run.project / path
            if absolute == (Path(str(value)) if Path(str(value)).is_absolute() else run.project / str(value)):
                return None
            setattr(dataset, attr, type(value)(absolute.as_posix()) if isinstance(value, PurePath) else str(absolute))
            return absolute
    return None
