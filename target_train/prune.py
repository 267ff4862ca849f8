"""``python -m target_train.prune run=<stage-two run dir> ratio=0.5`` (console script ``repopt-prune``).

Structured channel pruning of a trained stage-two VGG, fine-tuned, measured and exported
(docs/design.md, "Pruning"):

1. load ``best.pt`` (or ``last.pt``) and the run's own training and data config;
2. prune ``ratio`` of every layer's output channels with Torch-Pruning (``importance=l2`` group
   magnitude, or ``bn_scale``; widths rounded down to ``round_to``; the classifier and the image
   input are never pruned):
   * a RepOpt-VGG run (``model=target``) is pruned as trained, a plain conv+BN+ReLU stack, and its
     grad masks and scales are sliced with the kept channels, so fine-tuning with the RepOptimizer
     stays exactly the pruned CSLA model's SGD;
   * a RepVGG run (``model=repvgg``) is folded first and its deployed form pruned with the same
     importance and ratio (``repvgg_mode=deploy``, the default: what is deployed is what is
     pruned, every layer free), then fine-tuned as a plain VGG with plain SGD. ``repvgg_mode=branches``
     prunes the multi-branch model instead (its identity branches tie whole chains of layers to one
     channel set), fine-tunes it as RepVGG and folds it afterwards. A QARepVGG run (``model=qarepvgg``)
     is pruned the same way in either mode (method ``qarepvgg-deploy`` / ``qarepvgg-branches``);
3. fine-tune for ``epochs`` on the run's data config at ``lr_factor`` x the run's learning rate;
4. fold, export ``pruned.pt`` (torch.export, loads without this package) and ``pruned.onnx``,
   check ONNX Runtime against PyTorch, and time both the unpruned and the pruned model through
   ONNX Runtime at batch 1 and 32 in the same process; optionally INT8 (``int8=true``).

Everything goes to ``<run>/<out>/`` (default ``pruned/``): ``metrics.json``, ``history.csv``,
``pruned.pt``, ``pruned.onnx``, ``prune.json`` (kept channels per layer). The folder is built in
a scratch folder and moved into place only when every check passed, so a failure leaves the run
as it was. The fine-tune is short and not resumable: an interrupted one is run again.

This module is the app; the step is ``pruner.py``, the schema ``step_config.PruneConfig``. The
settings are checked before the step's modules (and torch) load.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from repopt.app import run_step
from repopt.results import StageMetrics

from .step_config import PruneConfig

log = logging.getLogger("target_train.prune")


def prune(cfg: PruneConfig) -> StageMetrics:
    """The step, imported only now: the settings were checked before torch loads."""
    from .pruner import format_summary, prune_run

    metrics = prune_run(cfg)
    log.info("pruned:\n%s", format_summary(metrics))  # logged, not printed: the step's prune.log keeps it too
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="prune")
def main(cfg: DictConfig):
    return run_step(cfg, PruneConfig, PruneConfig.check, prune)


if __name__ == "__main__":
    main()
