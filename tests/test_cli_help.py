"""Every app's --help documents every key of its schema and only the groups it uses; the YAML files
restate no schema default; conf/arch/ mirrors the families' registries."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from repopt.cli_help import APPS, _schema, app_help, schema_keys
from repopt.family import FAMILIES

CONF = Path(__file__).resolve().parents[1] / "conf"


def _leaf_paths(cls, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_paths(type(value), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("app", sorted(APPS))
def test_help_lists_every_key_with_a_meaning(app):
    page = app_help(app)
    keys = schema_keys(_schema(app))
    paths = set(_leaf_paths(_schema(app)))
    assert {k.path for k in keys} == paths  # nested dataclasses expanded, nothing dropped
    for key in keys:
        assert f"  {key.path}={key.default}" in page, key.path
        assert key.doc, f"{app}: {key.path} has no comment in its dataclass (the help shows that comment)"


def test_help_shows_only_the_groups_an_app_uses():
    stage_one = app_help("hypersearch")
    assert "  optim=sgd" in stage_one and "  data=cifar100" in stage_one
    assert "sweep=" not in stage_one and "tune=" not in stage_one  # pipeline groups are not stage one's
    pipeline = app_help("search_and_train")
    assert "  data=cifar100" in pipeline and "  data@hs.data=${data}" in pipeline and "  sweep=none" in pipeline
    assert "options: " in pipeline and "ablation_cpu" in pipeline  # the sweep presets are listed
    assert "  tune=none" in app_help("tune")


def test_help_from_the_command_line():
    """Hydra fills its help template with string.Template: the page must survive the $ in it."""
    out = subprocess.run([sys.executable, "-m", "hypersearch", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Settings (KEY=VALUE" in out.stdout and "  optim.compile_step=null" in out.stdout
    assert "  arch=${family}" in out.stdout  # a literal interpolation in the defaults list, printed as is
    out = subprocess.run([sys.executable, "-m", "pipelines.tune", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "  pruner.during_search=false" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("app", sorted(APPS))
def test_root_configs_restate_no_schema_default(app):
    """The dataclass holds each default once; a root config sets only what differs from it."""
    data = yaml.safe_load((CONF / f"{APPS[app][0]}.yaml").read_text())
    schema = OmegaConf.structured(_schema(app))
    groups = {next(iter(entry)) for entry in data.get("defaults", []) if isinstance(entry, dict)}
    for key, value in data.items():
        # a key a group of the defaults list fills, reset here (search_and_train's data: only its choice counts)
        if key in ("defaults", "hydra") or isinstance(value, dict) or key in groups:
            continue
        default = schema[key]
        assert value != (OmegaConf.to_container(default) if OmegaConf.is_config(default) else default), (
            f"conf/{app}.yaml: {key}: {value!r} is the schema default; delete it from the YAML"
        )


def test_arch_configs_mirror_the_registries():
    """conf/arch/<name>.yaml exists for every member of every family, names it, and nothing else is there
    besides the family aliases (vgg, ghostnet, cpu_<family>), which choose a member."""
    members = {name: fam for fam in FAMILIES.values() for name in fam.arch_names()}
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF / "arch").glob("*.yaml")}
    aliases = {*FAMILIES, *(f"cpu_{f}" for f in FAMILIES)}
    assert set(files) - aliases == set(members)
    for name, data in files.items():
        if name in aliases:
            assert data["defaults"][0] in members, name
        else:
            assert data["name"] == name
