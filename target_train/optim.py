"""The RepOptimizers: torch's SGD / AdamW with the gradient masks of the scales built in.

``RepOptSGD`` applies mask, decay, momentum and update in one ``torch.compile``-d pass by default
where that is available and worth its compilation (auto: ``compiled=None``); otherwise (and with
``compiled=False``) it multiplies the masked gradients in one ``torch._foreach_mul_`` and hands over
to ``torch.optim.SGD.step`` unchanged, so foreach/fused kernels work as they do for SGD. Either way
``state_dict()`` and AMP's GradScaler work as for SGD, and weight decay is added *after* the mask,
unmasked (the official order, which is what makes the equivalence with CSLA exact).

``RepOptAdamW`` must multiply Adam's normalised *update* (not the gradient, which Adam would
normalise away) by M1 = |s_conv| + |s_1x1| + 1, elementwise. torch's AdamW has no elementwise
learning rate, so the step is AdamW's own foreach arithmetic with one extra multiply; the state
layout (``step``, ``exp_avg``, ``exp_avg_sq``) is torch's, so checkpoints interchange.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace
from typing import Iterable, Mapping

import torch
from torch import nn

from repopt.errors import ConfigError
from repopt.optim import OPTIMIZERS, StepOptions, build_plain, closure_loss, default_fused, param_groups

from .handler import grad_masks as make_grad_masks
from .handler import reinitialize
from .masks import masks_by_param

log = logging.getLogger("target_train.optim")


def _check_masks(optimizer: torch.optim.Optimizer, grad_masks: Mapping[nn.Parameter, torch.Tensor]) -> dict:
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    masks = {}
    for param, mask in grad_masks.items():
        if not isinstance(param, torch.Tensor):
            raise ConfigError("grad_masks must map Parameters to masks; use masks_by_param(model, grad_masks(model, scales))")
        if id(param) not in owned:
            raise ConfigError("grad_masks holds a parameter that is not in the optimizer's param groups")
        if mask.shape != param.shape:
            raise ConfigError(f"grad mask of shape {tuple(mask.shape)} does not fit its parameter of shape {tuple(param.shape)}")
        masks[param] = mask.to(device=param.device, dtype=param.dtype)
    return masks


def _masked_sgd(params, grads, bufs, masks, lrs, wds, options) -> None:
    """Per tensor: d = M*g + wd*p; buf = momentum*buf + d; p -= lr*(d + momentum*buf if nesterov else buf).

    Written per tensor so that ``torch.compile`` emits one loop reading p, g, M and buf once: the
    mask costs one extra read instead of a whole extra pass over the gradients. Every parameter
    group goes through one call (``lrs``, ``wds``: 0-d tensors; ``options``: (momentum, nesterov,
    maximize) per tensor), so a compilation either succeeds for the whole step or writes nothing.
    Called under ``torch.no_grad()``.
    """
    for p, g, buf, m, lr, wd, (momentum, nesterov, maximize) in zip(params, grads, bufs, masks, lrs, wds, options):
        d = g * m if m is not None else g
        if maximize:
            d = -d
        d = d + wd * p
        if momentum != 0:
            buf.mul_(momentum).add_(d)
            d = d + momentum * buf if nesterov else buf
        p.sub_(lr * d)


@functools.cache
def _masked_sgd_kernel():
    return torch.compile(_masked_sgd, fullgraph=True, dynamic=False)


# compiled=None (auto) compiles the step only for at least this many parameters: below it the
# compilation (seconds, once per model) outweighs what the single pass saves (microseconds per step)
AUTO_COMPILE_MIN_PARAMS = 1_000_000
COMPILE_DEVICES = ("cpu", "cuda")
COMPILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compiled_step_unavailable(params: Iterable[torch.Tensor], dampening: float = 0.0) -> str | None:
    """Why ``RepOptSGD``'s compiled step cannot run on ``params`` here; None when it can.

    Checks what can be known before compiling: dampening, devices and dtypes, that TorchDynamo
    runs on this Python and is not disabled, and inductor's tool chain (a C++ compiler for CPU
    kernels, Triton for CUDA ones). A compilation that still fails is caught at the first step.
    """
    if dampening != 0:
        return f"dampening={dampening:g} (the compiled step supports dampening=0 only)"
    params = list(params)
    devices = {p.device.type for p in params}
    if not devices <= set(COMPILE_DEVICES):
        other = ", ".join(sorted(devices - set(COMPILE_DEVICES)))
        return f"parameters on {other} (the compiled step runs on {', '.join(COMPILE_DEVICES)})"
    dtypes = {p.dtype for p in params}
    if not dtypes <= set(COMPILE_DTYPES):
        return f"parameters of dtype {', '.join(sorted(str(d) for d in dtypes - set(COMPILE_DTYPES)))}"
    try:
        import torch._dynamo
    except Exception as exc:  # any import failure means no compiler
        return f"torch._dynamo cannot be imported ({type(exc).__name__}: {exc})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if getattr(torch._dynamo.config, "disable", False):
        return "TorchDynamo is disabled (TORCHDYNAMO_DISABLE)"
    if "cuda" in devices:
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (inductor's CUDA kernels need it)"
    if "cpu" in devices:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:
            return None  # an older layout: the first step finds out
        try:
            get_cpp_compiler()
        except Exception as exc:  # inductor raises its own InvalidCxxCompiler
            return f"no working C++ compiler for inductor's CPU kernels ({type(exc).__name__})"
    return None


def _flat_params(params) -> tuple[list, list[torch.Tensor]]:
    """``params`` as torch.optim accepts them (tensors, (name, tensor) pairs or group dicts), materialized,
    and every tensor in it."""

    def tensors(entries):
        return [e[1] if isinstance(e, tuple) else e for e in entries]

    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])} for g in params]
        return groups, [p for g in groups for p in tensors(g["params"])]
    return params, tensors(params)


class RepOptSGD(torch.optim.SGD):
    """SGD whose gradients are multiplied by per-parameter masks before the usual update.

    Two implementations of the same step, with torch's state layout (``momentum_buffer``) either way:

    * the **compiled step**: one ``torch.compile``-d kernel applies mask, decay, momentum and step
      in a single pass over each parameter (it needs ``dampening=0``);
    * the **eager step**: the masks multiply the gradients in one ``torch._foreach_mul_``, then
      ``torch.optim.SGD.step`` runs unchanged, with its fused kernel where torch has one unless
      ``foreach`` / ``fused`` choose otherwise. One more pass over the masked gradients.

    ``compiled``: None (the default, auto) takes the compiled step when ``foreach`` and ``fused``
    are left unset, the parameters number at least ``AUTO_COMPILE_MIN_PARAMS`` and
    ``compiled_step_unavailable`` finds nothing against it; otherwise the eager step, with one
    warning naming the reason when the compiler was the obstacle. A compilation that fails at a
    step is caught (before any tensor is written), warned about once, and that step and all later
    ones run eagerly. True requires the compiled step: ConfigError when it is unavailable, and a
    failed compilation raises. False: always the eager step.
    """

    def __init__(
        self,
        params,
        grad_masks: Mapping[nn.Parameter, torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        compiled: bool | None = None,
    ):
        params, flat = _flat_params(params)
        chosen = foreach is not None or fused is not None
        if not chosen:
            fused = default_fused([{"params": flat}], None, None)
        self.compile_choice = compiled
        n = sum(p.numel() for p in flat)
        use, why, unavailable = False, "", False
        if compiled is False:
            why = "compiled=False"
        elif compiled is None and chosen:
            why = "foreach/fused chosen"
        elif compiled is None and n < AUTO_COMPILE_MIN_PARAMS:
            why = f"{n:,} parameters, under the {AUTO_COMPILE_MIN_PARAMS:,} that auto compiles for"
        else:
            why = compiled_step_unavailable(flat, dampening) or ""
            if why and compiled:
                raise ConfigError(
                    f"RepOptSGD(compiled=True) (optim.compile_step=true): the compiled step is not "
                    f"available: {why}; compile_step=null falls back to the eager step instead"
                )
            use, unavailable = not why, bool(why)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        self.grad_masks = _check_masks(self, grad_masks)
        self._scalars: dict[tuple, torch.Tensor] = {}
        self.compiled = False  # which step runs now: the compiled one, or the eager one for ``eager_reason``
        self.eager_reason: str | None = why
        if use:
            self._use_compiled()
        elif unavailable:
            log.warning(
                "RepOptSGD: the compiled single-pass step is not available (%s); using the eager step "
                "(mask pass + torch's %s SGD)",
                why,
                self._eager_kind(),
            )
        else:
            log.debug("RepOptSGD: eager step (%s; torch's %s SGD after the mask pass)", why, self._eager_kind())

    def _eager_kind(self) -> str:
        group = self.param_groups[0] if self.param_groups else {}
        return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "default"

    def _use_compiled(self) -> None:
        self.compiled, self.eager_reason = True, None
        # the kernel does not take GradScaler's scale / found_inf: GradScaler then unscales the
        # gradients and skips inf/nan steps itself before step(), as for any unfused optimizer
        self._step_supports_amp_scaling = False
        log.info(
            "RepOptSGD: compiled single-pass step (mask, decay, momentum and update in one kernel; the first step compiles it)"
        )

    def _fall_back(self, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.compiled, self.eager_reason = False, f"compilation failed ({type(exc).__name__}: {first})"
        log.warning(
            "RepOptSGD: compiling the single-pass step failed (%s: %s); this and every later step run the "
            "eager step (mask pass + torch's %s SGD)",
            type(exc).__name__,
            first,
            self._eager_kind(),
        )
        log.debug("RepOptSGD: the compilation error", exc_info=exc)

    def _scalar(self, name: str, index: int, value: float, like: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor holding ``value``: a changing lr must not recompile the kernel."""
        key = (name, index, like.device, like.dtype)
        t = self._scalars.get(key)
        if t is None:
            t = self._scalars[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        t.fill_(value)
        return t

    @torch.no_grad()
    def _compiled_update(self) -> None:
        params, bufs, lrs, wds, options, created = [], [], [], [], [], []
        for index, group in enumerate(self.param_groups):
            scalars: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["momentum"] != 0 and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)  # first step: 0*mom + d == torch's clone(d)
                    created.append(p)
                key = (p.device, p.dtype)
                if key not in scalars:
                    scalars[key] = (
                        self._scalar("lr", index, group["lr"], p),
                        self._scalar("wd", index, group["weight_decay"], p),
                    )
                params.append(p)
                bufs.append(state.get("momentum_buffer"))
                lrs.append(scalars[key][0])
                wds.append(scalars[key][1])
                options.append((group["momentum"], group["nesterov"], group["maximize"]))
        if not params:
            return
        try:
            _masked_sgd_kernel()(
                params, [p.grad for p in params], bufs, [self.grad_masks.get(p) for p in params], lrs, wds, options
            )
        except BaseException:
            for p in created:  # nothing was written: the eager step starts these buffers as torch does
                self.state[p].pop("momentum_buffer", None)
            raise

    @torch.no_grad()
    def apply_masks(self) -> None:
        """grad <- grad * M for every masked parameter that has a gradient (one foreach call)."""
        pairs = [(p.grad, m) for p, m in self.grad_masks.items() if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    def step(self, closure=None):
        loss = closure_loss(closure)
        if self.compiled:
            try:
                self._compiled_update()
                return loss
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # any compile failure: dynamo, inductor, the C++/Triton tool chain
                if self.compile_choice is True:
                    raise
                self._fall_back(exc)
        self.apply_masks()
        super().step()
        return loss


class RepOptAdamW(torch.optim.AdamW):
    """AdamW whose per-weight update is multiplied elementwise by the masks (decay stays decoupled)."""

    def __init__(
        self,
        params,
        grad_masks: Mapping[nn.Parameter, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize, foreach=foreach
        )
        self.grad_masks = _check_masks(self, grad_masks)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RepOptAdamW does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._step_bucket(group, params)
        return loss

    def _step_bucket(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        states = [self._init_state(p) for p in params]
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        step_values = [float(s) for s in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in step_values])
        torch._foreach_add_(denom, eps)
        masked = [(d, self.grad_masks[p]) for d, p in zip(denom, params) if p in self.grad_masks]
        if masked:  # m / (denom / M) == M * m / denom: the mask enters without another full-size buffer
            torch._foreach_div_([d for d, _ in masked], [m for _, m in masked])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in step_values])


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    weight_decay: float = 4e-5,
    *,
    scales: Mapping[str, torch.Tensor] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    options: StepOptions = StepOptions(),
    **changes,
) -> torch.optim.Optimizer:
    """SGD / AdamW over the official decay groups; with ``scales``, the RepOptimizer with their masks.

    ``build_optimizer(model, lr=lr, scales=scales, **optimizer_kwargs(cfg.optim))`` from a config;
    ``changes`` replace single ``StepOptions`` fields (``compiled=False``).
    The masks follow the optimizer (power 2 for SGD, |s| for AdamW). Re-initialization is separate
    (``reinitialize``) because a resumed run must not re-initialize; ``build_repopt`` does both.
    ``masks`` (name-keyed, built for this optimizer's rule) replaces ``scales`` where the masks no
    longer follow from the architecture: a pruned model's sliced masks (``target_train/pruning``).
    """
    o = replace(options, **changes)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if scales is not None and masks is not None:
        raise ConfigError("pass scales or masks, not both: the masks are either built from the scales or given")
    if scales is None and masks is None:
        return build_plain(model, lr, name=name, weight_decay=weight_decay, options=o)
    if getattr(model, "mode", None) != "target":
        raise ConfigError("scales (grad masks) apply to the straight-through target model only")
    groups = param_groups(model, weight_decay)
    by_param = masks_by_param(model, make_grad_masks(model, scales, rule=name) if masks is None else masks)
    if name == "sgd":
        # foreach / fused as given: RepOptSGD picks its own default (the compiled step, or the fused kernel)
        return RepOptSGD(
            groups,
            by_param,
            lr=lr,
            momentum=o.momentum,
            nesterov=o.nesterov and o.momentum > 0,
            foreach=o.foreach,
            fused=o.fused,
            compiled=o.compiled,
        )
    if o.compiled:
        log.warning("compiled=True (optim.compile_step=true) is ignored for %s: only RepOptSGD has a compiled step", name)
    return RepOptAdamW(groups, by_param, lr=lr, betas=tuple(o.betas), eps=o.eps, foreach=o.foreach)


def build_repopt(
    model: nn.Module,
    scales: Mapping[str, torch.Tensor],
    name: str = "sgd",
    lr: float = 0.1,
    weight_decay: float = 4e-5,
    use_identity_scales: bool = True,
    **kwargs,
) -> torch.optim.Optimizer:
    """One call: re-initialize ``model`` from ``scales``, build the masks and the RepOptimizer."""
    reinitialize(model, scales, use_identity_scales=use_identity_scales)
    return build_optimizer(model, name, lr, weight_decay, scales=scales, **kwargs)
