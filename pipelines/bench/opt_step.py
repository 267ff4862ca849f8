"""Section ``opt``: one optimizer step on the parameters of an architecture's RepOpt-VGG target.

The gradients are random and set once. ``RepOptSGD``'s eager step multiplies them by the masks in
place, so they are restored from a saved copy before each of its steps, outside the timed region;
every other optimizer leaves them untouched. ``RepOptSGD (default)`` is built as the apps build it
(no implementation chosen): the compiled single-pass step where it is available, else the eager
step; its first step, which compiles the kernel, is timed on its own and reported in the notes.
All optimizers share the same parameters (fp32), use the official weight-decay groups
(``repopt.optim.param_groups``) and are timed in interleaved rounds (one step of each per round),
so that a change in machine load hits them alike.
"""

from __future__ import annotations

import logging
import time

import torch

from repopt.errors import ConfigError
from repopt.optim import param_groups
from repopt.scales import random_scales
from repopt.vgg.arch import get_arch
from target_train import RepOptAdamW, RepOptSGD, build_target_model, grad_masks, masks_by_param

from .reference import LoopMaskedAdamW, LoopMaskedSGD
from .settings import Settings
from .timing import free_memory, ratio, summarize_ms, sync, time_rounds, timing_note

log = logging.getLogger("repopt.benchmark")

SGD_ARGS = dict(lr=0.1, momentum=0.9, nesterov=True)
SGD_WD = 4e-5  # conf/optim/sgd.yaml
ADAMW_ARGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
ADAMW_WD = 0.05  # conf/optim/adamw.yaml
FUSED_SGD_BYTES_PER_WEIGHT = 20  # fp32 momentum SGD: read p, g, buf; write p, buf


def _sgd_variants():
    """(key, label, factory(groups, masks), mutates_grads); None: the optimizer's step decides (eager or compiled)."""
    return [
        ("sgd_foreach", "torch SGD (foreach)", lambda g, m: torch.optim.SGD(g, foreach=True, **SGD_ARGS), False),
        ("sgd_fused", "torch SGD (fused)", lambda g, m: torch.optim.SGD(g, fused=True, **SGD_ARGS), False),
        ("repopt_sgd_foreach", "RepOptSGD (foreach)", lambda g, m: RepOptSGD(g, m, foreach=True, **SGD_ARGS), True),
        ("repopt_sgd_fused", "RepOptSGD (fused)", lambda g, m: RepOptSGD(g, m, fused=True, **SGD_ARGS), True),
        # what the apps get (optim.compile_step=null); before the compiled variant, so that its first step compiles
        ("repopt_sgd_default", "RepOptSGD (default)", lambda g, m: RepOptSGD(g, m, **SGD_ARGS), None),
        # one torch.compile-d pass: mask, decay, momentum and step (optim.compile_step=true)
        ("repopt_sgd_compiled", "RepOptSGD (compiled step)", lambda g, m: RepOptSGD(g, m, compiled=True, **SGD_ARGS), False),
        # the official step adds the decay to unmasked gradients in place
        ("loop_sgd", "per-parameter loop SGD + mask (official)", lambda g, m: LoopMaskedSGD(g, m, **SGD_ARGS), True),
    ]


def _adamw_variants():
    return [
        ("adamw_foreach", "torch AdamW (foreach)", lambda g, m: torch.optim.AdamW(g, foreach=True, **ADAMW_ARGS), False),
        ("adamw_fused", "torch AdamW (fused)", lambda g, m: torch.optim.AdamW(g, fused=True, **ADAMW_ARGS), False),
        ("repopt_adamw", "RepOptAdamW (foreach)", lambda g, m: RepOptAdamW(g, m, foreach=True, **ADAMW_ARGS), False),
        ("loop_adamw", "per-parameter loop AdamW + mask", lambda g, m: LoopMaskedAdamW(g, m, **ADAMW_ARGS), False),
    ]


def run(settings: Settings) -> dict:
    device = settings.device
    arch = get_arch(settings.opt_arch)
    torch.manual_seed(settings.seed)
    model = build_target_model(arch, settings.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    saved = [p.grad.clone() for p in params]
    grads = [p.grad for p in params]

    def restore():
        torch._foreach_copy_(grads, saved)  # noqa: F821 (bound above; deleted after the timing)

    scales = random_scales(arch, settings.seed, signed=False)
    masks = {rule: masks_by_param(model, grad_masks(model, scales, rule=rule)) for rule in ("sgd", "adamw")}
    rows: dict[str, dict] = {}
    notes: list[str] = []
    plan = [("sgd", SGD_WD, v) for v in _sgd_variants()] + [("adamw", ADAMW_WD, v) for v in _adamw_variants()]
    calls, meta, first_s = {}, {}, {}
    opt = None
    default_step = None
    for rule, wd, (key, label, factory, mutates) in plan:
        try:  # construct and take the first (untimed) step: some fused kernels only refuse a device there
            opt = factory(param_groups(model, wd), masks[rule])
            before = _inductor_cache_counts()
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            first_s[key] = time.perf_counter() - t0
        except (RuntimeError, ValueError, TypeError, NotImplementedError, ConfigError) as exc:
            notes.append(f"{label}: not available on {device.type} ({str(exc).splitlines()[0][:120]})")
            log.info("opt: %s skipped (%s)", label, exc)
            continue
        finally:
            restore()
        if mutates is None:
            mutates = not getattr(opt, "compiled", False)
        if key == "repopt_sgd_default":
            compiled = bool(getattr(opt, "compiled", False))
            label = f"{label}: {'compiled step' if compiled else 'eager step'}"
            default_step = {
                "step": "compiled" if compiled else "eager",
                "eager_reason": getattr(opt, "eager_reason", None),
                "first_step_s": first_s[key],
                "inductor_cache": _cache_delta(before, _inductor_cache_counts()),
            }
        calls[key] = (opt.step, restore if mutates else None)
        meta[key] = (label, rule)
    del opt
    samples = time_rounds(calls, device, settings.steps, max(settings.warmup - 1, 0))
    for key, ms in samples.items():
        label, rule = meta[key]
        rows[key] = {"key": key, "label": label, "group": rule, "unit": "ms/step", **summarize_ms(ms)}
        rows[key]["value"] = rows[key]["ms"]
        rows[key]["first_step_s"] = first_s[key]
        log.info("opt: %-34s %9.3f ms/step (median of %d)", label, rows[key]["ms"], len(ms))
    restore()
    del calls
    n_params = sum(p.numel() for p in params)
    if "sgd_fused" in rows:
        gb_s = FUSED_SGD_BYTES_PER_WEIGHT * n_params / (rows["sgd_fused"]["ms"] * 1e6)
        notes.append(
            f"torch fused SGD moves {FUSED_SGD_BYTES_PER_WEIGHT} bytes per fp32 weight (reads p, g, buf; writes p, buf): "
            f"{gb_s:,.0f} GB/s effective. A masked step moves at least as much, so loop / torch fused SGD "
            "bounds loop / RepOptSGD when the device is bandwidth-bound."
        )
    if default_step is not None and "repopt_sgd_default" in rows:
        compiled = default_step["step"] == "compiled"
        steady_s = rows["repopt_sgd_default"]["ms"] / 1e3
        default_step["compile_s"] = max(default_step["first_step_s"] - steady_s, 0.0) if compiled else 0.0
        cache = default_step["inductor_cache"]
        if compiled:
            notes.append(
                f"RepOptSGD default step: compiled; first step {default_step['first_step_s']:.2f} s (compile cost "
                f"{default_step['compile_s']:.2f} s"
                + (f"; inductor cache: {cache}" if cache else "")
                + f"), then {rows['repopt_sgd_default']['ms']:.3f} ms/step"
            )
        else:
            notes.append(f"RepOptSGD default step: eager ({default_step['eager_reason']})")
    ratios = {
        # the step the apps run (optim.compile_step=null)
        "repopt_sgd_default_over_sgd_fused": ratio(rows, "repopt_sgd_default", "sgd_fused"),
        "loop_over_repopt_sgd_default": ratio(rows, "loop_sgd", "repopt_sgd_default"),
        "repopt_sgd_over_sgd_foreach": ratio(rows, "repopt_sgd_foreach", "sgd_foreach"),
        "repopt_sgd_over_sgd_fused": ratio(rows, "repopt_sgd_fused", "sgd_fused"),
        "loop_over_repopt_sgd_foreach": ratio(rows, "loop_sgd", "repopt_sgd_foreach"),
        "loop_over_repopt_sgd_fused": ratio(rows, "loop_sgd", "repopt_sgd_fused"),
        "repopt_sgd_compiled_over_sgd_fused": ratio(rows, "repopt_sgd_compiled", "sgd_fused"),
        "loop_over_repopt_sgd_compiled": ratio(rows, "loop_sgd", "repopt_sgd_compiled"),
        # the ceiling of loop / RepOptSGD: torch's fused SGD does the same memory traffic minus the mask
        "loop_over_sgd_fused": ratio(rows, "loop_sgd", "sgd_fused"),
        "repopt_adamw_over_adamw_foreach": ratio(rows, "repopt_adamw", "adamw_foreach"),
        "repopt_adamw_over_adamw_fused": ratio(rows, "repopt_adamw", "adamw_fused"),
        "loop_over_repopt_adamw": ratio(rows, "loop_adamw", "repopt_adamw"),
    }
    n_masked = len(masks["sgd"])
    result = {
        "title": f"optimizer step on {arch.name} parameters",
        "settings": {
            "arch": arch.name,
            "num_classes": settings.num_classes,
            "dtype": "float32",
            "num_params": n_params,
            "num_tensors": len(params),
            "num_masked_tensors": n_masked,
            "steps": settings.steps,
            "warmup": settings.warmup,
            "sgd": {**SGD_ARGS, "weight_decay": SGD_WD},
            "adamw": {**ADAMW_ARGS, "weight_decay": ADAMW_WD},
            "timing": timing_note(device, "variants"),
            "repopt_sgd_default": default_step,
        },
        "rows": list(rows.values()),
        "ratios": ratios,
        "notes": notes,
    }
    del model, params, grads, saved, masks
    free_memory(device)
    return result


def _inductor_cache_counts() -> dict:
    """inductor's FX-graph cache hits and misses so far in this process (empty where torch does not count them)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # no dynamo: nothing compiles
        return {}
    return {k: counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss")}


def _cache_delta(before: dict, after: dict) -> str:
    """What the first step found in inductor's on-disk cache: "1 hit" (compiled by an earlier run),
    "1 miss" (compiled now), "" (nothing compiled)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("hit", "miss")}
    return ", ".join(f"{v} {k}" for k, v in delta.items() if v) if any(delta.values()) else ""
