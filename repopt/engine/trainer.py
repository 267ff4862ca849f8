"""The training loop both stages share: AMP, compile, DDP, evaluation, checkpoints, exact resume.

One ``Trainer.fit()`` call runs (or continues) a run inside ``run_dir``:

* every epoch: evaluate (top-1, top-5, loss), append a row to ``history.csv``, write ``last.pt``
  (and ``best.pt`` when asked), all atomically;
* ``resume=true`` restores model, optimizer, scheduler, scaler and the position inside the epoch;
  the data order and augmentation are functions of (seed, epoch, batch), so a resumed run replays
  exactly what an uninterrupted one would have done;
* SIGTERM / SIGINT finish the current step, write ``last.pt`` and raise ``Interrupted``;
* a non-finite loss raises ``DivergenceError`` without overwriting the last good checkpoint;
* optional: an EMA of the weights (``ema``, ema.py), updated after the optimizer step, evaluated
  each epoch and checkpointed; mixup / CutMix of each training batch (``mix``, repopt/data/mix.py).

The loop keeps only iteration, the run's state and the stop checks: the step itself is
``TrainStep`` (step.py), the measurements are ``meter.py``, stop signals ``stopping.py`` and the
hooks for outside code ``callbacks.py``.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig, to_plain
from ..data.mix import BatchMix
from ..errors import CheckpointError, DivergenceError, Interrupted
from ..faults import fault_point
from ..io import atomic_path, write_text
from ..results import StageMetrics, Status, write_result
from ..rundir import changed_settings, make_manifest
from .callbacks import Callback, registered
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import WeightEMA
from .meter import EpochMeter, evaluate
from .progress import EpochProgress
from .runtime import Runtime
from .step import TrainStep
from .stopping import StopSignal, agree_on_stop

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_top1",
    "test_loss",
    "test_top1",
    "test_top5",
    "epoch_seconds",
    "images_per_sec",
]
EMA_COLUMNS = ["ema_test_loss", "ema_test_top1", "ema_test_top5"]  # after test_top5, when the EMA is evaluated

# What a checkpoint records of the run that must equal this run's for a resume: the same model, data
# classes, mode and (stage two) scales, by content.
IDENTITY_KEYS = ("arch", "num_classes", "class_names", "mode", "scales_identity")


def non_finite_entries(*modules: nn.Module) -> list[str]:
    """The names of the floating parameters and buffers (BN statistics too) holding NaN or inf."""
    bad = []
    for module in modules:
        for name, value in module.state_dict().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
    return bad


def steps_per_epoch(cfg: TrainConfig, data) -> int:
    """Optimizer steps in one epoch: the train batches, capped by ``max_steps_per_epoch``."""
    n = len(data.train)
    return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry to resume exactly."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    ema_best_top1: float = -1.0  # the EMA's best test top-1 (when it is evaluated)
    train_seconds: float = 0.0
    images_seen: int = 0
    epoch_loss_sum: float = 0.0
    epoch_correct: float = 0.0
    epoch_count: int = 0
    wall_seconds: float = 0.0  # accumulated over resumed segments
    history: list = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        data,
        cfg: TrainConfig,
        runtime: Runtime,
        run_dir: Path,
        *,
        checkpoint_extra: dict | None = None,
        write_best: bool = False,
        callbacks: Sequence[Callback] = (),
        metrics_extra: dict | None = None,
    ):
        self.model = model  # the raw module (what checkpoints hold)
        self.optimizer, self.scheduler, self.data, self.cfg, self.runtime = optimizer, scheduler, data, cfg, runtime
        self.run_dir = Path(run_dir)
        if runtime.distributed:  # one run directory for all ranks: rank 0's (Hydra's timestamps may differ)
            shared = [str(self.run_dir)]
            dist.broadcast_object_list(shared, src=0)
            self.run_dir = Path(shared[0])
        self.checkpoint_extra = checkpoint_extra or {}
        self.write_best = write_best
        self.callbacks = [*callbacks, *registered()]
        self.metrics_extra = metrics_extra or {}
        self.state = RunState()
        self._segment_start = time.perf_counter()
        self._epoch_seconds, self._epoch_images = 0.0, 0  # this process's share of the running epoch
        self.ema = WeightEMA.build(cfg.ema, model)  # before the DDP / compile wrappers: a copy of the raw module
        self.mix = BatchMix.build(cfg.mix, data.num_classes, cfg.seed)
        self.train_model = self._wrap(model)
        self.step = TrainStep(
            self.train_model,
            optimizer,
            runtime,
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            clip_params=model.parameters(),
        )
        self.steps_per_epoch = steps_per_epoch(cfg, data)

    # ------------------------------------------------------------------ setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            wrapped = DDP(wrapped, device_ids=ids)
        if self.runtime.compile:  # static shapes (drop_last) keep it to one graph; eval runs the eager model
            wrapped = torch.compile(wrapped, mode=self.runtime.compile_mode)
        return wrapped

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict() if self.step.scaler is not None else None,
            "run": asdict(self.state),
            "rng": torch.get_rng_state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **self.checkpoint_extra,
        }

    @property
    def delivers_ema(self) -> bool:
        """The run's result is the EMA (``ema.enabled`` and ``ema.evaluate``): it picks best.pt and is deployed."""
        return self.ema is not None and self.cfg.ema.evaluate

    def delivered_model(self) -> nn.Module:
        """The model the run delivers: the EMA's averaged copy when ``delivers_ema``, else the trained model."""
        return self.ema.module if self.delivers_ema else self.model

    def _wall(self) -> float:
        return self.state.wall_seconds + (time.perf_counter() - self._segment_start)

    def check_finite_state(self) -> None:
        """A loss can stay finite while a weight or a BN statistic does not (an absurd lr): that is
        divergence too, and such a state is never checkpointed. Once before each epoch's (or a stop's)
        checkpoints: no cost per step."""
        bad = non_finite_entries(self.model, *([self.ema.module] if self.ema is not None else []))
        if bad:
            kept = (
                f"the last good checkpoint ({self.last_path.name}) is kept"
                if self.last_path.exists()
                else "no checkpoint was written yet"
            )
            raise DivergenceError(
                f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} at step "
                f"{self.state.global_step} although the loss stayed finite: training diverged; {kept}. "
                f"Lower optim.lr or check the data",
                self.state.global_step,
            )

    def save(self, name: str = "last.pt") -> None:
        self.state.wall_seconds = self._wall()
        self._segment_start = time.perf_counter()
        if self.runtime.is_main:
            save_checkpoint(self.run_dir / name, self.checkpoint_state())
        self.runtime.barrier()

    def save_best_ema(self, name: str = "best.pt") -> None:
        """The checkpoint ``last.pt`` is about to hold, with the EMA's weights as its ``model``
        (``model_source: "ema"``): what the export of ``best.pt`` then folds."""
        self.state.wall_seconds = self._wall()
        self._segment_start = time.perf_counter()
        if self.runtime.is_main:
            state = self.checkpoint_state()
            state["model"] = self.ema.module.state_dict()
            state["model_source"] = "ema"
            save_checkpoint(self.run_dir / name, state)
        self.runtime.barrier()

    def copy_to_last(self, name: str) -> None:
        """The checkpoint just saved as ``name``, as ``last.pt`` too (byte for byte: no second serialization)."""
        if self.runtime.is_main:
            with atomic_path(self.last_path) as tmp:
                shutil.copyfile(self.run_dir / name, tmp)
        self.runtime.barrier()

    def restore(self, path: Path | None = None) -> bool:
        """Load ``last.pt`` (if present) into model/optimizer/scheduler/run state; True if resumed."""
        path = path or self.last_path
        if not path.exists():
            return False
        state = load_checkpoint(path, map_location=self.runtime.device)
        for key in IDENTITY_KEYS:
            if key in self.checkpoint_extra and key in state and state[key] != self.checkpoint_extra[key]:
                raise CheckpointError(
                    f"{path}: the checkpoint's {key} ({state[key]!r}) differs from this run's ({self.checkpoint_extra[key]!r}); "
                    f"resume with the configuration (and files) that wrote it, or start a new run directory"
                )
        changed = changed_settings(
            state.get("config"), self.checkpoint_extra.get("config"), to_plain(type(self.cfg)()), self.cfg.SETTINGS_ALLOWED
        )
        if changed:
            raise CheckpointError(
                f"{path}: this run was started with other training settings ({'; '.join(changed)}); resume with the "
                f"settings that wrote it, or start a new run directory to train with new ones"
            )
        try:
            run_state = RunState(**state["run"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.step.scaler is not None and state.get("scaler"):
                self.step.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if "rng" in state:
                torch.set_rng_state(state["rng"].cpu())
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path}: does not fit this model/optimizer ({str(exc)[:300]}); start a new run directory"
            ) from None
        self.state = run_state
        self._segment_start = time.perf_counter()
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step_in_epoch)
        return True

    # ------------------------------------------------------------------ loop
    def _progress(self, epoch: int) -> EpochProgress:
        return EpochProgress(
            self.cfg.progress,
            epoch,
            self.cfg.epochs,
            self.state.step_in_epoch,
            self.steps_per_epoch,
            self.cfg.progress_every_s,
            show=self.runtime.is_main,
        )

    def _check_finite(self, losses: list[torch.Tensor], first_step: int) -> None:
        values = torch.stack(losses).float()
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            step = first_step + int(bad[0, 0])
            kept = (
                f"the last good checkpoint ({self.last_path.name}) is kept"
                if self.last_path.exists()
                else "no checkpoint was written yet"
            )
            raise DivergenceError(
                f"non-finite loss at step {step}: training diverged; {kept}. Lower optim.lr or check the data", step
            )

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """End the run at the current step boundary, as a stop signal does (``last.pt``, then ``Interrupted``)."""
        self._stop.received = signum

    def _train_epoch(self, epoch: int) -> None:
        rt, st = self.runtime, self.state
        self.train_model.train()
        check_every = 1 if rt.device.type == "cpu" else 25  # a GPU syncs for the finite check every 25 steps
        pending: list[torch.Tensor] = []
        pending_first = st.global_step
        meter = EpochMeter(rt)
        bar = self._progress(epoch)
        stop = self._stop
        batches = self.data.train.epoch(epoch, start=st.step_in_epoch)
        try:
            for step in range(st.step_in_epoch, self.steps_per_epoch):
                x, y = next(batches)
                if self.mix is not None:
                    x, y = self.mix(x, y, epoch, step)  # soft labels (N, classes)
                loss, logits = self.step(x, y)
                self.scheduler.step()
                pending.append(loss)
                meter.add(loss, logits, y)
                st.global_step += 1
                if self.ema is not None:
                    self.ema.step(st.global_step)
                st.step_in_epoch = step + 1
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if len(pending) >= check_every or st.step_in_epoch == self.steps_per_epoch or stop.received:
                    self._check_finite(pending, pending_first)
                    pending, pending_first = [], st.global_step
                    agree_on_stop(stop, rt)
                bar.advance(loss, len(y))
                if stop.received is not None:
                    break
        finally:
            bar.close()
            meter.close(st)
            self._epoch_seconds += meter.seconds
            self._epoch_images += meter.count

    def fit(self, finish: bool = True) -> StageMetrics:
        """Train to ``cfg.epochs``; returns the final metrics (also written to ``metrics.json``).

        With ``finish`` the run is completed here (``complete()``); an app that still has artifacts
        to write passes ``finish=False`` (the result stays ``running``) and calls ``complete`` itself
        once they are on disk."""
        self.write_metrics(Status.RUNNING)  # the settings are on record before the first step
        with StopSignal() as self._stop:
            try:
                self._loop()
            except DivergenceError as exc:
                self.write_metrics(Status.DIVERGED, diverged_step=exc.step, error=str(exc))
                raise
        fault_point("train.end")
        return self.complete() if finish else self.write_metrics(Status.RUNNING)

    def artifacts(self) -> list[str]:
        """The files the trainer itself promises (checkpoints and history)."""
        names = ["last.pt", "history.csv"]
        if self.write_best and (self.run_dir / "best.pt").is_file():
            names.append("best.pt")
        return names

    def complete(self, artifacts: Sequence[str] = (), **extra) -> StageMetrics:
        """Mark the run completed: its manifest (the trainer's files and ``artifacts``, each already
        durable) goes into ``metrics.json``, written last."""
        manifest = make_manifest(self.run_dir, [*self.artifacts(), *artifacts]) if self.runtime.is_main else None
        return self.write_metrics(Status.COMPLETED, manifest=manifest, **extra)

    def _loop(self) -> None:
        cfg, st = self.cfg, self.state
        while st.epoch < cfg.epochs:
            epoch = st.epoch
            self._train_epoch(epoch)
            if self._stop.received is not None and st.step_in_epoch < self.steps_per_epoch:
                self.check_finite_state()  # never checkpoint a diverged state (an epoch's end checks in _end_epoch)
                self.save()
                self.write_metrics(Status.INTERRUPTED)
                raise Interrupted(
                    f"stopped by {signal.Signals(self._stop.received).name} at epoch {epoch + 1}, step {st.step_in_epoch}; "
                    f"last.pt written to {self.run_dir}. Continue with resume=true in the same run directory"
                )
            row = self._end_epoch(epoch)
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
            if self._stop.received is not None and st.epoch < cfg.epochs:
                self.write_metrics(Status.INTERRUPTED)
                raise Interrupted(
                    f"stopped at the end of epoch {epoch + 1}; last.pt written to {self.run_dir}. Continue with resume=true"
                )

    def _end_epoch(self, epoch: int) -> dict:
        st = self.state
        self.check_finite_state()  # before the epoch is recorded anywhere: a diverged epoch leaves no row
        metrics = evaluate(self.model, self.data.test, self.runtime, self.data.num_classes)
        if self.delivers_ema:
            ema = evaluate(self.ema.module, self.data.test, self.runtime, self.data.num_classes)
            metrics.update({f"ema_{k}": v for k, v in ema.items()})
        seconds, images = self._epoch_seconds, self._epoch_images
        row = {
            "epoch": epoch + 1,
            "step": st.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": st.epoch_loss_sum / max(st.epoch_count, 1),
            "train_top1": 100.0 * st.epoch_correct / max(st.epoch_count, 1),
            **metrics,
            "epoch_seconds": seconds,
            "images_per_sec": images / seconds if seconds > 0 else float("nan"),
        }
        self._epoch_seconds, self._epoch_images = 0.0, 0
        st.history.append(row)
        st.epoch, st.step_in_epoch = epoch + 1, 0
        st.epoch_loss_sum = st.epoch_correct = 0.0
        st.epoch_count = 0
        improved = row["test_top1"] > st.best_top1
        if improved:
            st.best_top1 = row["test_top1"]
        if self.delivers_ema:  # best.pt follows the delivered model
            improved = row["ema_test_top1"] > st.ema_best_top1
            if improved:
                st.ema_best_top1 = row["ema_test_top1"]
        if self.runtime.is_main:
            self.write_history()
        # best.pt before last.pt: a crash between the two resumes from the previous last.pt, replays the
        # epoch and writes both again, so best.pt can never lag behind the best epoch last.pt records
        if self.write_best and improved and self.delivers_ema:
            self.save_best_ema()
            fault_point("best.before_last")
            self.save()
        elif self.write_best and improved:
            self.save("best.pt")
            fault_point("best.before_last")
            self.copy_to_last("best.pt")
        else:
            self.save()
        ema_note = f"  ema_top1 {row['ema_test_top1']:.2f}" if self.delivers_ema else ""
        log.info(
            "epoch %d/%d  train_loss %.4f  test_top1 %.2f  test_top5 %.2f%s  (%.1f s, %.0f img/s)",
            epoch + 1,
            self.cfg.epochs,
            row["train_loss"],
            row["test_top1"],
            row["test_top5"],
            ema_note,
            seconds,
            row["images_per_sec"],
        )
        return row

    @property
    def history_columns(self) -> list[str]:
        if not self.delivers_ema:
            return HISTORY_COLUMNS
        at = HISTORY_COLUMNS.index("test_top5") + 1
        return HISTORY_COLUMNS[:at] + EMA_COLUMNS + HISTORY_COLUMNS[at:]

    def write_history(self) -> None:
        columns = self.history_columns
        lines = [",".join(columns)]
        for row in self.state.history:
            lines.append(",".join(_fmt(row.get(c)) for c in columns))
        write_text(self.run_dir / "history.csv", "\n".join(lines) + "\n")

    def write_metrics(self, status: Status, **extra) -> StageMetrics:
        """The run's ``metrics.json`` now: the last epoch's test metrics, timing, and the app's
        fields (``metrics_extra``, then ``extra``; each must be a ``StageMetrics`` field)."""
        st = self.state
        last = st.history[-1] if st.history else {}
        metrics = StageMetrics(
            status=status,
            top1=last.get("test_top1"),
            top5=last.get("test_top5"),
            loss=last.get("test_loss"),
            best_top1=st.best_top1 if st.best_top1 >= 0 else None,
            epochs=st.epoch,
            steps=st.global_step,
            wall_seconds=self._wall(),
            train_seconds=st.train_seconds,
            images_per_sec=st.images_seen / st.train_seconds if st.train_seconds > 0 else None,
            device=self.runtime.describe(),
            world_size=self.runtime.world_size,
            peak_memory_gib=(
                torch.cuda.max_memory_allocated(self.runtime.device) / 2**30 if self.runtime.device.type == "cuda" else None
            ),
            **self._ema_metrics(last),
            config=self.checkpoint_extra.get("config"),
            **{**self.metrics_extra, **extra},
        )
        if self.runtime.is_main:
            write_result(self.run_dir / "metrics.json", metrics)
        return metrics

    def _ema_metrics(self, last: dict) -> dict:
        """The EMA's fields of ``metrics.json`` (none without an EMA)."""
        if self.ema is None:
            return {}
        st = self.state
        return {
            "delivered": "ema" if self.delivers_ema else "model",
            "ema_top1": last.get("ema_test_top1"),
            "ema_top5": last.get("ema_test_top5"),
            "ema_loss": last.get("ema_test_loss"),
            "ema_best_top1": st.ema_best_top1 if st.ema_best_top1 >= 0 else None,
        }


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)
