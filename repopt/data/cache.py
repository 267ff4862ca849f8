"""A cache of decoded image tensors, keyed by the files it came from and written atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import DataConfig
from ..io import torch_save

log = logging.getLogger(__name__)

FORMAT = 1


def default_cache_dir() -> Path:
    """The cache's folder when ``data.cache_dir`` is unset: a per-user cache, not the data root (which
    may be read-only, shared by several users, or a data set its owner keeps as it is).

    ``$REPOPT_CACHE_DIR`` if set (one place for every run, e.g. a scratch disk on a cluster, without
    moving every other tool's cache), else ``$XDG_CACHE_HOME/repopt/decoded`` (an absolute
    ``XDG_CACHE_HOME`` only, as the XDG spec says), else ``~/.cache/repopt/decoded``."""
    if os.environ.get("REPOPT_CACHE_DIR"):
        return Path(os.path.expanduser(os.environ["REPOPT_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path(os.path.expanduser("~/.cache"))
    return base / "repopt" / "decoded"


def cache_dirs(cfg: DataConfig) -> list[Path]:
    """Where to look for (and write) the cache, in order: data.cache_dir when set, then ``default_cache_dir()``."""
    default = default_cache_dir()
    if not cfg.cache_dir:
        return [default]
    first = Path(os.path.expanduser(cfg.cache_dir))
    return [first] if first == default else [first, default]


def cache_name(root: Path, split: str, size: int, files: Sequence[str], labels: Sequence[int]) -> str:
    """A file name that changes whenever the root, split, size or any file (name, size, mtime) changes."""
    h = hashlib.sha256()
    prefix = str(root.absolute())
    h.update(f"{FORMAT}\0{prefix}\0{split}\0{size}\0{len(files)}\0".encode())
    total = 0
    for path, label in zip(files, labels):
        st = os.stat(path)
        total += st.st_size
        rel = path[len(prefix) :] if path.startswith(prefix) else path
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(str(total).encode())
    return f"{split}-{size}px-{len(files)}-{h.hexdigest()[:24]}.pt"


def load(name: str, dirs: Sequence[Path]) -> Optional[dict]:
    """The cached payload named ``name`` from the first folder that has a readable copy, else None."""
    for d in dirs:
        path = d / name
        if not path.is_file():
            continue
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            log.warning("ignoring unreadable cache %s (%s); decoding again", path, exc)
            continue
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            payload["path"] = str(path)
            return payload
    return None


def save(name: str, payload: dict, dirs: Sequence[Path]) -> Optional[Path]:
    """Write ``payload`` to the first writable folder (temp file + rename); None if none is writable."""
    payload = dict(payload, format=FORMAT)
    for d in dirs:
        try:
            torch_save(payload, d / name)
            log.info("cached decoded images in %s", d / name)
            return d / name
        except OSError as exc:
            log.info("cannot write the image cache in %s (%s); trying the next place", d, exc)
    log.warning("could not write the decoded-image cache anywhere (%s)", ", ".join(map(str, dirs)))
    return None
