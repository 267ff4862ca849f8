"""Out-of-range settings are one clear line naming the key, before anything runs (no torch traceback)."""

from __future__ import annotations

import pytest

from hypersearch.app import main as hs_main
from hypersearch.config import HSConfig
from pipelines.config import PipelineConfig
from repopt.config import to_typed
from repopt.errors import ConfigError
from target_train.config import TargetConfig
from tests.helpers.runs import pipeline_overrides, run_hydra

BAD = [  # (override, the key the message must name, what it must say)
    ({"optim": {"lr": -1.0}}, "optim.lr=-1.0", "> 0"),
    ({"optim": {"lr": 0.0}}, "optim.lr=0.0", "> 0"),
    ({"epochs": 0}, "epochs=0", ">= 1"),
    ({"optim": {"weight_decay": -1e-4}}, "optim.weight_decay=-0.0001", ">= 0"),
    ({"optim": {"momentum": 1.0}}, "optim.momentum=1.0", "in [0, 1)"),
    ({"optim": {"momentum": -0.1}}, "optim.momentum=-0.1", "in [0, 1)"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas=[0.9, 1.0]", "two numbers in [0, 1)"),
    ({"optim": {"eps": 0.0}}, "optim.eps=0.0", "> 0"),
    ({"epochs": 3, "sched": {"warmup_epochs": 4}}, "sched.warmup_epochs=4.0", "<= epochs (3)"),
    ({"sched": {"warmup_epochs": -1}}, "sched.warmup_epochs=-1.0", ">= 0"),
    ({"sched": {"min_lr": -1}}, "sched.min_lr=-1.0", ">= 0"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0", "in [0, 1)"),
    ({"grad_clip": 0.0}, "grad_clip=0.0", "> 0 or null"),
    ({"data": {"batch_size": 0}}, "data.batch_size=0", ">= 1"),
    ({"data": {"train_subset": 0}}, "data.train_subset=0", ">= 1 or null"),
    ({"data": {"num_workers": -1}}, "data.num_workers=-1", ">= 0"),
    ({"max_steps_per_epoch": 0}, "max_steps_per_epoch=0", ">= 1 or null"),
    ({"ema": {"decay": 1.0}}, "ema.decay=1.0", "in (0, 1)"),
    ({"ema": {"decay": 0.0}}, "ema.decay=0.0", "in (0, 1)"),
    ({"ema": {"every": 0}}, "ema.every=0", ">= 1"),
    ({"mix": {"mixup_alpha": -0.1}}, "mix.mixup_alpha=-0.1", ">= 0 (0 = off)"),
    ({"mix": {"cutmix_alpha": -1.0}}, "mix.cutmix_alpha=-1.0", ">= 0 (0 = off)"),
    ({"mix": {"prob": 1.5}}, "mix.prob=1.5", "in [0, 1]"),
    ({"mix": {"switch_prob": -0.5}}, "mix.switch_prob=-0.5", "in [0, 1]"),
    ({"data": {"randaugment_magnitude": 31}}, "data.randaugment_magnitude=31", "in [0, 30] or null"),
    ({"data": {"randaugment_num_ops": 0}}, "data.randaugment_num_ops=0", ">= 1"),
    ({"data": {"mean": [0.5, 0.5], "std": [0.2, 0.2]}}, "data.mean=[0.5, 0.5]", "three numbers"),
    ({"data": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}}, "data.std=[0.2, 0.0, 0.2]", "> 0 in every channel"),
    ({"data": {"mean": [0.5, 0.5, 0.5]}}, "data.mean=[0.5, 0.5, 0.5]", "given together with data.std"),
    ({"data": {"eval_crop_fraction": 0.0}}, "data.eval_crop_fraction=0.0", "in (0, 1] or null"),
]


@pytest.mark.parametrize("schema", [HSConfig, TargetConfig])
@pytest.mark.parametrize("override,key,rule", BAD, ids=[b[1] for b in BAD])
def test_out_of_range_value_names_the_key(schema, override, key, rule):
    with pytest.raises(ConfigError) as info:
        to_typed(override, schema)
    message = str(info.value)
    assert message.startswith(key + ":") and rule in message and "\n" not in message, message


def test_stage_choices_are_validated_with_the_key():
    with pytest.raises(ConfigError, match=r"^mode='bogus': must be one of hs, csla"):
        to_typed({"mode": "bogus"}, HSConfig)
    with pytest.raises(ConfigError, match=r"^scale_init='x': must be one of paper, constant"):
        to_typed({"scale_init": "x"}, HSConfig)
    with pytest.raises(ConfigError, match=r"^model='resnet': must be one of target, repvgg"):
        to_typed({"model": "resnet"}, TargetConfig)


def test_the_defaults_and_edge_values_are_accepted():
    for schema in (HSConfig, TargetConfig, PipelineConfig):
        to_typed({}, schema)
    to_typed(
        {"optim": {"momentum": 0.0, "weight_decay": 0.0}, "epochs": 5, "sched": {"warmup_epochs": 5}, "label_smoothing": 0.0},
        HSConfig,
    )


def test_pipeline_errors_name_the_stage_key():
    with pytest.raises(ConfigError, match=r"^hs\.optim\.lr=-1\.0: must be > 0"):
        to_typed({"hs": {"optim": {"lr": -1.0}}}, PipelineConfig)
    with pytest.raises(ConfigError, match=r"^target\.epochs=0: must be >= 1"):
        to_typed({"target": {"epochs": 0}}, PipelineConfig)
    with pytest.raises(ConfigError, match=r"^target\.mix\.mixup_alpha=-1\.0: must be >= 0"):
        to_typed({"target": {"mix": {"mixup_alpha": -1.0}}}, PipelineConfig)


def test_negative_lr_on_the_command_line_is_one_line_and_exit_1(in_tmp, capsys):
    """``python -m hypersearch experiment=quickstart optim.lr=-1`` used to end in torch's traceback."""
    run_dir = in_tmp / "run"
    run_hydra(hs_main, ["experiment=quickstart", "optim.lr=-1", "progress=off", f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: optim.lr=-1.0: must be > 0; set it on the command line (optim.lr=...) or in the config"]
    assert not (run_dir / "last.pt").exists()


def test_bad_ema_decay_on_the_command_line_is_one_line_and_exit_1(in_tmp, capsys):
    run_dir = in_tmp / "run"
    run_hydra(hs_main, ["experiment=quickstart", "ema.decay=1.5", "progress=off", f"hydra.run.dir={run_dir}"], expect_exit=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ema.decay=1.5: must be in (0, 1); set it on the command line (ema.decay=...) or in the config"]
    assert not (run_dir / "last.pt").exists()


def test_pipeline_stage_value_on_the_command_line(in_tmp, capsys):
    from pipelines.search_and_train import main as pipeline_main

    job = in_tmp / "job"
    run_hydra(pipeline_main, pipeline_overrides() + ["hs.optim.momentum=1.5", f"hydra.run.dir={job}"], expect_exit=1)
    assert "error: hs.optim.momentum=1.5: must be in [0, 1)" in capsys.readouterr().err
    assert not (job / "hs" / "last.pt").exists()
