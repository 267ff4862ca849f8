"""The training engine shared by stage one and stage two."""

from ..lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("Trainer", "Interrupted"), ".trainer"),
    "TrainStep": ".step",
    **dict.fromkeys(("Callback", "active"), ".callbacks"),
    **dict.fromkeys(("Runtime", "resolve_runtime"), ".runtime"),
    "build_scheduler": ".schedule",
    **dict.fromkeys(("load_checkpoint", "save_checkpoint"), ".checkpoint"),
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
