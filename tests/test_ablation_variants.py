"""The ablation's variants (the paper's Table 4): each trains exactly what its row describes.

``channel_mean``, ``ones`` and ``official_mean`` are constants whose masks must equal the masks of
those constants; ``reinit_only`` re-initializes from the scales and trains with plain SGD;
``masks_only`` masks the gradients of a model that was not re-initialized. And a sweep with
``shared_search`` searches once for every variant that needs the searched scales.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pipelines.ablation import budget_table, drift, official_drift, report
from pipelines.config import SEARCHING, VARIANTS, PipelineConfig
from pipelines.job import stage_configs
from pipelines.search_and_train import main as pipeline_main
from repopt import get_arch, save_scales
from repopt.config import to_typed
from repopt.errors import ScalesError
from repopt.family import get_spec
from repopt.host import seed_everything
from repopt.scales import load_scales, random_scales
from target_train.config import TargetConfig
from target_train.handler import grad_masks, reinitialize
from target_train.masks import masks_by_param
from target_train.model import build_target_model
from target_train.optim import RepOptSGD
from target_train.scales_source import channel_mean, resolve_scales
from target_train.train import build_target_run
from tests.helpers.runs import pipeline_overrides, read_json, run_hydra

TINY_TARGET = [
    "arch.name=tiny",
    "arch.strides=[1,2,2,2,1]",
    "data.name=synthetic",
    "data.batch_size=32",
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=32",
    "epochs=1",
    "sched.warmup_epochs=0",
    "device=cpu",
    "progress=off",
    "deploy=false",
]


def _target(tmp_path, *overrides: str) -> TargetConfig:
    return to_typed(OmegaConf.from_dotlist(TINY_TARGET + list(overrides)), TargetConfig)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """Signed random scales standing in for a search's result (they tell every rule apart)."""
    path = tmp_path_factory.mktemp("scales") / "scales.safetensors"
    scales = random_scales(get_arch("tiny"), seed=3)
    save_scales(path, scales)
    return path, scales


def _masks(run) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(p)]: m for p, m in run.optimizer.grad_masks.items()}


def _expected_masks(model, scales) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: m for p, m in masks_by_param(model, grad_masks(model, scales, "sgd")).items()}


def _assert_masks(run, scales) -> None:
    got, want = _masks(run), _expected_masks(run.model, scales)
    assert got.keys() == want.keys() and got
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_every_variant_composes_to_its_stage_settings():
    expected = {
        "searched": (True, None, "none", True, True),
        "channel_mean": (True, None, "channel_mean", True, True),
        "reinit_only": (True, None, "none", True, False),
        "masks_only": (True, None, "none", False, True),
        "plain": (False, "none", "none", True, True),
        "init": (False, "init", "none", True, True),
        "ones": (False, "ones", "none", True, True),
        "official_mean": (False, "official_mean", "none", True, True),
    }
    for variant, (searches, scales, transform, reinit, masks) in expected.items():
        hs, target = stage_configs(PipelineConfig(variant=variant))
        assert (hs is not None) == searches == (variant in SEARCHING), variant
        assert (target.scales, target.scales_transform, target.reinit, target.masks, target.model) == (
            scales,
            transform,
            reinit,
            masks,
            "target",
        ), variant
    assert set(expected) | {"repvgg", "qarepvgg", "custom"} == set(VARIANTS)


def test_channel_mean_masks_are_the_masks_of_the_averaged_scales(tmp_path, searched):
    path, scales = searched
    run = build_target_run(_target(tmp_path, f"scales={path}", "scales_transform=channel_mean"), tmp_path)
    averaged = channel_mean(scales)
    assert all(torch.equal(run.scales.scales[k], averaged[k]) for k in scales)
    assert all(bool((v == v[0]).all()) for v in run.scales.scales.values())  # one value per layer
    _assert_masks(run, averaged)
    assert run.scales.identity() == {"kind": "file", "sha256": run.scales.file.sha256, "transform": "channel_mean"}


def test_ones_masks_are_the_masks_of_unit_scales(tmp_path):
    run = build_target_run(_target(tmp_path, "scales=ones"), tmp_path)
    assert all(bool((v == 1).all()) for v in run.scales.scales.values())
    _assert_masks(run, {k: torch.ones_like(v) for k, v in get_arch("tiny").init_scales().items()})


def test_official_mean_broadcasts_the_released_layer_means_to_the_target_widths():
    arch = get_spec("B1cpu")
    choice = resolve_scales("official_mean", arch)
    released = load_scales("official:B1", get_spec("B1"))
    assert choice.kind == "official_mean" and choice.file.path.name == "RepOpt-VGG-B1-scales.pth"
    for key, shape in arch.scale_shapes().items():
        value = choice.scales[key]
        assert tuple(value.shape) == shape and shape[0] < released[key].shape[0]  # the CPU widths
        assert torch.equal(value, torch.full(shape, float(released[key].mean())))
    assert resolve_scales("official_mean:B2", arch).file.path.name == "RepOpt-VGG-B2-scales.pth"
    with pytest.raises(ScalesError, match="no released member has the layers of arch tiny"):
        resolve_scales("official_mean", get_spec("tiny"))
    with pytest.raises(ScalesError, match="members that fit: B1, B2"):
        resolve_scales("official_mean:L1", arch)


def test_reinit_only_reinitializes_and_trains_with_plain_sgd(tmp_path, searched):
    path, scales = searched
    cfg = _target(tmp_path, f"scales={path}", "masks=false")
    run = build_target_run(cfg, tmp_path)
    assert type(run.optimizer) is torch.optim.SGD
    seed_everything(cfg.seed)
    fresh = reinitialize(build_target_model(get_arch("tiny"), 10), scales)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), fresh.state_dict().values()))


def test_masks_only_masks_the_gradients_of_a_model_not_reinitialized(tmp_path, searched):
    path, scales = searched
    cfg = _target(tmp_path, f"scales={path}", "reinit=false")
    run = build_target_run(cfg, tmp_path)
    assert isinstance(run.optimizer, RepOptSGD)
    _assert_masks(run, scales)
    seed_everything(cfg.seed)
    fresh = build_target_model(get_arch("tiny"), 10)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), fresh.state_dict().values()))
    reinitialized = reinitialize(build_target_model(get_arch("tiny"), 10), scales)
    assert not all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), reinitialized.state_dict().values()))


def test_a_shared_search_runs_once_for_every_variant_that_needs_it(in_tmp):
    sweep = in_tmp / "sweep"
    run_hydra(
        pipeline_main,
        ["-m"]
        + pipeline_overrides()
        + ["variant=searched,channel_mean,masks_only,init", "shared_search=true", f"hydra.sweep.dir={sweep}"],
    )
    searches = list((sweep / "searches").iterdir())
    assert len(searches) == 1 and (searches[0] / "scales.safetensors").is_file()
    jobs = [read_json(sweep / str(n) / "metrics.json") for n in range(4)]
    assert [j["status"] for j in jobs] == ["completed"] * 4
    shas = {j["hs_scales_sha256"] for j in jobs[:3]}
    assert len(shas) == 1 and None not in shas and jobs[3]["hs"] is None
    assert all((sweep / str(n) / "hs").resolve() == searches[0].resolve() for n in range(3))
    # one search: every job's stage one result is the same run (the same steps, the same file)
    assert len({j["hs"]["wall_seconds"] for j in jobs[:3]}) == 1
    assert [j["target"]["optimizer"] for j in jobs] == ["RepOptSGD", "RepOptSGD", "RepOptSGD", "RepOptSGD"]
    assert jobs[1]["target"]["scales"]["transform"] == "channel_mean"
    report_text = report([sweep], [], in_tmp / "report")
    assert "| searched | 1 | 9.38 | 0: 9.38 | — | +0.00 (n=1 vs 1) |" in report_text
    assert "| searched, 1 HS epochs | 1 |" in report_text
    assert "How far the searched scales moved" in report_text and (in_tmp / "report" / "budget.png").is_file()


def test_drift_is_the_mean_relative_distance_per_stage_and_kind():
    init = get_arch("tiny").init_scales()
    moved = {k: v * (1.1 if "scale_conv" in k else 1.0) for k, v in init.items()}
    table = drift(moved, init).set_index(["stage", "kind"])["drift %"]
    assert all(abs(v - 10.0) < 1e-4 for (stage, kind), v in table.items() if kind == "scale_conv")
    assert all(v == 0.0 for (stage, kind), v in table.items() if kind != "scale_conv")
    official = official_drift("B1")
    assert len(official) and (official["drift %"] > 0).all()


def test_the_budget_table_compares_each_budget_with_init():
    searched = pd.DataFrame({"hs.epochs": [8, 8, 64, 64], "target_top1": [50.0, 52.0, 55.0, 57.0], "hs.seed": [0, 1, 0, 1]})
    init = pd.Series([51.0, 53.0])
    table = budget_table(searched, init).set_index("setting")
    assert table.loc["searched, 8 HS epochs", "vs init"].startswith("-1.00 [")
    assert table.loc["searched, 64 HS epochs", "vs init"].startswith("+4.00 [")
    assert table.loc["searched, 64 HS epochs", "per seed"] == "0: 55.00, 1: 57.00"
