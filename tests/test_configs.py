"""Every root config and preset composes and validates against its typed schema, and each recipe
exists once: the stage apps' presets and the pipeline's stages compose the same settings."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import pipelines.config  # noqa: F401  (registers the pipeline schema)
import target_train.step_config  # noqa: F401  (registers the export schema)
from hypersearch.config import HSConfig
from pipelines.config import PipelineConfig
from repopt.config import to_typed
from repopt.vgg.arch import get_arch
from target_train.config import TargetConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(name, overrides=()):
    with initialize_config_module("repopt.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_paper_preset_is_the_papers_recipe():
    cfg = to_typed(_compose("hypersearch", ["experiment=paper"]), HSConfig)
    assert (cfg.arch.name, cfg.data.name, cfg.epochs, cfg.data.batch_size) == ("B1", "cifar100", 240, 256)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (
        "sgd",
        0.1,
        0.9,
        True,
        4e-5,
    )
    assert cfg.optim.lr * cfg.data.batch_size / cfg.optim.base_batch_size == 0.1
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.sched.min_lr) == ("warmup_cosine", 5, 0.0)
    assert cfg.label_smoothing == 0.0 and cfg.data.image_size == 32 and list(cfg.arch.strides) == [2, 2, 2, 2, 2]
    assert cfg.compile is None and cfg.mode == "hs" and cfg.scale_init == "paper"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_presets_compose(preset):
    root, schema = ("target_train", TargetConfig) if preset.startswith("target") else ("hypersearch", HSConfig)
    cfg = to_typed(_compose(root, [f"experiment={preset}"]), schema)
    get_arch(cfg.arch.name, cfg.arch.strides)  # a valid architecture


@pytest.mark.parametrize("preset", [None] + sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_pipeline_and_sweep_presets_compose(preset):
    cfg = to_typed(_compose("search_and_train", [f"sweep={preset}"] if preset else []), PipelineConfig)
    for stage in (cfg.hs, cfg.target):
        get_arch(stage.arch.name, stage.arch.strides)


def test_default_pipeline_is_cifar100_paper_search_then_cifar_target():
    cfg = to_typed(_compose("search_and_train"), PipelineConfig)
    assert cfg.variant == "searched" and cfg.hs.data.name == "cifar100" and cfg.hs.epochs == 240
    assert cfg.target.data.name == "cifar100" and cfg.target.arch.name == "B1"


def test_export_config_composes():
    cfg = _compose("export", ["run=/tmp/somewhere"])
    assert cfg.run == "/tmp/somewhere" and cfg.opset >= 17


def test_prune_config_composes_with_the_schema_defaults():
    from target_train.step_config import PruneConfig

    cfg = to_typed(_compose("prune", ["run=/tmp/somewhere"]), PruneConfig)
    assert cfg == PruneConfig(run="/tmp/somewhere")  # the yaml restates the schema's defaults, nothing else
    assert _pipeline(["prune=true"]).pruning == PruneConfig()


# ---------------------------------------------------------------- one place per recipe
def _pipeline(overrides: list[str]) -> PipelineConfig:
    return to_typed(_compose("search_and_train", overrides), PipelineConfig)


def test_pipeline_hs_is_the_paper_preset():
    stage_app = to_typed(_compose("hypersearch", ["experiment=paper"]), HSConfig)
    assert _pipeline([]).hs == stage_app
    assert stage_app.arch.strides == [2, 2, 2, 2, 2] and stage_app.epochs == 240 and stage_app.compile is None


def test_pipeline_target_is_the_cifar_target_preset():
    stage_app = to_typed(_compose("target_train", ["experiment=target_cifar"]), TargetConfig)
    pipeline = _pipeline([]).target
    assert pipeline.scales is None  # the pipeline's variant decides the scales
    assert dataclasses.replace(pipeline, scales=stage_app.scales) == stage_app
    assert stage_app.arch.strides == [1, 1, 2, 2, 2]  # one CIFAR target (see conf/recipe/target_cifar.yaml)


def test_quickstart_sweep_stages_are_the_quickstart_presets():
    pipeline = _pipeline(["sweep=quickstart"])
    hs = to_typed(_compose("hypersearch", ["experiment=quickstart"]), HSConfig)
    target = to_typed(_compose("target_train", ["experiment=target_quickstart"]), TargetConfig)
    assert pipeline.hs == dataclasses.replace(hs, epochs=6)  # the sweep trains 6 epochs instead of 3
    assert dataclasses.replace(pipeline.target, scales=target.scales) == dataclasses.replace(target, epochs=6)


def test_each_recipe_value_is_written_once():
    """No stage root, preset or sweep repeats a recipe's strides: they live in conf/recipe/ only."""
    for path in [CONF / "search_and_train.yaml", *(CONF / "experiment").glob("*.yaml"), CONF / "sweep" / "quickstart.yaml"]:
        assert "strides" not in path.read_text(), path
