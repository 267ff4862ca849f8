"""Stage one's schema (``conf/hypersearch.yaml``): the shared training fields plus Hyper-Search's own."""

from __future__ import annotations

from dataclasses import dataclass

from repopt.config import TrainConfig, register_schema, require
from repopt.family_record import CSLA_MODES

SCALE_INITS = ("paper", "constant")


@dataclass
class HSConfig(TrainConfig):
    """Stage one: Hyper-Search."""

    mode: str = "hs"  # hs (all scales learn) | csla (only identity scales learn)
    scale_init: str = "paper"  # paper: sqrt(2/i) per block index | constant: every scale 1
    fused_forward: bool = True  # one 3x3 conv per block with the summed kernel (same function, faster)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        require(self.mode in CSLA_MODES, prefix + "mode", self.mode, "one of " + ", ".join(CSLA_MODES))
        require(self.scale_init in SCALE_INITS, prefix + "scale_init", self.scale_init, "one of " + ", ".join(SCALE_INITS))


register_schema("hypersearch_schema", HSConfig)
