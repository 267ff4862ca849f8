"""Shared core of the RepOpt pipeline: the model families and their specs, the scales-file contract.

The names load their modules on first use (``repopt.lazy``): importing a config module of the
package does not import torch, so that a misspelt setting is reported at once."""

from .lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("ArchSpec", "BlockSpec", "arch_names", "get_arch", "RepOptVGG"), ".vgg"),
    **dict.fromkeys(("FAMILIES", "get_family", "family_of", "get_spec", "spec_from_dict", "build_model"), ".family"),
    **dict.fromkeys(
        ("ScalesFile", "read_scales", "load_scales", "save_scales", "read_metadata", "resolve_scales_path", "validate_scales"),
        ".scales",
    ),
    **dict.fromkeys(("RepOptError", "ConfigError", "ScalesError", "CheckpointError", "DataError", "DivergenceError"), ".errors"),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
