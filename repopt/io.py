"""Atomic file writes and small file helpers.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted write never leaves a file that later loads as valid.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import DiskFullError
from .faults import fault_point

# Below this much free space, a failed write is taken to be a full disk (torch's C++ writer reports
# one as "basic_ios::clear: iostream error" / "file write failed", with no errno).
DISK_FULL_MARGIN = 1 << 20


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space: ENOSPC / EDQUOT, or a writer without an errno
    (torch's) failing on a device with (almost) no space left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(folder).free < DISK_FULL_MARGIN
        except OSError:
            return False
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A full disk while writing is a ``DiskFullError`` naming the file; the previous file is intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc, path.parent):
            raise DiskFullError(path) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fault_point(f"write:{path.name}")
        # mkstemp (and writers that replace the file, like safetensors) leave it owner-only
        tmp_path.chmod(_new_file_mode())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc, path.parent):
            tmp_path.unlink(missing_ok=True)  # give the space back before anyone records the failure
            raise DiskFullError(path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    torch = sys.modules.get("torch")  # a tensor exists only once torch is loaded: this module must not load it
    if torch is not None and isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, data: dict) -> None:
    """Write JSON atomically; non-finite floats become null so the file stays standard JSON."""
    write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def read_json(path) -> Any:
    """The file's JSON, or None when it is missing, unreadable or not JSON (a run that died early)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 (a damaged file)
        return None


def torch_save(obj, path) -> None:
    import torch  # here, as in safe_torch_load: the run-directory checks use this module before torch loads

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_torch_load(path, error: type[Exception], what: str, fix: str, map_location="cpu", data=None):
    """``torch.load(weights_only=True)`` of ``path`` (or of ``data``, a file object of its bytes already
    read) with every failure turned into ``error`` naming ``path``.

    A file that needs more than tensors and plain containers is refused without running it;
    damaged input (torch's readers raise struct.error, AssertionError, ...) is reported as such.
    """
    import torch

    try:
        return torch.load(path if data is None else data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(
            f"{path}: refused to load: the {what} needs more than tensors and plain containers to unpickle, "
            f"and loading it could run code ({str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:
        raise error(f"{path}: damaged or truncated {what} ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from None


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (``sqlite:///relative``, ``sqlite:////absolute``, ``sqlite+driver:///...``;
    a query string ignored), resolved; None for another database or an in-memory one. Optuna's storage and
    MLflow's tracking store are both named by such URLs."""
    scheme, sep, rest = url.partition(":///")
    if not sep or scheme.split("+", 1)[0] != "sqlite":
        return None
    path = rest.split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).resolve()
