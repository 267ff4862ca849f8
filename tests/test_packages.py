"""The packages' public names: everything a package lists in ``__all__`` is importable from it."""

import importlib
import pkgutil

import pytest

import hypersearch
import pipelines
import repopt
import target_train


def _packages():
    for top in (repopt, hypersearch, target_train):
        yield top.__name__
    for top in (repopt, hypersearch, target_train, pipelines):
        for info in pkgutil.walk_packages(top.__path__, top.__name__ + "."):
            if info.ispkg and hasattr(importlib.import_module(info.name), "__all__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_packages()))
def test_star_import_gives_every_listed_name(name):
    module = importlib.import_module(name)
    listed = module.__all__
    namespace: dict = {}
    exec(f"from {name} import *", namespace)  # raises AttributeError for a listed name the package lacks
    assert set(listed) <= set(namespace)


def test_the_configs_install_under_the_projects_own_package(tmp_path):
    """The configs are ``repopt.conf`` (``repopt/conf`` links to the repository's ``conf/``): the
    installed project adds no top-level package named ``conf`` that another project could shadow."""
    import os
    import subprocess
    import sys

    code = (
        "import importlib.util as u; import importlib.resources as r; "
        "print(u.find_spec('conf') is None, (r.files('repopt.conf') / 'target_train.yaml').is_file())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
