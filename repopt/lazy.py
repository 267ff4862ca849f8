"""Package namespaces whose names load their modules on first use (PEP 562).

A misspelt setting must be reported before torch loads (it takes seconds), yet the packages
re-export names from modules that import it. A package lists each public name with the module
that defines it; that module is imported when the name is first read, and the name is then an
ordinary attribute of the package.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``where`` maps each name to its module (relative
    to the package, ``.scales``)."""

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)  # read once: later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
