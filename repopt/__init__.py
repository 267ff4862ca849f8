"""Shared core of the RepOpt pipeline: the model families and their specs, the scales-file contract."""

from .errors import CheckpointError, ConfigError, DataError, DivergenceError, RepOptError, ScalesError
from .family import FAMILIES, build_model, family_of, get_family, get_spec, spec_from_dict
from .scales import ScalesFile, load_scales, read_metadata, read_scales, resolve_scales_path, save_scales, validate_scales
from .vgg import ArchSpec, BlockSpec, RepOptVGG, arch_names, get_arch

__all__ = [
    "ArchSpec",
    "BlockSpec",
    "arch_names",
    "get_arch",
    "RepOptVGG",
    "FAMILIES",
    "get_family",
    "family_of",
    "get_spec",
    "spec_from_dict",
    "build_model",
    "ScalesFile",
    "read_scales",
    "load_scales",
    "save_scales",
    "read_metadata",
    "resolve_scales_path",
    "validate_scales",
    "RepOptError",
    "ConfigError",
    "ScalesError",
    "CheckpointError",
    "DataError",
    "DivergenceError",
]
