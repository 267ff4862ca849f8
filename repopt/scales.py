"""The scales file: the one hand-off between stage one and stage two (DESIGN.md, "The scales file").

Ours is ``scales.safetensors``: float32 (C_out,) tensors under the official key names, with
provenance in the header metadata. Also accepted on load: the official released ``.pth`` files,
an official HS checkpoint (a dict with a ``model`` key), a stage-one run directory, and the
``official:B1`` shorthand for the copies shipped with this package. Loading never unpickles
arbitrary objects, and validation against the architecture is strict.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .arch import ArchSpec, get_arch
from .errors import ScalesError
from .io import atomic_path, safe_torch_load

FORMAT = "repopt-scales"
FORMAT_VERSION = "1"
SCALES_FILENAME = "scales.safetensors"
OFFICIAL_PREFIX = "official:"
_SCALE_KEY = re.compile(r"(?:^|\.)(stage0|stage[1-4]\.\d+)\.(scale_conv|scale_1x1|scale_identity)\.weight$")
_MODEL_KEY = re.compile(r"(?:^|\.)(conv|conv_1x1)\.weight$|\.bn\.running_mean$")  # marks a full HS state dict


def official_scales_path(name: str) -> Path:
    """Path of a released file shipped with the package (``B1``, ``B2``, ``L1``, ``L2``)."""
    name = name.upper()
    if name not in ("B1", "B2", "L1", "L2"):
        raise ScalesError(f"no official scales for {name!r}; the released files are official:B1, official:B2, official:L1, official:L2")
    return Path(str(resources.files("repopt") / "official_scales" / f"RepOpt-VGG-{name}-scales.pth"))


def resolve_scales_path(source: str | Path) -> Path:
    """Turn a user's ``scales=`` value (file, run directory, ``official:X``) into a file path."""
    text = str(source)
    if text.startswith(OFFICIAL_PREFIX):
        return official_scales_path(text[len(OFFICIAL_PREFIX):])
    path = Path(text).expanduser()
    if path.is_dir():
        for candidate in (path / SCALES_FILENAME, path / "hs" / SCALES_FILENAME):
            if candidate.is_file():
                return candidate
        raise ScalesError(
            f"{path} is a directory without {SCALES_FILENAME}: point scales= at a finished stage-one run "
            f"directory (it writes {SCALES_FILENAME} when training ends) or at a scales file"
        )
    if not path.exists():
        raise ScalesError(f"scales file {path} does not exist: give a scales file, a stage-one run directory or official:B1|B2|L1|L2")
    return path


def save_scales(path, scales: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> Path:
    """Write scales as float32 safetensors with provenance metadata (atomically)."""
    path = Path(path)
    tensors = {}
    for key, value in scales.items():
        if not _SCALE_KEY.search(key) or key.startswith("module."):
            raise ScalesError(f"cannot save {key!r} as a scale: keys must look like 'stage2.3.scale_identity.weight'")
        tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": datetime.now(timezone.utc).isoformat()}
    meta.update({str(k): v for k, v in (metadata or {}).items()})
    meta = {k: json.dumps(v, default=str) for k, v in meta.items()}  # every value JSON: types survive
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path) -> dict[str, object]:
    """The provenance header of one of our scales files (JSON values decoded); {} for other formats."""
    path = resolve_scales_path(path)
    if not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ScalesError(f"{path}: not a readable safetensors file ({exc})") from None
    out: dict[str, object] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_raw(path: Path) -> dict:
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ScalesError(f"{path}: damaged safetensors file ({exc}); re-export it from its stage-one run") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ScalesError(f"{path}: neither a safetensors file nor a torch file; give a scales.safetensors, an official .pth or a run directory")
    obj = safe_torch_load(path, ScalesError, "torch file", "only dicts of tensors are accepted; re-export the scales")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # an official HS checkpoint: take its state dict
    if not isinstance(obj, dict):
        raise ScalesError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _extract(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """Keep the scale tensors; a full state dict (HS checkpoint) also holds convs and BN, which we drop."""
    full_state_dict = any(_MODEL_KEY.search(str(k)) for k in raw)
    scales = {}
    for key, value in raw.items():
        key = str(key)
        if full_state_dict and not _SCALE_KEY.search(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ScalesError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key.startswith("module."):
            key = key[len("module."):]
        scales[key] = value
    return scales


def validate_scales(scales: Mapping[str, torch.Tensor], arch: ArchSpec, source: str = "scales") -> None:
    """Strict check against ``arch``: same key set, (C_out,) shapes, finite floating values."""
    expected = arch.scale_shapes()
    missing = [k for k in expected if k not in scales]
    unexpected = [k for k in scales if k not in expected]
    fix = (
        f"use a scales file made for arch={arch.name} (it expects {len(expected)} tensors), "
        f"or choose the architecture the file was searched for"
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ScalesError(f"{source} does not fit arch {arch.name}: {'; '.join(parts)}. Fix: {fix}")
    for key, shape in expected.items():
        value = scales[key]
        if tuple(value.shape) != shape:
            raise ScalesError(f"{source}: {key} has shape {tuple(value.shape)}, arch {arch.name} needs {shape}. Fix: {fix}")
        if not value.is_floating_point():
            raise ScalesError(f"{source}: {key} has dtype {value.dtype}; scales must be floating point")
        if not torch.isfinite(value).all():
            raise ScalesError(f"{source}: {key} holds non-finite values (NaN or inf); the search that wrote it diverged — re-run it")


def load_scales(path, arch: ArchSpec | str) -> dict[str, torch.Tensor]:
    """Load, validate and return float32 scales for ``arch`` from any accepted source."""
    arch = get_arch(arch)
    resolved = resolve_scales_path(path)
    try:
        raw = _read_raw(resolved)
    except OSError as exc:
        raise ScalesError(f"{resolved}: cannot read ({exc})") from None
    scales = _extract(raw, resolved)
    validate_scales(scales, arch, source=str(resolved))
    return {k: scales[k].detach().to(torch.float32).clone() for k in arch.scale_shapes()}
