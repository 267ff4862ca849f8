"""The benchmark CLI (``python -m pipelines.benchmark``) and the faithfulness of its loop baselines."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pipelines.bench.reference import LoopMaskedAdamW, LoopMaskedSGD
from pipelines.benchmark import main
from repopt.optim import param_groups
from repopt.vgg.arch import get_arch
from target_train import RepOptAdamW, RepOptSGD, build_target_model, grad_masks, masks_by_param

SECTION_ROWS = {
    "opt": {"sgd_foreach", "repopt_sgd_foreach", "repopt_sgd_default", "loop_sgd", "adamw_foreach", "repopt_adamw", "loop_adamw"},
    "train": {"target", "repvgg", "hs_unfused", "hs_fused"},
    "loader": {"device", "torchvision", "repopt_dataloader"},
    "hs_epoch": {"eager"},
}
RATIOS = {
    "opt": [
        "repopt_sgd_over_sgd_foreach",
        "loop_over_repopt_sgd_foreach",
        "repopt_sgd_default_over_sgd_fused",
        "repopt_adamw_over_adamw_foreach",
        "loop_over_repopt_adamw",
    ],
    "train": ["target_over_repvgg_img_s", "target_over_repvgg_peak_mem", "hs_fused_over_hs_unfused_img_s"],
    "loader": ["device_over_dataloader"],
    "hs_epoch": ["eager_s_per_50k", "best_s_per_50k"],
}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_benchmark_cli_tiny(tmp_path, restore_threads, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--device",
            "cpu",
            "--arch",
            "tiny",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--hs-images",
            "256",
            "--hs-batch",
            "64",
            "--resolution",
            "32",
            "--batch",
            "8",
            "--workers",
            "1",
            "--loader-epochs",
            "1",
            "--num-classes",
            "10",
            "--threads",
            "1",
            "--sections",
            "opt,train,loader,hs_epoch",
            "--out",
            str(out),
            "--json",
            "-q",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result  # --json: the same document on stdout
    assert set(result["sections"]) == set(SECTION_ROWS)
    for name, keys in SECTION_ROWS.items():
        sec = result["sections"][name]
        rows = {r["key"]: r for r in sec["rows"]}
        assert keys <= set(rows), (name, sorted(rows))
        for row in rows.values():
            assert positive(row["value"]), (name, row)
        for ratio in RATIOS[name]:
            assert positive(sec["ratios"][ratio]), (name, ratio, sec["ratios"])
    for row in result["sections"]["opt"]["rows"]:
        assert all(positive(ms) for ms in row["ms_all"]) and len(row["ms_all"]) == 3
    for row in result["sections"]["train"]["rows"]:
        assert positive(row["ms"]) and row["loss_finite"]
    # tiny is under the size at which the default step compiles: the eager step, and the note says why
    assert result["sections"]["opt"]["settings"]["repopt_sgd_default"]["step"] == "eager"
    assert any(n.startswith("RepOptSGD default step: eager (") for n in result["sections"]["opt"]["notes"])
    eager = result["sections"]["hs_epoch"]["rows"][0]
    assert positive(eager["images_per_s"]) and eager["loss_finite"] and eager["images"] == 256
    targets = {t["key"]: t for t in result["targets"]}
    assert len(targets) == 10
    assert all(t["status"] in ("PASS", "FAIL", "n/a") for t in targets.values())
    # tiny on CPU: no target applies (they are defined on B1 / on a GPU), but the values are reported
    assert all(t["status"] == "n/a" for t in targets.values())
    assert positive(targets["sgd_step_foreach"]["value"])
    assert result["meta"]["torch"] == torch.__version__


def test_opt_section_times_the_default_step_and_its_compilation(monkeypatch, single_thread):
    """The opt section's "RepOptSGD (default)" is the step the apps build: compiled where available,
    with the first step (the compilation) timed on its own; the eager step, with the reason, elsewhere."""
    import target_train.optim as optim_mod
    from pipelines.bench import opt_step
    from pipelines.benchmark import build_parser, resolve_settings

    monkeypatch.setattr(optim_mod, "AUTO_COMPILE_MIN_PARAMS", 0)  # tiny stands in for B1
    settings = resolve_settings(
        build_parser().parse_args(
            ["--device", "cpu", "--arch", "tiny", "--num-classes", "10", "--steps", "2", "--warmup", "1", "--sections", "opt"]
        )
    )
    sec = opt_step.run(settings)
    rows = {r["key"]: r for r in sec["rows"]}
    default = sec["settings"]["repopt_sgd_default"]
    assert positive(sec["ratios"]["repopt_sgd_default_over_sgd_fused"]) and positive(rows["repopt_sgd_default"]["first_step_s"])
    reason = optim_mod.compiled_step_unavailable(build_target_model(get_arch("tiny"), 10).parameters())
    if reason is None:
        assert default["step"] == "compiled" and default["eager_reason"] is None
        assert rows["repopt_sgd_default"]["label"] == "RepOptSGD (default): compiled step"
        assert 0 <= default["compile_s"] < default["first_step_s"]  # 0 when this process compiled it already
        assert any(n.startswith("RepOptSGD default step: compiled; first step") and "compile cost" in n for n in sec["notes"])
    else:
        assert default["step"] == "eager" and default["eager_reason"] == reason


def test_benchmark_cli_rejects_bad_sections(capsys):
    assert main(["--device", "cpu", "--sections", "opt,nope"]) == 2
    assert "--sections" in capsys.readouterr().err


ARCH = get_arch("tiny", strides=(1, 1, 2, 2, 2))  # identity blocks, stride-2 blocks, stage0 without identity


def _signed_scales(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 1.3 for k, shape in ARCH.scale_shapes().items()}


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_loop_reference_matches_repoptimizer(rule):
    """The per-parameter loop baselines compute what RepOptSGD / RepOptAdamW compute (fp64, 3 steps)."""
    torch.manual_seed(0)
    base = build_target_model(ARCH, 10).double()
    scales = _signed_scales()
    wd = 1e-2 if rule == "sgd" else 0.05
    models = [copy.deepcopy(base) for _ in range(3)]
    masks = [masks_by_param(m, grad_masks(m, scales, rule=rule)) for m in models]
    if rule == "sgd":
        kw = dict(lr=0.1, momentum=0.9, nesterov=True)
        opts = [
            RepOptSGD(param_groups(models[0], wd), masks[0], foreach=True, **kw),
            RepOptSGD(param_groups(models[1], wd), masks[1], foreach=False, **kw),
            LoopMaskedSGD(param_groups(models[2], wd), masks[2], **kw),
        ]
    else:
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
        opts = [
            RepOptAdamW(param_groups(models[0], wd), masks[0], **kw),
            RepOptAdamW(param_groups(models[1], wd), masks[1], **kw),
            LoopMaskedAdamW(param_groups(models[2], wd), masks[2], **kw),
        ]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in base.parameters()]
        for m, opt in zip(models, opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(models[2].parameters(), base.parameters()))
    assert moved > 1e-3
    for ref in models[:2]:
        for (name, p), q in zip(ref.named_parameters(), models[2].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("ceiling, note", [(4.1, "only 4.10x faster"), (7.0, "")])
def test_loop_target_failure_names_the_ceiling(ceiling, note):
    """A failed loop ratio says when even torch's fused SGD could not reach it on the device."""
    from pipelines.bench.report import evaluate_targets

    ratios = {"loop_over_repopt_sgd_fused": 3.0, "loop_over_sgd_fused": ceiling, "repopt_sgd_default_over_sgd_fused": 1.1}
    result = {"settings": {"device": "cpu"}, "sections": {"opt": {"settings": {"arch": "B1"}, "ratios": ratios}}}
    targets = {t["key"]: t for t in evaluate_targets(result)}
    assert targets["loop_vs_repopt_fused"]["status"] == "FAIL"
    assert (note in targets["loop_vs_repopt_fused"]["note"]) and (bool(note) == bool(targets["loop_vs_repopt_fused"]["note"]))
    assert targets["sgd_step_default"]["status"] == "PASS" and targets["sgd_step_default"]["note"] == ""
    assert targets["train_img_s"]["status"] == "n/a"
