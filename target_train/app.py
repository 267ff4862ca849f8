"""The stage-two app: ``python -m target_train`` (console script ``repopt-target-train``).

Loads the scales (``scales=`` file | stage-one run dir | ``official`` | ``official:B1`` | ``none`` |
``init``), re-initializes the target of the chosen family (``family=vgg|ghostnet``) from them, builds
the grad masks and trains with the RepOptimizer (``model=repvgg`` / ``model=qarepvgg`` / ``model=rep``
trains one of the family's structural re-param baselines instead, with a plain optimizer). Writes into the run
directory: ``.hydra/``, ``metrics.json``, ``history.csv``, ``last.pt``, ``best.pt`` and
``deploy.pt`` (the folded conv+ReLU model as a torch.export program).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from repopt.app import run_app
from repopt.results import StageMetrics

from .config import TargetConfig


def train(cfg: TargetConfig, run_dir: Path) -> StageMetrics:
    """Stage two's training, imported only now: the config was checked before torch loads."""
    from .train import train_target

    return train_target(cfg, run_dir)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="target_train")
def main(cfg: DictConfig):
    return run_app(cfg, TargetConfig, train)
