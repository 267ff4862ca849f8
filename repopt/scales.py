"""The scales file: the one hand-off between stage one and stage two (docs/design.md, "The scales file").

Ours is ``scales.safetensors``: float32 (C_out,) tensors under the official key names, with
provenance in the header metadata. Also accepted on load: the official released ``.pth`` files,
an official HS checkpoint (a dict with a ``model`` key), a stage-one run directory, and the
``official:B1`` / ``official:ghostnet_0_5x`` shorthand for the copies shipped with this package
(plain ``official``: the released file of the chosen architecture). Loading never unpickles
arbitrary objects, and validation against the architecture is strict.

Both directions go through ``ScalesFile``: ``save_scales`` returns the one it wrote and
``read_scales`` the one it read, each with the sha256 of exactly those bytes (one write, one read).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import ScalesError
from .family import FAMILIES, family_of, get_spec
from .io import atomic_path, safe_torch_load

FORMAT = "repopt-scales"
FORMAT_VERSION = "1"
SCALES_FILENAME = "scales.safetensors"
OFFICIAL_PREFIX = "official:"
# The scale keys of each family (official layouts), and the keys that mark a full HS state dict.
_FAMILY_KEYS = {
    "vgg": re.compile(r"(?:^|\.)(stage0|stage[1-4]\.\d+)\.(scale_conv|scale_1x1|scale_identity)\.weight$"),
    "ghostnet": re.compile(r"(?:^|\.)(blocks\.\d+\.\d+\.ghost[12])\.(fusion_scale|cheap_operation\.1)\.weight$"),
}
_MODEL_KEY = re.compile(r"(?:^|\.)(conv|conv_1x1)\.weight$|primary_conv\.0\.weight$|running_mean$")


def parse_scale_key(key: str) -> tuple[str, str, str] | None:
    """``(family, block, kind)`` of a scale key (``stage1.0``/``scale_conv``; ``blocks.6.0.ghost1``/
    ``cheap_operation.1``), or None for a key that is not a scale."""
    for family, pattern in _FAMILY_KEYS.items():
        match = pattern.search(key)
        if match:
            return family, match[1], match[2]
    return None


def _is_scale_key(key: str) -> bool:
    return parse_scale_key(key) is not None


def _key_family(keys) -> str | None:
    """The family whose key layout the given keys follow (None: no scale keys at all)."""
    counts = {fam: sum(bool(p.search(str(k))) for k in keys) for fam, p in _FAMILY_KEYS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def official_names() -> list[str]:
    return [name for fam in FAMILIES.values() for name in fam.official]


def official_scales_path(name: str, arch=None) -> Path:
    """Path of a released file shipped with the package (``B1`` ... ``ghostnet_0_5x``; ``""``: ``arch``'s own)."""
    if not name and arch is not None:
        name = get_spec(arch).name
    by_name = {n.lower(): file for fam in FAMILIES.values() for n, file in fam.official.items()}
    file = by_name.get(name.lower())
    if file is None:
        released = ", ".join(f"official:{n}" for n in official_names())
        raise ScalesError(f"no official scales for {name!r}; the released files are {released} "
                          f"(plain `official` takes the one of the chosen arch)")
    return Path(str(resources.files("repopt") / "official_scales" / file))


@dataclass(frozen=True)
class ScalesFile:
    """One scales file as written or read: where it is, its tensors, the sha256 of its bytes, its metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, object] = field(default_factory=dict)


def resolve_scales_path(source: str | Path, arch=None) -> Path:
    """Turn a user's ``scales=`` value (file, stage-one run directory, ``official:X``, or ``official``
    for ``arch``'s released file) into a file path."""
    text = str(source)
    if text == OFFICIAL_PREFIX.rstrip(":") and arch is not None:
        return official_scales_path("", arch)
    if text.startswith(OFFICIAL_PREFIX):
        return official_scales_path(text[len(OFFICIAL_PREFIX):])
    path = Path(text).expanduser()
    if path.is_dir():
        candidate = path / SCALES_FILENAME
        if candidate.is_file():
            return candidate
        raise ScalesError(
            f"{path} is a directory without {SCALES_FILENAME}: point scales= at a finished stage-one run "
            f"directory (it writes {SCALES_FILENAME} when training ends; in a pipeline job that is <job>/hs) "
            f"or at a scales file"
        )
    if not path.exists():
        raise ScalesError(f"scales file {path} does not exist: give a scales file, a stage-one run directory or "
                          f"official:{'|'.join(official_names())}")
    return path


def _metadata_entries(meta: Mapping[str, object]) -> dict[str, str]:
    return {str(k): json.dumps(v, default=str) for k, v in meta.items()}  # every value JSON: types survive


def _decode_metadata(raw: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def save_scales(path, scales: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None) -> ScalesFile:
    """Write scales as float32 safetensors with provenance metadata (atomically); return what was written."""
    path = Path(path)
    tensors = {}
    for key, value in scales.items():
        if not _is_scale_key(key) or key.startswith("module."):
            raise ScalesError(f"cannot save {key!r} as a scale: keys must look like 'stage2.3.scale_identity.weight' (vgg) "
                              f"or 'blocks.6.0.ghost1.fusion_scale.weight' (ghostnet)")
        tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
    # no timestamp: the same scales and provenance give the same bytes, so a re-export (a resumed stage
    # one) keeps the sha256 that stage two and the manifests recorded
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    meta.update({str(k): v for k, v in (metadata or {}).items()})
    entries = _metadata_entries(meta)
    data = canonical_safetensors(save_safetensors(tensors, metadata=entries))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return ScalesFile(path, tensors, hashlib.sha256(data).hexdigest(), _decode_metadata(entries))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes them in hash-map
    order, which changes from process to process, and the same scales must give the same bytes."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to a multiple of 8 with spaces
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def read_metadata(path) -> dict[str, object]:
    """The provenance header of one of our scales files (JSON values decoded); {} for other formats."""
    path = resolve_scales_path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if not _is_safetensors(head + f.read(1)):
            return {}
        f.seek(0)
        return _safetensors_metadata(f.read(8 + int.from_bytes(head, "little")), path)


def _is_safetensors(data: bytes) -> bool:
    return len(data) >= 9 and data[8:9] == b"{"


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, object]:
    """The ``__metadata__`` of a safetensors header (its first 8 bytes give the header's length)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict):
            raise ValueError("__metadata__ is not a mapping")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ScalesError(f"{path}: not a readable safetensors file ({exc})") from None
    return _decode_metadata(raw)


def _parse(data: bytes, path: Path) -> tuple[dict, dict[str, object]]:
    """The raw entries and the metadata of a scales file's bytes (safetensors, or a weights-only torch file)."""
    if _is_safetensors(data):
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ScalesError(f"{path}: damaged safetensors file ({exc}); re-export it from its stage-one run") from None
        return tensors, _safetensors_metadata(data, path)
    if not (data.startswith(b"PK") or data[:1] == b"\x80"):
        raise ScalesError(f"{path}: neither a safetensors file nor a torch file; give a scales.safetensors, an official .pth or a run directory")
    obj = safe_torch_load(path, ScalesError, "torch file", "only dicts of tensors are accepted; re-export the scales",
                          data=io.BytesIO(data))
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # an official HS checkpoint: take its state dict
    if not isinstance(obj, dict):
        raise ScalesError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj, {}


def _extract(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """Keep the scale tensors; a full state dict (HS checkpoint) also holds convs and BN, which we drop."""
    full_state_dict = any(_MODEL_KEY.search(str(k)) for k in raw)
    scales = {}
    for key, value in raw.items():
        key = str(key)
        if full_state_dict and not _is_scale_key(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ScalesError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key.startswith("module."):
            key = key[len("module."):]
        scales[key] = value
    return scales


def validate_scales(scales: Mapping[str, torch.Tensor], arch, source: str = "scales") -> None:
    """Strict check against ``arch``: same key set, (C_out,) shapes, finite floating values."""
    arch = get_spec(arch)
    expected = arch.scale_shapes()
    found, wanted = _key_family(scales), family_of(arch).name
    if found is not None and found != wanted:
        raise ScalesError(f"{source} holds {found} scales, but arch {arch.name} is a {wanted} architecture. "
                          f"Fix: give a scales file searched for a {wanted} model (or choose family={found} and "
                          f"a {found} arch)")
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


def read_scales(source, arch) -> ScalesFile:
    """Read any accepted source once, validate it against ``arch`` and return it with its sha256 and metadata."""
    arch = get_spec(arch)
    path = resolve_scales_path(source, arch)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScalesError(f"{path}: cannot read ({exc})") from None
    raw, metadata = _parse(data, path)
    scales = _extract(raw, path)
    validate_scales(scales, arch, source=str(path))
    tensors = {k: scales[k].detach().to(torch.float32).clone() for k in arch.scale_shapes()}
    return ScalesFile(path, tensors, hashlib.sha256(data).hexdigest(), metadata)


def load_scales(source, arch) -> dict[str, torch.Tensor]:
    """The validated float32 tensors of ``read_scales(source, arch)``."""
    return read_scales(source, arch).tensors


def random_scales(arch, seed: int | torch.Generator = 0, *, low: float = 0.2, high: float = 1.5,
                  signed: bool = True) -> dict[str, torch.Tensor]:
    """Scales for ``arch`` with |s| uniform in [low, high] and, with ``signed``, a random sign per channel.

    The equivalence checks, the benchmark and the tests draw their scales here: signed scales
    are what tells the AdamW rule (|s| per branch) from a wrong one (|sum of s|).
    """
    arch = get_spec(arch)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    scales = {}
    for key, (channels,) in arch.scale_shapes().items():
        magnitude = low + (high - low) * torch.rand(channels, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0).double() if signed else 1.0
        scales[key] = (magnitude * sign).float()
    return scales

