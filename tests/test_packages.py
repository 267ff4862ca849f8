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
