"""A run directory you can trust (docs/design.md, "Runs you can trust").

Three rules every app applies to its run directory:

* **One writer.** An exclusive ``flock`` on ``<run>/.lock`` is taken before anything in the
  directory is written (Hydra's ``.hydra/`` snapshot included: the apps set
  ``hydra.output_subdir: null`` and write it here, after the checks). A second process is refused
  with one line naming the holder; the lock dies with its process, so a SIGKILL leaves none behind.
* **The same work or none.** A run records its whole resolved config in ``metrics.json``
  (``config``). A directory that already holds work (a checkpoint, or a completed result) is only
  continued or skipped when the requested config equals the recorded one, key by key, except the
  few keys in ``SETTINGS_ALLOWED`` that cannot change a number (logging, progress, workers);
  everything else is denied by default. A refusal names the keys that differ and writes nothing.
* **Completed means on disk.** A result says ``completed`` only after every artifact it promises
  is durable, and lists them in a manifest (name, size, sha256) written with it, last. Readers
  trust a completed run only through ``verify_manifest``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import RepOptError
from .io import read_json, sha256_file

LOCK_FILE = ".lock"
SHARED_SEARCHES = "searches"  # <sweep>/searches/<hash>/: stage-one runs shared by the jobs of a sweep (not jobs)
# Keys that may differ between the run on disk and the one requested: none of them changes what is
# trained or written. Matched as a dotted sub-path, so "logger" covers "hs.logger.name" too.
SETTINGS_ALLOWED = (
    "resume",
    "run_dir",
    "progress",
    "progress_every_s",
    "logger",
    "data.num_workers",
    "data.cache_dir",
    "data.download",
    "data.verify_checksums",
)


class RunRefused(RepOptError):
    """The run directory cannot be used for this run; nothing in it was changed."""


# ------------------------------------------------------------------ settings


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}`` of a nested dict (lists stay values)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def is_allowed(key: str, allowed: Iterable[str]) -> bool:
    padded = f".{key}."
    return any(f".{a}." in padded for a in allowed)


def without_allowed(config: Mapping, allowed: Iterable[str] = SETTINGS_ALLOWED, prefix: str = "") -> dict:
    """``config`` less the keys that may differ between a run and its resume (for records that must not
    change when a run is resumed, like the scales file's provenance)."""
    allowed = tuple(allowed)
    out = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_allowed(name, allowed):
            continue
        out[key] = without_allowed(value, allowed, name) if isinstance(value, Mapping) else value
    return out


def changed_settings(
    saved: Mapping | None, current: Mapping | None, defaults: Mapping | None = None, allowed: Iterable[str] = SETTINGS_ALLOWED
) -> list[str]:
    """``key: saved -> current`` for every setting that differs, default deny.

    A key the saved config lacks (written before the setting existed) counts as its value in
    ``defaults``; a key only the saved config has (a setting since removed) is ignored."""
    if not saved or not current:
        return []
    allowed = tuple(allowed)
    old, new, base = flatten(saved), flatten(current), flatten(defaults or {})
    out = []
    for key, value in new.items():
        if is_allowed(key, allowed):
            continue
        before = old[key] if key in old else base.get(key)
        if before != value:
            out.append(f"{key}: {before!r} -> {value!r}")
    return out


# ------------------------------------------------------------------ manifest


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def make_manifest(run_dir: Path, names: Iterable[str]) -> dict[str, dict]:
    """The manifest of the files ``names`` in ``run_dir`` (each must exist: a promise kept)."""
    manifest = {}
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            raise RepOptError(f"{path} is missing although the run promises it; the run is not complete")
        manifest[name] = file_record(path)
    return manifest


def verify_manifest(run_dir: Path, manifest: Mapping | None, *, hashes: bool = True) -> list[str]:
    """What is wrong with the files a completed run lists (empty: all there, same size and sha256)."""
    if not manifest:
        return ["no manifest (a run from before manifests, or one that never completed)"]
    problems = []
    for name, record in manifest.items():
        path = Path(run_dir) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {record.get('size')}")
        elif hashes and sha256_file(path) != record.get("sha256"):
            problems.append(f"{name} differs from the file the run wrote (sha256)")
    return problems


# ------------------------------------------------------------------ one writer


class RunLock:
    """An exclusive, process-lifetime lock on a run directory (``fcntl.flock`` on ``<run>/.lock``)."""

    def __init__(self, run_dir: Path, wait: bool = False):
        self.run_dir = Path(run_dir)
        self.wait = wait  # block until the holder is done (a search shared by the jobs of a sweep)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.run_dir / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunRefused(
                    f"run directory {self.run_dir} is in use by another run (pid {holder}); wait for it to "
                    f"finish or choose another directory (hydra.run.dir=... / hydra.sweep.dir=...)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or no launch): the process that owns the run directory."""
    return os.environ.get("RANK", "0") == "0"


def remove_stale_temps(run_dir: Path, depth: int = 2) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left (``.<name>.<random>.tmp``).

    Only safe under the run's lock: no other writer can be mid-write."""
    removed = []
    folders = [Path(run_dir)]
    for _ in range(depth):
        # not through links: a linked folder (a shared search) belongs to another run's lock
        folders += [sub for folder in folders for sub in folder.iterdir() if sub.is_dir() and not sub.is_symlink()]
    for folder in dict.fromkeys(folders):
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


# ------------------------------------------------------------------ the same work


def holds_work(run_dir: Path) -> bool:
    """Whether the directory holds a run's work: a checkpoint (its own or a stage's) or a completed result."""
    run_dir = Path(run_dir)
    if any((folder / "last.pt").is_file() for folder in (run_dir, *[p for p in run_dir.iterdir() if p.is_dir()])):
        return True
    recorded = read_json(run_dir / "metrics.json")
    return isinstance(recorded, dict) and recorded.get("status") == "completed"


def check_same_work(
    run_dir: Path, current: Mapping, defaults: Mapping | None = None, allowed: Iterable[str] = SETTINGS_ALLOWED
) -> None:
    """Refuse a run whose settings differ from those of the work already in ``run_dir``."""
    recorded = read_json(Path(run_dir) / "metrics.json")
    saved = recorded.get("config") if isinstance(recorded, dict) else None
    if not isinstance(saved, dict) or not holds_work(run_dir):
        return
    changed = changed_settings(saved, current, defaults, allowed)
    if changed:
        raise RunRefused(
            f"{run_dir} holds a run with other settings ({'; '.join(changed)}); run it with the settings "
            f"that wrote it, or choose a new directory (hydra.run.dir=... / hydra.sweep.dir=...) for the "
            f"new ones. Nothing was changed"
        )
