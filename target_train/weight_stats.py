"""Weight statistics of a folded model's layers: how long-tailed each kernel is, which is what makes
an int8 grid (per tensor or per channel) lose precision; recorded in quant.json."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def layer_stats(deployed: torch.nn.Module) -> list[dict]:
    """Weight statistics of every folded conv (and the linear head), in network order.

    A layer is named by its block (``stage1.0``; a conv inside a block keeps its path) and its
    kind says the kernel: ``conv3x3``, ``conv1x1``, ``dw3x3`` (depthwise), ``linear``.

    ``absmax_over_std`` = max|W| / std(W) over the whole tensor: a per-tensor int8 grid spends its
    255 steps on [-max|W|, max|W|], so the larger this ratio, the fewer steps the bulk of the weights
    gets. ``channel_absmax_over_std_max`` is the same ratio for the worst output channel, which is
    what per-channel quantization faces.
    """
    rows = []
    layers = []
    for name, module in deployed.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0]
            kind = f"dw{k}x{k}" if module.groups > 1 and module.groups == module.in_channels else f"conv{k}x{k}"
            layers.append((name.removesuffix(".conv"), kind, module, module.stride[0]))
        elif isinstance(module, torch.nn.Linear):
            layers.append((name, "linear", module, None))
    for name, kind, module, stride in layers:
        w = module.weight.detach().double()
        flat = w.reshape(w.shape[0], -1)
        std = float(w.std())
        absmax = float(w.abs().max())
        ch_std = flat.std(dim=1).clamp_min(1e-12)
        ch_ratio = flat.abs().amax(dim=1) / ch_std
        rows.append(
            {
                "name": name,
                "kind": kind,
                "out_channels": int(w.shape[0]),
                "in_channels": int(w.shape[1]),
                "stride": stride,
                "weight_min": float(w.min()),
                "weight_max": float(w.max()),
                "weight_absmax": absmax,
                "weight_std": std,
                "absmax_over_std": absmax / std if std > 0 else math.inf,
                "channel_absmax_over_std_max": float(ch_ratio.max()),
                "channel_absmax_over_std_median": float(ch_ratio.median()),
                "bias_absmax": float(module.bias.detach().abs().max()) if module.bias is not None else None,
            }
        )
    return rows


def summarize_layers(rows: list[dict]) -> dict:
    convs = [r["absmax_over_std"] for r in rows if r["kind"] != "linear"]
    worst = max((r for r in rows if r["kind"] != "linear"), key=lambda r: r["absmax_over_std"])
    t = torch.tensor(convs, dtype=torch.float64)
    return {
        "conv_absmax_over_std_median": float(t.median()),
        "conv_absmax_over_std_mean": float(t.mean()),
        "conv_absmax_over_std_max": float(t.max()),
        "conv_absmax_over_std_worst_layer": worst["name"],
    }
