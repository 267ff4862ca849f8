"""The stage-one app: ``python -m hypersearch`` (console script ``repopt-hypersearch``).

Trains the HS/CSLA model on the configured data set and writes into its run directory:
``.hydra/`` (resolved config), ``last.pt``, ``history.csv``, ``metrics.json``,
``scales.safetensors`` (with provenance metadata), ``scales.csv`` and ``scales.png``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from repopt.app import run_app
from repopt.results import StageMetrics

from .config import HSConfig


def train(cfg: HSConfig, run_dir: Path) -> StageMetrics:
    """Stage one's training, imported only now: the config was checked before torch loads."""
    from .search import train_hypersearch

    return train_hypersearch(cfg, run_dir)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="hypersearch")
def main(cfg: DictConfig):
    return run_app(cfg, HSConfig, train)
