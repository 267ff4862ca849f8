"""The scales file: the one hand-off between stage one and stage two (docs/design.md, "The scales file").

Ours is ``scales.safetensors``: float32 (C_out,) tensors under the official key names, with
provenance in the header metadata. Also accepted on load: the official released ``.pth`` files,
an official HS checkpoint as its search writes it (``latest.pth``: ``model``, ``optimizer``,
``lr_scheduler``, a yacs ``config``, optionally ``ema``; the scales come from ``model``, or from
``ema`` with ``scales_from="ema"``), a stage-one run directory, and the ``official:B1`` /
``official:ghostnet_0_5x`` shorthand for the copies shipped with this package (plain ``official``:
the released file of the chosen architecture). Loading never runs code from the file: a torch zip
file is unpickled with every callable outside a short allow-list refused and every other class
replaced by an inert stand-in, and only the tensors kept are read. Validation against the
architecture is strict.

Both directions go through ``ScalesFile``: ``save_scales`` returns the one it wrote and
``read_scales`` the one it read, each with the sha256 of exactly those bytes (one write, one read).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import SCALES_FROM
from .errors import ConfigError, ScalesError
from .family import FAMILIES, family_of, get_spec
from .io import atomic_path, safe_torch_load

FORMAT = "repopt-scales"
FORMAT_VERSION = "1"
SCALES_FILENAME = "scales.safetensors"
OFFICIAL_PREFIX = "official:"
# The scale keys of each family (official layouts; each family's ``scale_key``).
_FAMILY_KEYS = {name: fam.scale_key for name, fam in FAMILIES.items()}


def parse_scale_key(key: str) -> tuple[str, str, str] | None:
    """``(family, block, kind)`` of a scale key (``stage1.0``/``scale_conv``; ``blocks.6.0.ghost1``/
    ``cheap_operation.1``), or None for a key that is not a scale."""
    for family, pattern in _FAMILY_KEYS.items():
        match = pattern.search(key)
        if match:
            return family, match[1], match[2]
    return None


def _is_model_key(key: str) -> bool:
    """A key only a whole HS state dict has: a family's model key, or any BN's running mean."""
    return key.endswith("running_mean") or any(fam.model_key.search(key) for fam in FAMILIES.values())


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
        raise ScalesError(
            f"no official scales for {name!r}; the released files are {released} "
            f"(plain `official` takes the one of the chosen arch)"
        )
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
        return official_scales_path(text[len(OFFICIAL_PREFIX) :])
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
        raise ScalesError(
            f"scales file {path} does not exist: give a scales file, a stage-one run directory or "
            f"official:{'|'.join(official_names())}"
        )
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
            raise ScalesError(
                f"cannot save {key!r} as a scale: keys must look like 'stage2.3.scale_identity.weight' (vgg) "
                f"or 'blocks.6.0.ghost1.fusion_scale.weight' (ghostnet)"
            )
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
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to a multiple of 8 with spaces
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


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
        header = json.loads(data[8 : 8 + size])
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict):
            raise ValueError("__metadata__ is not a mapping")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ScalesError(f"{path}: not a readable safetensors file ({exc})") from None
    return _decode_metadata(raw)


# ---------------------------------------------------------------- torch zip files, read inertly
#
# An official HS checkpoint is a whole training state: besides the model's tensors it pickles a yacs
# ``CfgNode``, the optimizer's and scheduler's state and maybe apex's. ``torch.load(weights_only=True)``
# refuses the config, and a full unpickle would run whatever the file names. So torch's zip format is
# unpickled here with a reader that calls only the allow-listed callables below (plain containers,
# bytes, tensor records), refuses any other call (``os.system`` in a ``__reduce__`` is refused, not run),
# and builds every other class as an inert stand-in: a class constructed from its state (NEWOBJ,
# BUILD, SETITEMS) needs no call into the class, so the stand-in takes its place and swallows the state.
# Tensors stay references into the archive until the scales are picked: only those bytes are read.


class _Refused(pickle.UnpicklingError):
    """Unpickling would call ``name``: a function, or a class through its ``__reduce__``; either could run code."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _InertClass(type):
    """The type of the stand-in classes: building one from state is inert, but calling one (REDUCE) is
    refused, because the pickled name could be ``os.system`` as well as a class."""

    pickled_name: str

    def __call__(cls, *args, **kwargs):
        raise _Refused(cls.pickled_name)


class _Inert(metaclass=_InertClass):
    """An object of a class the reader does not load (yacs ``CfgNode``, a scheduler, apex's state): it
    records the class's pickled name and swallows its state, and nothing of the class is imported."""

    __slots__ = ()
    pickled_name = "object"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:  # a dict subclass's items (SETITEMS)
        pass

    def append(self, value) -> None:  # a list subclass's items (APPEND, APPENDS)
        pass

    def extend(self, values) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.pickled_name}, not loaded>"


class _Record:
    """Base of the reader's own objects: a pickle may pass them around but not rewrite them, so BUILD on
    one is refused (a dataclass's generated ``__setstate__`` would let it repoint a tensor's storage)."""

    __slots__ = ()

    def __setstate__(self, state) -> None:
        raise pickle.UnpicklingError("a pickle may not rewrite the reader's records")


class _StorageKind(_Record):
    """``torch.FloatStorage`` & co. as a persistent id names them: only the dtype of the bytes matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Record):
    """One storage record of the archive, read (once) when a tensor that is kept needs it."""

    __slots__ = ("_archive", "_name", "_nbytes", "_bytes", "big_endian")

    def __init__(self, archive: zipfile.ZipFile, name: str, nbytes: int, big_endian: bool):
        self._archive, self._name, self._nbytes, self.big_endian = archive, name, nbytes, big_endian
        self._bytes = None

    def read(self) -> torch.Tensor:
        """The record's bytes as a flat uint8 tensor."""
        if self._bytes is None:
            raw = self._archive.read(self._name)
            if len(raw) != self._nbytes:
                raise ValueError(f"record {self._name} holds {len(raw)} bytes, its tensors need {self._nbytes}")
            self._bytes = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return self._bytes


class _TensorRef(_Record):
    """A tensor of the archive not read yet: its storage, offset, size and stride (all in elements)."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype):
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def load(self) -> torch.Tensor:
        """The tensor, bounds-checked against its storage and copied out of it."""
        flat, itemsize = self.storage.read(), self.dtype.itemsize
        if flat.numel() % itemsize:
            raise ValueError(f"{flat.numel()} bytes are no whole number of {self.dtype} elements")
        if self.storage.big_endian and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)
        elements = flat.view(self.dtype)
        if (
            len(self.size) != len(self.stride)
            or self.offset < 0
            or min(self.size + self.stride, default=0) < 0
            or (all(self.size) and self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) >= elements.numel())
        ):
            raise ValueError(
                f"size {self.size}, stride {self.stride} and offset {self.offset} do not fit a storage "
                f"of {elements.numel()} elements"
            )
        return torch.as_strided(elements, self.size, self.stride, self.offset).clone()


def _int_tuple(value) -> bool:
    return isinstance(value, (tuple, list)) and all(type(v) is int for v in value)


class _TypedStorage(_Record):
    """What a persistent id resolves to: a storage record and the dtype its typed storage named."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: _Storage, dtype: torch.dtype):
        self.storage, self.dtype = storage, dtype


def _tensor_ref(storage, offset, size, stride, dtype) -> _TensorRef:
    """A checked ``_TensorRef``: the pickle could hold anything in these places."""
    if not (
        isinstance(storage, _TypedStorage)
        and type(offset) is int
        and _int_tuple(size)
        and _int_tuple(stride)
        and isinstance(dtype, torch.dtype)
    ):
        raise pickle.UnpicklingError("malformed tensor record")
    return _TensorRef(storage.storage, offset, tuple(size), tuple(stride), dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """``torch._utils._rebuild_tensor(_v2)``, inert: a reference to the elements, read only if kept."""
    dtype = storage.dtype if isinstance(storage, _TypedStorage) else None
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_):
    """``torch._utils._rebuild_tensor_v3`` (dtypes without a typed storage): the bytes viewed as ``dtype``."""
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_):
    """``torch._utils._rebuild_parameter(_with_state)``: a parameter is its data."""
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a parameter record without tensor data")
    return data


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor``, with which protocols 0 and 1 build a dict subclass (a ``CfgNode``):
    for a stand-in only, its base and state swallowed."""
    if isinstance(cls, _InertClass):
        return cls.__new__(cls)
    raise _Refused(f"copyreg._reconstructor({getattr(cls, '__name__', type(cls).__name__)})")


def _encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocols 0-2 use it for bytes (``encode(text, "latin1")``), no other codec."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict"):
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_CALLABLES = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "_codecs.encode": _encode,
    "copyreg._reconstructor": _reconstructor,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_STORAGE_DTYPES = {
    f"torch.{name}": dtype
    for name, dtype in {
        "DoubleStorage": torch.float64,
        "FloatStorage": torch.float32,
        "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64,
        "IntStorage": torch.int32,
        "ShortStorage": torch.int16,
        "CharStorage": torch.int8,
        "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool,
        "ComplexDoubleStorage": torch.complex128,
        "ComplexFloatStorage": torch.complex64,
        "UntypedStorage": torch.uint8,
        "storage.UntypedStorage": torch.uint8,  # how _rebuild_tensor_v3's bytes are named
    }.items()
}
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # the Python 2 names protocols 0-2 write


class _InertUnpickler(pickle.Unpickler):
    """Calls only ``_CALLABLES``; torch dtypes and storage kinds are values; every other global is a stand-in class."""

    def __init__(self, file, storage):
        super().__init__(file)
        self._storage = storage
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        module = _MODULE_ALIASES.get(module, module)
        full = f"{module}.{name}"
        if full in _CALLABLES:
            return _CALLABLES[full]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if full in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[full])
        if full not in self._stand_ins:
            self._stand_ins[full] = _InertClass("Inert", (_Inert,), {"__slots__": (), "pickled_name": full})
        return self._stand_ins[full]

    def persistent_load(self, pid):
        """torch's ``('storage', kind, key, location, numel)``: the record, not read yet."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageKind)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        return _TypedStorage(self._storage(pid[2], pid[1].dtype, pid[4]), pid[1].dtype)


def _read_torch_zip(data: bytes, path: Path):
    """The object tree of a torch zip file, unpickled inertly, with tensors as ``_TensorRef``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] if names else ""
        if f"{prefix}/data.pkl" not in names:
            raise ValueError("no data.pkl record: not a torch.save file")
        big_endian = f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}

        def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            if key not in storages:
                storages[key] = _Storage(archive, f"{prefix}/data/{key}", numel * dtype.itemsize, big_endian)
            return storages[key]

        return _InertUnpickler(io.BytesIO(archive.read(f"{prefix}/data.pkl")), storage).load()
    except _Refused as exc:
        raise ScalesError(
            f"{path}: refused to load: unpickling it would call {exc.name}, and a call could run code (nothing was "
            f"run; only tensors, plain containers and inert stand-ins for other classes, such as a yacs config, are "
            f"read). Fix: if you trust the file, save its state dict alone, "
            f"torch.save(torch.load(file, weights_only=False)['model'], 'scales.pth'), and give that file"
        ) from None
    except Exception as exc:  # zipfile, pickle and the records raise many kinds on damaged input
        raise ScalesError(
            f"{path}: damaged or truncated torch file ({type(exc).__name__}: {str(exc)[:200]}); "
            f"copy it again from the run that wrote it, or re-export the scales"
        ) from None


def _describe(value) -> str:
    if isinstance(value, _Inert):
        return f"an inert stand-in for {value.pickled_name} (not loaded)"
    return f"a {type(value).__name__}"


def _select(obj, path: Path, scales_from: str) -> dict:
    """The dict holding the scales: a dict of tensors as it is, or the ``model`` / ``ema`` state dict of an
    HS checkpoint (its other entries, the config and the optimizer's state, are never looked at)."""
    if not isinstance(obj, dict):
        raise ScalesError(f"{path}: expected a dict of tensors or an HS checkpoint, found {_describe(obj)}")
    other = SCALES_FROM[1 - SCALES_FROM.index(scales_from)]
    if not any(key in obj for key in SCALES_FROM):
        if scales_from != "model":
            raise ScalesError(
                f"{path}: holds one set of scales, not an HS checkpoint with an {scales_from!r} state "
                f"dict (scales_from={scales_from} picks a checkpoint's EMA). Fix: pass scales_from=model"
            )
        return obj
    if scales_from not in obj:
        keys = ", ".join(map(str, list(obj)[:12]))
        raise ScalesError(
            f"{path}: an HS checkpoint without an {scales_from!r} state dict (keys found: {keys}). Fix: pass scales_from={other}"
        )
    chosen = obj[scales_from]
    if not isinstance(chosen, dict):
        raise ScalesError(
            f"{path}: the checkpoint's {scales_from!r} is {_describe(chosen)}, not a state dict. Fix: "
            f"save model.state_dict() under {scales_from!r}" + (f", or pass scales_from={other}" if other in obj else "")
        )
    return chosen


def _parse(data: bytes, path: Path, scales_from: str = "model") -> tuple[dict, dict[str, object]]:
    """The dict holding the scales and the metadata of a scales file's bytes: safetensors, a torch zip
    file (read inertly) or a legacy torch file (read weights-only)."""
    if _is_safetensors(data):
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ScalesError(f"{path}: damaged safetensors file ({exc}); re-export it from its stage-one run") from None
        return _select(tensors, path, scales_from), _safetensors_metadata(data, path)
    if data.startswith(b"PK"):
        obj = _read_torch_zip(data, path)
    elif data[:1] == b"\x80":
        obj = safe_torch_load(
            path, ScalesError, "torch file", "only dicts of tensors are accepted; re-export the scales", data=io.BytesIO(data)
        )
    else:
        raise ScalesError(
            f"{path}: neither a safetensors file nor a torch file; give a scales.safetensors, an official .pth or a run directory"
        )
    return _select(obj, path, scales_from), {}


def _extract(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """Keep the scale tensors; a full state dict (HS checkpoint) also holds convs and BN, which we drop
    (and, from a torch zip file, never read)."""
    full_state_dict = any(_is_model_key(str(k)) for k in raw)
    scales = {}
    for key, value in raw.items():
        key = str(key)
        if full_state_dict and not _is_scale_key(key):
            continue
        if isinstance(value, _TensorRef):
            try:
                value = value.load()
            except Exception as exc:  # zipfile (CRC, compression) and torch raise many kinds on a damaged record
                raise ScalesError(
                    f"{path}: damaged tensor {key!r} ({exc}); copy the file again from the run that wrote it"
                ) from None
        if not isinstance(value, torch.Tensor):
            raise ScalesError(f"{path}: entry {key!r} is {_describe(value)}, not a tensor")
        if key.startswith("module."):
            key = key[len("module.") :]
        scales[key] = value
    return scales


def validate_scales(scales: Mapping[str, torch.Tensor], arch, source: str = "scales") -> None:
    """Strict check against ``arch``: same key set, (C_out,) shapes, finite floating values."""
    arch = get_spec(arch)
    expected = arch.scale_shapes()
    found, wanted = _key_family(scales), family_of(arch).name
    if found is not None and found != wanted:
        raise ScalesError(
            f"{source} holds {found} scales, but arch {arch.name} is a {wanted} architecture. "
            f"Fix: give a scales file searched for a {wanted} model (or choose family={found} and "
            f"a {found} arch)"
        )
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
            parts.append(
                f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ScalesError(f"{source} does not fit arch {arch.name}: {'; '.join(parts)}. Fix: {fix}")
    for key, shape in expected.items():
        value = scales[key]
        if tuple(value.shape) != shape:
            raise ScalesError(f"{source}: {key} has shape {tuple(value.shape)}, arch {arch.name} needs {shape}. Fix: {fix}")
        if not value.is_floating_point():
            raise ScalesError(f"{source}: {key} has dtype {value.dtype}; scales must be floating point")
        if not torch.isfinite(value).all():
            raise ScalesError(
                f"{source}: {key} holds non-finite values (NaN or inf); the search that wrote it diverged — re-run it"
            )


def read_scales(source, arch, scales_from: str = "model") -> ScalesFile:
    """Read any accepted source once, validate it against ``arch`` and return it with its sha256 and metadata.

    ``scales_from`` picks the state dict of an HS checkpoint: ``model`` (what the official extraction
    loads) or ``ema`` (its moving average, when the search kept one); a plain scales file has only one.
    """
    if scales_from not in SCALES_FROM:
        raise ConfigError(f"scales_from={scales_from!r}: must be one of {', '.join(SCALES_FROM)}")
    arch = get_spec(arch)
    path = resolve_scales_path(source, arch)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScalesError(f"{path}: cannot read ({exc})") from None
    raw, metadata = _parse(data, path, scales_from)
    scales = _extract(raw, path)
    validate_scales(scales, arch, source=str(path))
    tensors = {k: scales[k].detach().to(torch.float32).clone() for k in arch.scale_shapes()}
    return ScalesFile(path, tensors, hashlib.sha256(data).hexdigest(), metadata)


def load_scales(source, arch, scales_from: str = "model") -> dict[str, torch.Tensor]:
    """The validated float32 tensors of ``read_scales(source, arch, scales_from)``."""
    return read_scales(source, arch, scales_from).tensors


def random_scales(
    arch, seed: int | torch.Generator = 0, *, low: float = 0.2, high: float = 1.5, signed: bool = True
) -> dict[str, torch.Tensor]:
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
