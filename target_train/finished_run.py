"""A finished stage-two run, as the steps that work on one (export, prune, QAT) see it: its directory and
checkpoint, the trained model rebuilt from it, the training config it recorded, and its data.

Nothing here writes into the run but the scratch folder a step builds its files in (``scratch_dir``);
where a step's Hydra logs go is ``step_config.run_log_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

from repopt.config import DataConfig, to_typed
from repopt.data import build_data
from repopt.engine import load_checkpoint
from repopt.errors import CheckpointError, ConfigError, DataError
from repopt.family import build_model, family_of, spec_from_dict

log = logging.getLogger("target_train.finished_run")


def find_run(cfg) -> tuple[Path, Path]:
    """The run directory and the checkpoint file in it."""
    run_dir = Path(os.path.expanduser(cfg.run)).resolve()
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist; pass run=<the stage-two run directory> "
            f"(the folder with best.pt / last.pt written by python -m target_train)"
        )
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    if cfg.checkpoint == "best" and best.is_file():
        return run_dir, best
    if last.is_file():
        if cfg.checkpoint == "best":
            log.warning("%s has no best.pt: exporting last.pt", run_dir)
        return run_dir, last
    raise CheckpointError(
        f"{run_dir} holds no checkpoint (no {'best.pt or ' if cfg.checkpoint == 'best' else ''}last.pt); "
        f"point run= at a finished stage-two run directory (python -m target_train ...)"
    )


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the trained model of a stage-two checkpoint, in eval mode on the CPU."""
    ckpt = load_checkpoint(path, map_location="cpu")
    stage = ckpt.get("stage")
    if stage == "hypersearch":
        raise CheckpointError(
            f"{path} is a stage-one (hypersearch) checkpoint: it trains the scales, not the deployable model. "
            f"Train stage two with those scales first (python -m target_train scales={path.parent}), "
            f"then export that run: run=<the stage-two run directory>"
        )
    mode = ckpt.get("mode")
    for key in ("arch", "num_classes"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry; it was not written by python -m target_train")
    try:
        arch = spec_from_dict(ckpt["arch"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    baselines = family_of(arch).baseline_modes
    if stage not in (None, "target_train") or mode not in ("target", *baselines):
        raise CheckpointError(
            f"{path}: not a stage-two checkpoint (stage={stage!r}, mode={mode!r}); "
            f"point run= at a run of python -m target_train "
            f"(model=target or {' or '.join(f'model={m}' for m in baselines)})"
        )
    try:
        model = build_model(arch, int(ckpt["num_classes"]), mode)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the recorded architecture ({str(exc)[:300]})") from None
    return model.eval(), ckpt


def stored_config(ckpt: dict, run_dir: Path) -> dict:
    """The stage-two run's training config: the checkpoint's copy, else ``.hydra/config.yaml``."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict) or "data" not in stored:
        hydra_cfg = run_dir / ".hydra" / "config.yaml"
        if not hydra_cfg.is_file():
            raise CheckpointError(f"neither the checkpoint nor {hydra_cfg} records the run's data configuration")
        stored = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=True)
    return stored


def data_config(ckpt: dict, run_dir: Path, cfg) -> tuple[DataConfig, int]:
    """The run's DataConfig (from the checkpoint, else .hydra/config.yaml) with the step's overrides
    (``cfg.data_root``, ``cfg.eval_images``: an ExportConfig or a PruneConfig)."""
    stored = stored_config(ckpt, run_dir)
    data = to_typed(stored["data"], DataConfig)
    if cfg.data_root is not None:
        data.root = cfg.data_root
    if cfg.eval_images is not None:
        data.test_subset = min(cfg.eval_images, data.test_subset or cfg.eval_images)
    data.download = False  # never fetch anything during an export
    return data, int(stored.get("seed", 0))


def load_data(data_cfg: DataConfig, seed: int, cfg):
    try:
        return build_data(data_cfg, "cpu", seed=seed)
    except DataError as exc:
        hint = "" if cfg.data_root else " (if the data moved since training, pass data_root=<its new folder>)"
        raise DataError(f"{exc}{hint}") from None


def calibration_batches(bundle, n: int, batch: int) -> Iterator[torch.Tensor]:
    """``n`` training images, evenly spread over the (un-shuffled) training split, through the
    *evaluation* transform: no crop, no flip; normalized with the bundle's mean/std."""
    from repopt.data.loader_batches import LoaderBatches
    from repopt.data.tensor_batches import TensorBatches

    train, test = bundle.train, bundle.test
    total = int(train.num_samples)
    n = min(n, total)
    idx = (torch.arange(n, dtype=torch.int64) * total) // n  # evenly spaced: every class of a folder tree
    if isinstance(train, TensorBatches):
        stream = TensorBatches(
            train.images.index_select(0, idx),
            train.labels.index_select(0, idx),
            torch.device("cpu"),
            batch_size=batch,
            mean=bundle.mean,
            std=bundle.std,
            augment=False,
            drop_last=False,
            out_size=test.out_size,
        )
    elif isinstance(train, LoaderBatches) and isinstance(test, LoaderBatches):
        base = train.loader.dataset.base
        stream = LoaderBatches(
            Subset(base, idx.tolist()),
            test.loader.dataset.transform,
            torch.device("cpu"),
            batch_size=batch,
            mean=bundle.mean,
            std=bundle.std,
            train=False,
            drop_last=False,
            num_workers=0,
        )
    else:  # pragma: no cover - a new loader type
        raise ConfigError(f"cannot draw un-augmented training images from a {type(train).__name__}")
    for x, _ in stream.epoch(0):
        yield x


def check_classes(num_classes: int, ckpt: dict, root) -> None:
    """The data must be the one the run was trained on: at least its class count must match."""
    if num_classes != int(ckpt["num_classes"]):
        raise DataError(
            f"the data has {num_classes} classes but the checkpoint {ckpt['num_classes']}; "
            f"data_root={root} is not the data set the run was trained on"
        )


@contextlib.contextmanager
def scratch_dir(run_dir: Path, prefix: str) -> Iterator[Path]:
    """A private folder inside the run where a step builds its files, removed afterwards: the step
    moves them into place only once every check passed, so a failure leaves the run as it was."""
    try:
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=run_dir))
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable ({exc.strerror}); copy the run somewhere writable") from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
