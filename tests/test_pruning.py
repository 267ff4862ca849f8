"""Channel pruning: the plan Torch-Pruning makes, the sliced RepOptimizer, the step's app and files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")

from repopt.family import get_spec  # noqa: E402
from repopt.io import read_json as read_json_file  # noqa: E402
from repopt.numerics import rel_diff  # noqa: E402
from repopt.scales import random_scales  # noqa: E402
from target_train import quantize as q  # noqa: E402
from target_train.app import main as target_main  # noqa: E402
from target_train.equivalence import BOUNDS, run_equivalence  # noqa: E402
from target_train.families.vgg import fuse  # noqa: E402
from target_train.finished_run import load_model  # noqa: E402
from target_train.handler import grad_masks  # noqa: E402
from target_train.prune import main as prune_main  # noqa: E402
from target_train.pruning.channels import ChannelPlan, prune_vgg  # noqa: E402
from target_train.pruning.masks import identity_pairs, rebuild_masks, slice_masks, slice_scales  # noqa: E402
from tests.helpers.runs import TINY, logits_without_the_project, run_hydra, train_tiny_target  # noqa: E402

FAST = ["latency_runs=2", "latency_warmup=0", "threads=1", "progress=off"]


def tp_width(width: int, ratio: float, round_to: int | None) -> int:
    """Torch-Pruning's rule, written out here: int(C * (1 - ratio)), rounded down; never to zero."""
    kept = int(width * (1 - ratio))
    if round_to:
        kept -= kept % round_to
    return kept if kept > 0 else width


@pytest.fixture(scope="module")
def target_run(workdir) -> Path:
    return train_tiny_target(workdir, "target", ["scales=init"])


@pytest.fixture(scope="module")
def repvgg_run(workdir) -> Path:
    return train_tiny_target(workdir, "repvgg", ["model=repvgg"])


def _x(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the plan
def test_widths_and_wiring_of_a_trained_target(target_run):
    """Ratio 0.5 at round_to 8 gives Torch-Pruning's widths, and the pruned model computes what the
    unpruned one computes once the removed channels are cut off (their uses zeroed): the plan names
    exactly the channels that were removed, and the wiring (BN, next conv, classifier) is intact."""
    model, ckpt = load_model(target_run / "best.pt")
    original = copy.deepcopy(model)
    full = grad_masks(original, ckpt["scales"], "sgd")
    plan = prune_vgg(model, 0.5, "l2", round_to=8, image_size=32)
    widths = [spec.out_channels for spec in original.arch.blocks]
    rebuilt = rebuild_masks(original.arch, plan, slice_scales(ckpt["scales"], plan), "sgd")
    for key, mask in slice_masks(full, plan).items():  # the run's own scales: sliced masks == rebuilt ones
        assert mask.shape == model.get_parameter(key).shape and torch.equal(mask, rebuilt[key].to(mask)), key
    assert [len(plan.kept[s.name]) for s in original.arch.blocks] == [tp_width(w, 0.5, 8) for w in widths]
    assert any(len(plan.kept[s.name]) < s.out_channels for s in original.arch.blocks)
    for spec, block in model.blocks():
        assert block.conv.out_channels == block.bn.num_features == len(plan.kept[spec.name])
        assert block.conv.in_channels == len(plan.kept_in(spec.name))
    assert model.linear.in_features == len(plan.kept_features())

    def cut_off(keep_of: dict) -> torch.nn.Module:
        """The unpruned model with every removed channel's use zeroed: the next conv's input
        columns and the classifier's features."""
        m = copy.deepcopy(original)
        with torch.no_grad():
            blocks = m.blocks()
            for (spec, _), (_, nxt) in zip(blocks, blocks[1:] + [(None, None)]):
                removed = [c for c in range(spec.out_channels) if c not in keep_of[spec.name]]
                if nxt is not None:
                    nxt.conv.weight[:, removed] = 0
                else:
                    m.linear.weight[:, removed] = 0
        return m.eval()

    x = _x()
    with torch.no_grad():
        out = model.eval()(x)
        assert rel_diff(out, cut_off(plan.kept)(x)) < 1e-5
        # control: cutting off other channels of one pruned layer gives other logits
        name = next(n for n in plan.names if len(plan.kept[n]) < plan.widths[n])
        wrong = dict(plan.kept)
        wrong[name] = tuple(range(len(plan.kept[name])))
        assert wrong[name] != plan.kept[name] and rel_diff(out, cut_off(wrong)(x)) > 1e-3


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_sliced_masks_equal_masks_rebuilt_from_the_sliced_scales(rule):
    arch = get_spec("small", strides=(1, 2, 1, 2, 2))
    scales = random_scales(arch, 3)
    from target_train.model import build_target_model

    torch.manual_seed(0)
    model = build_target_model(arch, 10).double()
    full = grad_masks(model, scales, rule)
    plan = prune_vgg(model, 0.5, "l2", round_to=None, image_size=16)
    sliced = slice_masks(full, plan)
    rebuilt = rebuild_masks(arch, plan, slice_scales(scales, plan), rule)
    assert sliced.keys() == rebuilt.keys()
    for key in sliced:
        assert sliced[key].shape == model.get_parameter(key).shape
        assert torch.equal(sliced[key], rebuilt[key].to(sliced[key])), key
    # the identity is a selection: in some block the kept inputs and outputs differ, and the mask's
    # +1 sits only where an output is its own input
    partial = []
    for spec in arch.blocks:
        if spec.has_identity:
            rows, cols = identity_pairs(plan.kept[spec.name], plan.kept_in(spec.name))
            assert len(rows) == len(set(plan.kept[spec.name]) & set(plan.kept_in(spec.name)))
            partial.append(0 < len(rows) < len(plan.kept[spec.name]))
    assert any(partial)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_equivalence_survives_pruning(optimizer):
    """RepOpt on the pruned target with the sliced masks == plain SGD/AdamW on the CSLA model cut
    with the same plan, fp64, after 10 steps (momentum, Nesterov, weight decay)."""
    r = run_equivalence("small", optimizer, steps=10, dtype=torch.float64, prune=0.5)
    assert r.passed(BOUNDS[torch.float64]), r
    assert any(len(k) < r.plan.widths[n] for n, k in r.plan.kept.items())


def test_wrongly_sliced_masks_break_the_equivalence(monkeypatch):
    """The check can fail: masks cut with the wrong input channels misplace the identity's +1."""
    from target_train.pruning import masks as pm

    def inputs_unsliced(masks, plan):  # slice the outputs, take the first inputs: the wrong channels
        out = {}
        for name in plan.names:
            m = masks[f"{name}.conv.weight"].index_select(0, plan.index(name, "out"))
            out[f"{name}.conv.weight"] = m[:, : len(plan.kept_in(name))].contiguous()
        return out

    monkeypatch.setattr(pm, "slice_masks", inputs_unsliced)
    r = run_equivalence("small", "sgd", steps=10, dtype=torch.float64, prune=0.5)
    assert not r.passed(BOUNDS[torch.float64])


def test_plan_round_trips_through_json():
    plan = ChannelPlan({"stage0": 4, "stage1.0": 4}, {"stage0": (0, 2), "stage1.0": (1, 3)})
    again = ChannelPlan.from_dict(plan.to_dict())
    assert again == plan and again.kept_in("stage1.0") == (0, 2) and again.kept_in("stage0") == (0, 1, 2)


# ---------------------------------------------------------------------------- the app
def test_prune_only_writes_a_checked_deployable_model(target_run, workdir):
    """epochs=0: pruned.pt (fresh interpreter, no project) and pruned.onnx (ONNX Runtime) give the
    logits of the pruned model rebuilt here from best.pt and prune.json."""
    run_hydra(prune_main, [f"run={target_run}", "epochs=0", "out=pruned0"] + FAST)
    out = target_run / "pruned0"
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "metrics.json", "prune.json", "pruned.onnx", "pruned.pt"]
    model, _ = load_model(target_run / "best.pt")
    plan = prune_vgg(model, 0.5, "l2", round_to=8, image_size=32)
    saved = read_json_file(out / "prune.json")
    assert ChannelPlan.from_dict(saved) == plan
    expected = fuse(model.eval())
    x = _x(3)
    with torch.no_grad():
        reference = expected(x)
    fresh = logits_without_the_project(out / "pruned.pt", x, workdir)
    assert rel_diff(fresh, reference) < 1e-5
    onnx_logits = q.run_session(q.session(out / "pruned.onnx"), x)
    assert rel_diff(torch.from_numpy(onnx_logits), reference) <= 1e-4
    m = read_json_file(out / "metrics.json")
    p = m["channel_pruning"]
    assert m["status"] == "completed" and m["stage"] == "prune"
    assert p["method"] == "repopt" and p["top1_finetuned"] == p["top1_pruned"]
    assert p["widths_after"] == [len(k) for k in plan.kept.values()]
    assert 0 < p["macs_ratio"] < 1 and p["params_after"] < p["params_before"]
    assert p["onnx_fp32_max_rel_diff"] <= 1e-4
    assert set(p["latency_ms_per_image"]) == {"unpruned", "pruned"}
    assert all(v > 0 for side in p["latency_ms_per_image"].values() for v in side.values())


def test_fine_tune_with_the_sliced_repoptimizer(target_run):
    run_hydra(prune_main, [f"run={target_run}", "epochs=1", "max_steps_per_epoch=2", "int8=true", "calibration_images=32"] + FAST)
    m = read_json_file(target_run / "pruned" / "metrics.json")
    p = m["channel_pruning"]
    assert m["optimizer"] == "RepOptSGD" and m["epochs"] == 1 and m["steps"] == 2
    assert p["top1_finetuned"] == m["top1"]
    history = (target_run / "pruned" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[0].startswith("epoch,")
    assert 0 <= p["int8"]["int8_top1"] <= 100 and (target_run / "pruned" / "pruned.int8.onnx").is_file()
    assert not (target_run / "pruned" / "last.pt").exists()
    assert not list(target_run.glob(".prune-*"))  # the scratch folder is gone


def test_an_existing_result_is_kept_unless_overwrite(target_run, capsys):
    run_hydra(prune_main, [f"run={target_run}", "epochs=0", "out=kept"] + FAST)
    before = (target_run / "kept" / "metrics.json").read_bytes()
    run_hydra(prune_main, [f"run={target_run}", "epochs=0", "out=kept", "ratio=0.25"] + FAST, expect_exit=1)
    assert "overwrite=true" in capsys.readouterr().err
    assert (target_run / "kept" / "metrics.json").read_bytes() == before
    run_hydra(prune_main, [f"run={target_run}", "epochs=0", "out=kept", "ratio=0.25", "overwrite=true"] + FAST)
    assert read_json_file(target_run / "kept" / "metrics.json")["channel_pruning"]["ratio"] == 0.25


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ratio=1.5"], "ratio=1.5: must be in (0, 1)"),
        (["importance=taylor"], "importance='taylor'"),
        (["out=../elsewhere"], "a folder name inside the run directory"),
    ],
)
def test_bad_settings_are_one_clear_line(target_run, overrides, message, capsys):
    run_hydra(prune_main, [f"run={target_run}"] + overrides + FAST, expect_exit=1)
    assert message in capsys.readouterr().err


def test_missing_run_is_a_clear_error(workdir, capsys):
    run_hydra(prune_main, [f"run={workdir / 'nope'}"] + FAST, expect_exit=1)
    assert "does not exist" in capsys.readouterr().err
    run_hydra(prune_main, FAST, expect_exit=1)
    assert "run= is required" in capsys.readouterr().err


def test_repvgg_is_pruned_in_its_deployed_form_by_default(repvgg_run, capsys):
    run_hydra(prune_main, [f"run={repvgg_run}", "epochs=1", "max_steps_per_epoch=1"] + FAST)
    m = read_json_file(repvgg_run / "pruned" / "metrics.json")
    assert m["channel_pruning"]["method"] == "repvgg-deploy" and m["optimizer"] == "SGD"
    assert m["channel_pruning"]["widths_after"] == [tp_width(w, 0.5, 8) for w in m["channel_pruning"]["widths_before"]]
    # BN-scale importance needs BN: the deployed form has none
    run_hydra(prune_main, [f"run={repvgg_run}", "importance=bn_scale", "out=bn"] + FAST, expect_exit=1)
    assert "has no BN" in capsys.readouterr().err


def test_repvgg_branches_tie_identity_chains_to_one_channel_set(repvgg_run):
    run_hydra(
        prune_main,
        [f"run={repvgg_run}", "repvgg_mode=branches", "round_to=null", "epochs=1", "max_steps_per_epoch=1", "out=branches"]
        + FAST,
    )
    plan = ChannelPlan.from_dict(read_json_file(repvgg_run / "branches" / "prune.json"))
    arch = load_model(repvgg_run / "best.pt")[0].arch
    for spec in arch.blocks:
        if spec.has_identity:  # the identity adds the block's input to its output: same channels kept
            assert plan.kept[spec.name] == plan.kept_in(spec.name)
    m = read_json_file(repvgg_run / "branches" / "metrics.json")
    assert m["channel_pruning"]["method"] == "repvgg-branches" and m["channel_pruning"]["onnx_fp32_max_rel_diff"] <= 1e-4


def test_ghostnet_runs_are_refused_clearly(workdir, capsys):
    run_dir = workdir / "ghost"
    run_hydra(
        target_main,
        TINY + ["family=ghostnet", "arch=ghostnet_tiny", "epochs=1", "scales=init", "deploy=false", f"hydra.run.dir={run_dir}"],
    )
    run_hydra(prune_main, [f"run={run_dir}"] + FAST, expect_exit=1)
    assert "supports the VGG family" in capsys.readouterr().err
    assert not (run_dir / "pruned").exists()


# ---------------------------------------------------------------------------- the pipeline step
def test_pipeline_prune_step_and_the_comparison_columns(workdir):
    from pipelines.compare import compare
    from pipelines.search_and_train import main as pipeline_main
    from tests.helpers.runs import pipeline_overrides

    job = workdir / "job"
    run_hydra(
        pipeline_main,
        pipeline_overrides()
        + [
            "target.optim.compile_step=false",
            "prune=true",
            "pruning.epochs=1",
            "pruning.max_steps_per_epoch=1",
            "pruning.latency_runs=2",
            "pruning.threads=1",
            "pruning.progress=off",
            f"hydra.run.dir={job}",
        ],
    )
    summary = read_json_file(job / "metrics.json")
    assert summary["status"] == "completed" and summary["channel_pruning_run"]["stage"] == "prune"
    assert (
        summary["channel_pruning_run"]["channel_pruning"]["ratio"] == 0.5 and (job / "target" / "pruned" / "pruned.pt").is_file()
    )
    compare([job], plots=False)
    table = (job / "comparison.md").read_text()
    for title in ("pruned top-1", "pruned top-1 (no fine-tune)", "MACs kept", "speed-up b1"):
        assert f"| {title} |" in table
    row = next(line for line in table.splitlines() if line.startswith("| (defaults) |"))
    assert f"{summary['channel_pruning_run']['channel_pruning']['macs_ratio']:.2f}" in row


def test_pipeline_checks_the_pruning_settings_before_training(workdir, capsys):
    from pipelines.search_and_train import main as pipeline_main
    from tests.helpers.runs import pipeline_overrides

    run_hydra(
        pipeline_main, pipeline_overrides() + ["prune=true", "pruning.ratio=2", f"hydra.run.dir={workdir / 'bad'}"], expect_exit=1
    )
    assert "pruning.ratio=2" in capsys.readouterr().err
    assert not (workdir / "bad" / "hs").exists()
    run_hydra(pipeline_main, ["family=ghostnet", "prune=true", f"hydra.run.dir={workdir / 'bad2'}"], expect_exit=1)
    assert "family=ghostnet has no pruning step" in capsys.readouterr().err


def test_compare_takes_differences_of_the_pruned_accuracy():
    import pandas as pd

    from pipelines.compare import add_differences, aggregate, to_markdown

    frame = pd.DataFrame(
        {
            "variant": ["searched"] * 3 + ["repvgg"] * 3,
            "hs.seed": [0, 1, 2] * 2,
            "status": ["completed"] * 6,
            "target_top1": [50.0] * 6,
            "pruned_top1": [47.0, 46.0, 48.0, 40.0, 41.0, 39.0],
        }
    )
    table = aggregate(frame, ["variant"])
    title = add_differences(frame, table, ["variant"], ("variant", "repvgg"), "pruned_top1")
    assert title == "Δ pruned top-1 vs variant=repvgg [95 % CI]"
    searched = table[table["variant"] == "searched"].iloc[0]
    assert searched["delta_top1"] == pytest.approx(7.0) and searched["delta_low"] > 0  # sd 1, n 3 a side
    md = to_markdown(table, ["variant"], [Path("x")], delta_title=title, delta_metric="pruned_top1")
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[cells.index("pruned top-1") + 1] == title
