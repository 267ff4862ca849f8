"""QARepVGG, the VGG family's second baseline (``model=qarepvgg`` / ``variant=qarepvgg``): its block
folds exactly into the deployed conv, stage two trains it with a plain optimizer and writes the folded
deploy.pt, the pipeline trains and INT8-exports it, and the pruning step accepts its runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.compare import compare
from pipelines.config import VARIANTS, PipelineConfig
from pipelines.job import stage_configs
from pipelines.search_and_train import main as pipeline_main
from repopt.config import to_typed
from repopt.engine import load_checkpoint
from repopt.errors import ConfigError
from repopt.family import build_model, get_family
from repopt.modules import fold_bn
from repopt.numerics import rel_diff
from repopt.vgg import MODES
from repopt.vgg.arch import BlockSpec
from repopt.vgg.blocks import DeployBlock, QARepVGGBlock
from target_train.config import MODELS, TargetConfig
from target_train.families.vgg import fold_block, fuse
from target_train.finished_run import load_model
from target_train.model import build_baseline_model
from tests.helpers.runs import logits_without_the_project, pipeline_overrides, read_json, run_hydra, train_tiny_target
from tests.test_fuse import make_trained_like

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["latency_runs=2", "latency_warmup=0", "threads=1", "progress=off"]


def _spec(in_ch: int, out_ch: int, stride: int) -> BlockSpec:
    return BlockSpec(name="b", stage=1, index=0, in_channels=in_ch, out_channels=out_ch, stride=stride)


def _randomized(block: QARepVGGBlock, dtype, seed: int) -> QARepVGGBlock:
    """Every BN's statistics and affine parameters set to random values far from their init (both BNs:
    the 3x3 branch's and the one after the sum), in eval mode."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, scale=1.0):
        return scale * torch.randn(t.shape, generator=g, dtype=torch.float64)

    block = block.to(torch.float64)
    with torch.no_grad():
        for bn in (block.rbr_dense.bn, block.bn):
            bn.weight.copy_(1.0 + rnd(bn.weight, 0.4))
            bn.bias.copy_(rnd(bn.bias, 0.3))
            bn.running_mean.copy_(rnd(bn.running_mean, 0.5))
            bn.running_var.copy_(torch.exp(rnd(bn.running_var, 0.5)))
    return block.to(dtype).eval()


def _pre_relu(block: QARepVGGBlock, x: torch.Tensor) -> torch.Tensor:
    out = block.rbr_dense(x) + block.rbr_1x1(x)
    if block.has_identity:
        out = out + block.rbr_identity(x)
    return block.bn(out)


# ---------------------------------------------------------------------------- the block
def test_block_layout_and_registration():
    """YOLOv6's layout: BN only on the 3x3 branch and after the sum; the identity is a bare skip."""
    block = QARepVGGBlock(_spec(8, 8, 1))
    assert isinstance(block.rbr_dense.bn, nn.BatchNorm2d)
    assert isinstance(block.rbr_1x1, nn.Conv2d) and block.rbr_1x1.bias is None
    assert isinstance(block.rbr_identity, nn.Identity) and isinstance(block.bn, nn.BatchNorm2d)
    assert [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["rbr_dense.bn", "bn"]
    assert not QARepVGGBlock(_spec(8, 16, 1)).has_identity and not QARepVGGBlock(_spec(8, 8, 2)).has_identity
    vgg = get_family("vgg")
    assert vgg.baseline_modes == ("repvgg", "qarepvgg") and "qarepvgg" in vgg.modes and "qarepvgg" in MODES
    assert "qarepvgg" not in get_family("ghostnet").modes
    assert "qarepvgg" in MODELS and build_model("tiny", 10, "qarepvgg").mode == "qarepvgg"
    assert build_baseline_model("tiny", 10, "qarepvgg").mode == "qarepvgg"
    assert build_baseline_model("tiny", 10).mode == "repvgg"  # the family's main baseline stays the default
    with pytest.raises(ConfigError, match="'qarepvgg' is not a ghostnet baseline"):
        build_baseline_model("ghostnet_tiny", 10, "qarepvgg")


@pytest.mark.parametrize("in_ch,out_ch,stride", [(8, 8, 1), (8, 16, 1), (8, 8, 2)], ids=["identity", "widening", "strided"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_block_folds_exactly(in_ch, out_ch, stride, dtype, tol):
    block = _randomized(QARepVGGBlock(_spec(in_ch, out_ch, stride)), dtype, seed=in_ch * out_ch + stride)
    x = torch.randn(3, in_ch, 9, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    kernel, bias = fold_block(block)
    assert kernel.shape == (out_ch, in_ch, 3, 3) and kernel.dtype == dtype
    with torch.no_grad():
        ref = _pre_relu(block, x)
        out = F.conv2d(x, kernel, bias, stride, 1)
        assert (ref - ref.mean(0)).abs().max() > 0.05 * ref.abs().max()  # input-dependent, not only biases
        assert rel_diff(out, ref) <= tol
        assert rel_diff(F.relu(out), block(x)) <= tol
        # the post-sum BN must scale the 3x3 branch's folded bias too: leaving it out is visibly wrong
        _, b3 = fold_bn(block.rbr_dense.conv.weight, block.rbr_dense.bn)
        _, naive_bias = fold_bn(kernel, block.bn)
        assert rel_diff(F.conv2d(x, kernel, naive_bias + b3, stride, 1), ref) > 1e-2
        if block.has_identity:  # so is dropping the identity
            assert rel_diff(out - x, ref) > 1e-2


@pytest.mark.parametrize("strides", [None, (1, 1, 2, 2, 2)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_tiny_model_folds_exactly(strides, dtype, tol):
    model = make_trained_like("qarepvgg", strides, dtype, seed=11)
    if strides is not None:
        assert any(b.has_identity for _, b in model.blocks())
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    deployed = fuse(model)
    model.eval()
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    assert (ref - ref.mean(0)).abs().max() > 0.05 * ref.abs().max()
    assert rel_diff(out, ref) <= tol
    assert all(isinstance(b, DeployBlock) for _, b in deployed.blocks())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


# ---------------------------------------------------------------------------- the settings
def test_settings_accept_it_for_vgg_only():
    to_typed({"model": "qarepvgg", "scales": "none"}, TargetConfig)
    with pytest.raises(ConfigError, match=r"model=qarepvgg is not a ghostnet model; the ghostnet baseline is model=rep"):
        to_typed({"family": "ghostnet", "arch": {"name": "ghostnet_tiny"}, "model": "qarepvgg"}, TargetConfig)
    with pytest.raises(ConfigError, match=r"the vgg baseline is model=repvgg \(or model=qarepvgg, model=target\)"):
        to_typed({"model": "rep"}, TargetConfig)
    assert "qarepvgg" in VARIANTS
    hs, target = stage_configs(PipelineConfig(variant="qarepvgg"))
    assert hs is None and (target.model, target.scales) == ("qarepvgg", "none")
    with pytest.raises(ConfigError, match="variant=qarepvgg trains QARepVGG, a vgg baseline; family=ghostnet"):
        to_typed(
            {"family": "ghostnet", "variant": "qarepvgg", "hs": {"family": "ghostnet"}, "target": {"family": "ghostnet"}},
            PipelineConfig,
        )


# ---------------------------------------------------------------------------- stage two, export, pruning
@pytest.fixture(scope="module")
def qarepvgg_run(workdir) -> Path:
    return train_tiny_target(workdir, "qarepvgg", ["model=qarepvgg"])


def test_stage_two_trains_it_plainly_and_deploys_the_folded_model(qarepvgg_run, workdir):
    metrics = read_json(qarepvgg_run / "metrics.json")
    assert metrics["status"] == "completed" and metrics["model"] == "qarepvgg" and metrics["optimizer"] == "SGD"
    assert metrics["scales"]["kind"] == "none" and metrics["deploy_max_rel_diff"] <= 1e-4
    ckpt = load_checkpoint(qarepvgg_run / "last.pt")
    assert (
        ckpt["mode"] == "qarepvgg" and "stage1.0.rbr_1x1.weight" in ckpt["model"] and "stage1.0.bn.running_var" in ckpt["model"]
    )
    model, _ = load_model(qarepvgg_run / "last.pt")  # the export and pruning steps' loader accepts it
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, folded = model(x), fuse(model)(x)
    out = logits_without_the_project(qarepvgg_run / "deploy.pt", x, workdir)
    assert rel_diff(out, folded) <= 1e-6 and rel_diff(out, expected) <= 1e-5


def test_pruned_in_its_deployed_form_by_default(qarepvgg_run):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    from target_train.prune import main as prune_main

    run_hydra(prune_main, [f"run={qarepvgg_run}", "epochs=1", "max_steps_per_epoch=1"] + FAST)
    m = read_json(qarepvgg_run / "pruned" / "metrics.json")
    assert m["status"] == "completed" and m["channel_pruning"]["method"] == "qarepvgg-deploy" and m["optimizer"] == "SGD"
    assert m["channel_pruning"]["repvgg_mode"] == "deploy" and m["channel_pruning"]["onnx_fp32_max_rel_diff"] <= 1e-4
    assert all(a < b for a, b in zip(m["channel_pruning"]["widths_after"], m["channel_pruning"]["widths_before"]) if b >= 16)


def test_pruned_with_its_branches(qarepvgg_run):
    """``repvgg_mode=branches``: the identity skips tie each chain to one channel set, as in RepVGG;
    the pruned multi-branch model is fine-tuned and then folds like the unpruned one."""
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    from target_train.prune import main as prune_main
    from target_train.pruning.channels import ChannelPlan

    run_hydra(
        prune_main,
        [f"run={qarepvgg_run}", "repvgg_mode=branches", "round_to=null", "epochs=1", "max_steps_per_epoch=1", "out=branches"]
        + FAST,
    )
    plan = ChannelPlan.from_dict(read_json(qarepvgg_run / "branches" / "prune.json"))
    arch = load_model(qarepvgg_run / "best.pt")[0].arch
    assert any(spec.has_identity for spec in arch.blocks)
    for spec in arch.blocks:
        if spec.has_identity:
            assert plan.kept[spec.name] == plan.kept_in(spec.name)
    m = read_json(qarepvgg_run / "branches" / "metrics.json")
    assert m["channel_pruning"]["method"] == "qarepvgg-branches" and m["channel_pruning"]["onnx_fp32_max_rel_diff"] <= 1e-4
    assert m["deploy_max_rel_diff"] <= 1e-4


def test_pipeline_variant_trains_exports_and_compares(workdir):
    """variant=qarepvgg beside variant=repvgg: no search, the target stage trains QARepVGG, the export
    step folds and INT8-quantizes it, and compare shows it as an ordinary variant row."""
    pytest.importorskip("onnxruntime")
    sweep = workdir / "sweep"
    run_hydra(
        pipeline_main,
        ["-m"]
        + pipeline_overrides()
        + [
            "variant=repvgg,qarepvgg",
            "export=true",
            "quant.calibration_images=32",
            "quant.latency_runs=2",
            "quant.latency_warmup=0",
            f"hydra.sweep.dir={sweep}",
        ],
    )
    for job, variant in (("0", "repvgg"), ("1", "qarepvgg")):
        joined = read_json(sweep / job / "metrics.json")
        assert joined["status"] == "completed" and joined["variant"] == variant
        assert not (sweep / job / "hs").exists()
        assert read_json(sweep / job / "target" / "metrics.json")["model"] == variant
        quant = read_json(sweep / job / "target" / "quant.json")
        assert quant["model"] == variant and quant["onnx_fp32_max_rel_diff"] <= 1e-4
        assert 0 <= joined["quant"]["int8_top1"] <= 100
    table = compare([sweep], plots=False)
    assert sorted(table["variant"]) == ["qarepvgg", "repvgg"]
    assert "int8_top1" in table
    assert len(pd.read_csv(sweep / "comparison.csv")) == 2
