"""Atomic file writes and small file helpers.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted write never leaves a file that later loads as valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and writers that replace the file, like safetensors) leave it owner-only
        tmp_path.chmod(_new_file_mode())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
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
    except (OSError, json.JSONDecodeError):
        return None


def torch_save(obj, path) -> None:
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
    try:
        return torch.load(path if data is None else data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(f"{path}: refused to load: the {what} needs more than tensors and plain containers to unpickle, "
                    f"and loading it could run code ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise error(f"{path}: damaged or truncated {what} ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from None
