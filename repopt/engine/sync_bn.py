"""Batch norm over the global batch of a DDP run, on any backend.

torch's ``SyncBatchNorm`` is CUDA-only; this one uses ``all_reduce`` only, so a gloo (CPU) run
normalizes over the same global batch as a single process would — which is what makes a 2-process
run reproduce a 1-process run with the same global batch. On CUDA the runtime uses torch's own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        total = torch.cat([x.sum(dims), count])
        dist.all_reduce(total)
        n = total[-1]
        mean = total[:channels] / n
        centered = x - mean.view(1, -1, 1, 1)
        sq = centered.square().sum(dims)
        dist.all_reduce(sq)
        var = sq / n
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(xhat, weight, invstd, n)
        out = xhat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        return out, mean, var, n

    @staticmethod
    def backward(ctx, grad_out, _mean, _var, _n):
        xhat, weight, invstd, n = ctx.saved_tensors
        dims = [d for d in range(grad_out.dim()) if d != 1]
        grad_bias = grad_out.sum(dims)
        grad_weight = (grad_out * xhat).sum(dims)
        both = torch.cat([grad_bias, grad_weight])
        dist.all_reduce(both)  # sums over the global batch (DDP later averages the parameter grads)
        channels = weight.shape[0]
        sum_dy, sum_dy_xhat = both[:channels], both[channels:]
        grad_x = (
            (weight * invstd).view(1, -1, 1, 1)
            / n
            * (n * grad_out - sum_dy.view(1, -1, 1, 1) - xhat * sum_dy_xhat.view(1, -1, 1, 1))
        )
        return grad_x, grad_weight, grad_bias, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` (same parameters, buffers and state-dict keys) whose training-mode
    statistics cover every rank's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        out, mean, var, n = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm2d`` for a global one, in place where possible (weights kept)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child))
    return module


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BN for a distributed run: torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_global_bn(model)
