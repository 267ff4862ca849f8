"""RepOptSGD(compiled=True): the single-pass masked kernel equals the eager path and torch's state."""

import copy

import torch
import torch.nn.functional as F

from repopt import get_arch
from target_train import build_target_model, grad_masks, masks_by_param, param_groups
from target_train.optim import RepOptSGD

ARCH = get_arch("tiny", [1, 2, 2, 2, 1])


def _pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = {k: (torch.rand(v.shape, generator=gen) * 2 - 1) for k, v in ARCH.init_scales().items()}
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(build_target_model(ARCH, 10))
    return models, scales


def _opt(model, scales, compiled, lr=0.05):
    masks = masks_by_param(model, grad_masks(model, scales))
    return RepOptSGD(param_groups(model, 1e-3), masks, lr=lr, momentum=0.9, nesterov=True, compiled=compiled)


def test_compiled_step_equals_eager_step_over_training():
    (eager_model, compiled_model), scales = _pair()
    eager, compiled = _opt(eager_model, scales, False), _opt(compiled_model, scales, True)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (eager, compiled)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):  # the lr changes every step: the kernel must not bake it in
        x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        for model, opt in ((eager_model, eager), (compiled_model, compiled)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        for s in sched:
            s.step()
    for (name, a), b in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        if a.is_floating_point():
            assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) <= 1e-5, name
    moved = eager_model.stage1[0].conv.weight
    assert not torch.equal(moved, build_target_model(ARCH, 10).stage1[0].conv.weight)
    # the momentum buffers live where torch's SGD keeps them, so checkpoints interchange
    sd_eager, sd_compiled = eager.state_dict(), compiled.state_dict()
    assert sd_eager["state"].keys() == sd_compiled["state"].keys()
    for k, v in sd_eager["state"].items():
        a, b = v["momentum_buffer"], sd_compiled["state"][k]["momentum_buffer"]
        assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) <= 1e-4, k


def test_compiled_step_resumes_from_an_eager_state_dict():
    (a_model, b_model), scales = _pair(3)
    a, b = _opt(a_model, scales, False), _opt(b_model, scales, True)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    a.zero_grad()
    F.cross_entropy(a_model(x), y).backward()
    a.step()
    b_model.load_state_dict(a_model.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # state_dict() shares the buffers it returns
    for model, opt in ((a_model, a), (b_model, b)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_compiled_step_with_grad_scaler_skips_an_inf_step():
    (model, _), scales = _pair(5)
    opt = _opt(model, scales, True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.stage1[0].conv.weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert not torch.equal(before[0], next(model.parameters()))


def test_stage_two_app_trains_with_the_compiled_step(in_tmp):
    from target_train.app import main as target_main
    from tests.helpers.runs import TINY, read_json, run_hydra

    run_hydra(
        target_main,
        TINY + ["epochs=1", "scales=init", "deploy=false", "optim.compile_step=true", f"hydra.run.dir={in_tmp / 'run'}"],
    )
    metrics = read_json(in_tmp / "run" / "metrics.json")
    assert metrics["status"] == "completed" and metrics["optimizer"] == "RepOptSGD"
