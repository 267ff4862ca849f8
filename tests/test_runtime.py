"""How a run's compile mode is resolved: CUDA graphs only where they are safe."""

from __future__ import annotations

import pytest
import torch

from hypersearch.config import HSConfig
from repopt.engine.runtime import resolve_compile_mode, resolve_runtime
from repopt.errors import ConfigError

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize(
    "mode, device, world, drop_last, expected",
    [
        ("auto", CUDA, 1, True, "reduce-overhead"),  # static shapes on one GPU: CUDA graphs
        ("auto", CUDA, 1, False, None),  # a short last batch would re-record graphs
        ("auto", CUDA, 2, True, None),  # DDP: torch's default mode
        ("auto", CPU, 1, True, None),
        ("default", CUDA, 1, True, None),
        (None, CUDA, 1, True, None),
        ("max-autotune", CPU, 1, True, "max-autotune"),
        ("reduce-overhead", CUDA, 2, False, "reduce-overhead"),  # explicit modes are kept
    ],
)
def test_compile_mode(mode, device, world, drop_last, expected):
    assert resolve_compile_mode(mode, device, world, drop_last) == expected


def test_unknown_compile_mode_names_the_choices():
    with pytest.raises(ConfigError, match="compile_mode='fast'.*reduce-overhead"):
        resolve_compile_mode("fast", CPU, 1, True)


def test_runtime_on_cpu_compiles_in_the_default_mode():
    cfg = HSConfig(device="cpu", compile=True)
    runtime = resolve_runtime(cfg)
    assert runtime.compile and runtime.compile_mode is None and runtime.amp_dtype is None
    assert not resolve_runtime(HSConfig(device="cpu")).compile  # compile is off unless asked for
