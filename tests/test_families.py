"""family=vgg|ghostnet through the configs, both stage apps, the pipeline, export and compare."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

import pipelines.config  # noqa: F401  (registers the pipeline schema)
from hypersearch.config import HSConfig
from pipelines.compare import compare
from pipelines.config import PipelineConfig
from pipelines.search_and_train import main as pipeline_main
from repopt.config import to_typed
from repopt.engine import load_checkpoint
from repopt.errors import ConfigError
from repopt.family import build_model, spec_from_dict
from repopt.scales import read_scales
from target_train.config import TargetConfig
from tests.helpers.runs import logits_without_the_project, pipeline_overrides, read_json, run_hydra


def _compose(name, overrides=()):
    with initialize_config_module("repopt.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_family_chooses_its_default_member_in_every_app():
    hs = to_typed(_compose("hypersearch", ["family=ghostnet"]), HSConfig)
    target = to_typed(_compose("target_train", ["family=ghostnet"]), TargetConfig)
    job = to_typed(_compose("search_and_train", ["family=ghostnet"]), PipelineConfig)
    assert (hs.family, hs.arch.name) == ("ghostnet", "ghostnet_0_5x")
    assert (target.family, target.arch.name, target.scales) == ("ghostnet", "ghostnet_0_5x", "official")
    assert (job.hs.family, job.target.family, job.hs.arch.name, job.target.arch.name) == (
        "ghostnet",
        "ghostnet",
        "ghostnet_0_5x",
        "ghostnet_0_5x",
    )
    assert to_typed(_compose("target_train"), TargetConfig).arch.name == "B1"  # vgg stays the default
    assert read_scales(target.scales, target.arch.spec()).path.name == "RepOptGhostNet_0_5x_scales.pth"
    swept = to_typed(_compose("search_and_train", ["sweep=families_cpu", "family=ghostnet"]), PipelineConfig)
    assert swept.hs.arch.name == swept.target.arch.name == "ghostnet_0_25x"


@pytest.mark.parametrize(
    "app,overrides,needle",
    [
        ("target_train", ["family=ghostnet", "arch=B1"], "arch=B1 is a vgg architecture but family=ghostnet"),
        ("target_train", ["family=ghostnet", "model=repvgg"], "the ghostnet baseline is model=rep"),
        ("target_train", ["model=rep"], "the vgg baseline is model=repvgg"),
        ("hypersearch", ["family=ghostnet", "arch.num_blocks=[1,1,1,1]"], "apply to the vgg family only"),
        ("search_and_train", ["family=ghostnet", "hs.family=vgg"], "hs.family=vgg differs from family=ghostnet"),
    ],
)
def test_mismatched_family_settings_are_one_clear_error(app, overrides, needle):
    schema = {"target_train": TargetConfig, "hypersearch": HSConfig, "search_and_train": PipelineConfig}[app]
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        to_typed(_compose(app, overrides), schema)


def test_unknown_family_is_named():
    with pytest.raises(ConfigError, match="family='resnet': must be one of vgg, ghostnet"):
        to_typed({"family": "resnet"}, HSConfig)


def _ghostnet_overrides() -> list[str]:
    swap = {
        "arch@hs.arch=tiny": "arch@hs.arch=ghostnet_tiny",
        "arch@target.arch=tiny": "arch@target.arch=ghostnet_tiny",
        "target.deploy=false": "target.deploy=true",
    }
    return ["family=ghostnet"] + [swap.get(o, o) for o in pipeline_overrides()]


def test_ghostnet_pipeline_end_to_end(in_tmp):
    """HS -> scales -> target -> deploy.pt (loads without the project) -> ONNX/INT8, and the RepGhostNet
    baseline, as two jobs of one sweep that compare lists by family and variant."""
    sweep = in_tmp / "sweep"
    run_hydra(
        pipeline_main,
        ["-m"]
        + _ghostnet_overrides()
        + [
            "variant=searched,repvgg",
            "export=true",
            "quant.calibration_images=32",
            "quant.latency_runs=2",
            f"hydra.sweep.dir={sweep}",
        ],
    )
    searched, baseline = sweep / "0", sweep / "1"
    job = read_json(searched / "metrics.json")
    assert job["status"] == "completed" and job["hs"]["family"] == job["target"]["family"] == "ghostnet"
    assert job["hs_scales_sha256"] == job["scales_sha256"]
    scales = read_scales(searched / "hs", "ghostnet_tiny").tensors
    assert all(".ghost" in k for k in scales) and len(scales) == 4 * len(spec_from_dict(job["target"]["arch_spec"]).bottlenecks)
    assert job["target"]["optimizer"] == "RepOptSGD" and job["quant"]["int8_top1"] is not None
    assert (searched / "target" / "model.int8.onnx").is_file()
    base = read_json(baseline / "metrics.json")
    assert base["status"] == "completed" and base["target"]["model"] == "rep" and base["target"]["optimizer"] == "SGD"

    ckpt = load_checkpoint(searched / "target" / "last.pt")
    model = build_model(spec_from_dict(ckpt["arch"]), ckpt["num_classes"], "target")
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    out = logits_without_the_project(searched / "target" / "deploy.pt", x, in_tmp)
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-5

    table = compare([sweep], plots=False)
    assert sorted(table["variant"]) == ["repvgg", "searched"]


def test_compare_treats_the_family_as_a_swept_setting(in_tmp):
    """sweep=families_cpu picks each family's CPU member; a family=vgg,ghostnet sweep is one table with
    a family column (here on synthetic data, the plain variant only, one short epoch)."""
    sweep = in_tmp / "sweep"
    stage = [
        "data=synthetic",
        "data.synthetic_train_size=64",
        "data.synthetic_test_size=32",
        "data.batch_size=32",
        "epochs=1",
        "sched.warmup_epochs=0",
        "device=cpu",
        "progress=off",
        "compile=false",
    ]
    overrides = [
        "sweep=families_cpu",
        "family=vgg,ghostnet",
        "variant=plain",
        "target.deploy=false",
        "data@hs.data=synthetic",
        "data@target.data=synthetic",
    ] + [f"target.{o}" for o in stage if not o.startswith("data=")]
    run_hydra(pipeline_main, ["-m"] + overrides + [f"hydra.sweep.dir={sweep}"])
    rows = {read_json(sweep / j / "metrics.json")["target"]["arch"]: read_json(sweep / j / "metrics.json") for j in ("0", "1")}
    assert set(rows) == {"small", "ghostnet_0_25x"} and all(r["status"] == "completed" for r in rows.values())
    table = compare([sweep], plots=False)
    assert "family" in table and sorted(table["family"]) == ["ghostnet", "vgg"]


def test_ema_and_mixup_train_a_ghostnet_target_on_the_device_loader(tmp_path):
    """The ImageNet recipe's options are family-agnostic: a GhostNet target with EMA and mixup on the
    device loader (synthetic 32 px) evaluates and delivers the EMA, and deploy.pt folds it."""
    from repopt.family import get_spec
    from target_train.app import main as target_main
    from target_train.deploy import load_deployed
    from tests.helpers.runs import TINY

    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("arch")] + [
        "family=ghostnet",
        "arch=ghostnet_tiny",
        "arch.strides=[1,2,2,2,1]",
        "scales=init",
        "data.loader=device",
        "ema.enabled=true",
        "ema.decay=0.9",
        "mix.mixup_alpha=0.4",
        f"hydra.run.dir={run_dir}",
    ]
    run_hydra(target_main, overrides)
    m = read_json(run_dir / "metrics.json")
    assert m["status"] == "completed" and m["family"] == "ghostnet" and m["delivered"] == "ema"
    assert m["ema_top1"] is not None and m["deploy_max_rel_diff"] <= 1e-4
    history = (run_dir / "history.csv").read_text().splitlines()
    assert "ema_test_top1" in history[0] and len(history) == 1 + 2
    ckpt = load_checkpoint(run_dir / "last.pt")
    spec = get_spec("ghostnet_tiny", strides=(1, 2, 2, 2, 1))
    ema, raw = build_model(spec, 10, "target"), build_model(spec, 10, "target")
    ema.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")})
    raw.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        deployed, want, trained = load_deployed(run_dir / "deploy.pt")(x), ema.eval()(x), raw.eval()(x)
    scale = float(want.abs().max())
    assert float((deployed - want).abs().max()) <= 1e-4 * scale  # deploy.pt folds the final EMA ...
    assert float((deployed - trained).abs().max()) > 1e-2 * scale  # ... not the trained weights
