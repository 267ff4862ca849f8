"""What the trainer measures: the train metrics of an epoch and the test metrics of an evaluation."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .runtime import Runtime


class EpochMeter:
    """Train loss, accuracy, images and seconds of one (segment of an) epoch, summed over ranks at the end."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=runtime.device, dtype=torch.float64)
        self.count = 0
        self.seconds = 0.0
        self._t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """``y``: int labels (N,), or soft labels (N, classes) of a mixed batch, scored against their argmax."""
        n = int(y.shape[0])
        labels = y.argmax(1) if y.dim() == 2 else y
        self.loss_sum += loss.double() * n
        self.correct += (logits.argmax(1) == labels).sum()
        self.count += n

    def close(self, state) -> None:
        """Stop the clock and add this segment to the run state (over the global batch under DDP)."""
        rt = self.runtime
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        self.seconds = time.perf_counter() - self._t0
        loss_sum, correct = self.loss_sum, self.correct
        if rt.distributed:
            totals = torch.stack([loss_sum, correct])
            dist.all_reduce(totals)
            loss_sum, correct = totals[0], totals[1]
            self.count *= rt.world_size
        state.train_seconds += self.seconds
        state.images_seen += self.count
        state.epoch_loss_sum += float(loss_sum)
        state.epoch_correct += float(correct)
        state.epoch_count += self.count


@torch.no_grad()
def evaluate(model: nn.Module, batches, runtime: Runtime, num_classes: int) -> dict[str, float]:
    """Top-1, top-5 and mean loss over a whole evaluation set."""
    model.eval()
    k = min(5, num_classes)
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    top1 = torch.zeros((), device=runtime.device, dtype=torch.float64)
    top5 = torch.zeros((), device=runtime.device, dtype=torch.float64)
    count = 0
    for x, y in batches.epoch(0):
        with runtime.autocast():
            logits = model(runtime.input_format(x))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.topk(k, dim=1).indices
        hits = pred.eq(y.view(-1, 1))
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        count += y.numel()
    if runtime.distributed:  # each rank evaluated its shard of the test set
        totals = torch.stack([loss_sum, top1, top5, torch.tensor(float(count), device=runtime.device, dtype=torch.float64)])
        dist.all_reduce(totals)
        loss_sum, top1, top5, count = totals[0], totals[1], totals[2], int(totals[3])
    count = max(count, 1)
    return {
        "test_loss": float(loss_sum) / count,
        "test_top1": 100.0 * float(top1) / count,
        "test_top5": 100.0 * float(top5) / count,
    }
