"""A mistyped command is refused before torch loads: every app's entry module imports only its schema,
and the training code is imported once the config is valid (``pipelines/bench/cli_latency.py`` times
the same commands beside ``import torch``)."""

from __future__ import annotations

import pytest

from pipelines.bench.cli_latency import CASES, main, run, run_case


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.command.removeprefix("python -m ").replace(" ", "_"))
def test_a_mistyped_command_is_refused_before_torch_loads(case, tmp_path):
    out = run_case(case, tmp_path, importtime=True)
    assert out.returncode == case.exit_code, out.stderr[-3000:]
    assert case.says in out.stderr, out.stderr[-3000:]
    assert not out.torch_loaded, f"{case.command} imported torch before its error"
    assert "Traceback" not in out.stderr


def test_the_detector_sees_torch_once_the_config_is_valid(tmp_path):
    """The control: a valid export config with a run directory that does not exist gets past the check,
    loads the step (and torch), and only then is refused; the same probe must see torch there."""
    missing = tmp_path / "no-such-run"
    out = run(["-m", "target_train.export", f"run={missing}"], tmp_path, importtime=True)
    assert out.returncode == 1 and str(missing) in out.stderr, out.stderr[-3000:]
    assert out.torch_loaded
    assert run(["-c", "import torch"], tmp_path, importtime=True).torch_loaded


def test_the_latency_table(capsys):
    main(["--repeats", "1", "--only", "hypersearch"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("import torch alone: ")
    rows = [line for line in table if line.startswith("python -m hypersearch ")]
    assert len(rows) == sum(case.module == "hypersearch" for case in CASES) == 3
    assert all(line.split()[-2] == "no" for line in rows), rows  # the torch? column
    assert table[-1].startswith("slowest ")
