"""The device check's plumbing (``python -m pipelines.gpu_check``): parts, budget, timeouts, report files.

Fast tests in the default run keep the script from rotting between GPU runs; the whole quick
CPU dry run (minutes) is ``slow``.
"""

from __future__ import annotations

import json
import sys
import tarfile
import time

import pytest

from pipelines.check.report import ARCHIVE_NAME, write_archive, write_report
from pipelines.check.runner import FAILED, OK, SKIPPED, Part, PartFailed, Skip, run_logged, run_parts
from pipelines.gpu_check import main


def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path):
    ran = []

    def ok(timeout_s):
        ran.append("ok")
        return {"value": 1.5}

    def broken(timeout_s):
        ran.append("broken")
        raise RuntimeError("the kernel exploded")

    def partial(timeout_s):
        ran.append("partial")
        raise PartFailed("2 tests failed", {"passed": 5, "failed": 2})

    def absent(timeout_s):
        raise Skip("no data here")

    seen = []
    results = run_parts(
        [Part("a", ok, 10), Part("b", broken, 10), Part("c", partial, 10), Part("d", absent, 10)],
        budget_s=100,
        on_result=lambda r: seen.append(len(r)),
    )
    assert ran == ["ok", "broken", "partial"] and seen == [1, 2, 3, 4]
    assert [r.status for r in results] == [OK, FAILED, FAILED, SKIPPED]
    assert results[0].figures == {"value": 1.5}
    assert results[1].error.startswith("RuntimeError: the kernel exploded")
    assert results[2].figures == {"passed": 5, "failed": 2} and results[3].error == "no data here"
    doc = write_report(tmp_path, {"command": "x", "device": "cpu", "quick": True, "budget_s": 100}, results)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(doc))
    md = (tmp_path / "report.md").read_text()
    for line in ("| a | OK |", "| b | FAILED |", "| c | FAILED |", "| d | SKIPPED |", "the kernel exploded"):
        assert line in md, line


def test_the_budget_caps_each_part_and_skips_what_does_not_fit():
    now = [0.0]
    limits = []

    def slow(timeout_s):
        limits.append(timeout_s)
        now[0] += 70.0
        return {}

    results = run_parts([Part("a", slow, 300), Part("b", slow, 300), Part("c", slow, 300)], budget_s=150, clock=lambda: now[0])
    assert limits == [150.0, 80.0]  # each part's limit is what is left of the budget
    assert [r.status for r in results] == [OK, OK, SKIPPED] and "--parts c" in results[2].error


def test_a_child_past_its_time_is_ended_with_its_group(tmp_path):
    log = tmp_path / "child.log"
    t0 = time.monotonic()
    with pytest.raises(PartFailed, match="timed out after 1 s"):
        run_logged([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], log, 1.0)
    assert time.monotonic() - t0 < 30 and "started" in log.read_text()
    with pytest.raises(PartFailed, match="exited 3"):
        run_logged([sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"], log, 30)
    assert "bad input" in log.read_text()


def test_quick_cpu_env_part_writes_the_report_and_the_archive(tmp_path):
    out = tmp_path / "check"
    assert main(["--device", "cpu", "--quick", "--parts", "env", "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    (env,) = doc["parts"]
    assert env["name"] == "env" and env["status"] == OK, env
    import torch

    assert env["figures"]["torch"] == torch.__version__ and env["figures"]["missing_packages"] == []
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["quick"] is True and doc["meta"]["wall_seconds"] > 0
    assert "| env | OK |" in (out / "report.md").read_text()
    with tarfile.open(out / ARCHIVE_NAME) as tar:
        assert {"check/report.json", "check/report.md"} <= set(tar.getnames())
    assert main(["--device", "cpu", "--parts", "env", "--out", str(out)]) == 2  # never writes into a used folder
    assert main(["--device", "cpu", "--parts", "env,nope", "--out", str(tmp_path / "other")]) == 2


def test_the_archive_leaves_out_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"x" * 100)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with tarfile.open(write_archive(tmp_path)) as tar:
        names = tar.getnames()
    assert any(n.endswith("run/metrics.json") for n in names) and not any(n.endswith(".pt") for n in names)


@pytest.mark.slow
def test_quick_cpu_dry_run_of_every_part(tmp_path):
    """The whole check at its quick sizes on the CPU (the gpu tests on the CPU included): every part
    passes, or is skipped only where the shared CIFAR-10 is absent."""
    out = tmp_path / "check"
    rc = main(["--device", "cpu", "--quick", "--out", str(out)])
    doc = json.loads((out / "report.json").read_text())
    status = {p["name"]: (p["status"], p["error"]) for p in doc["parts"]}
    assert rc == 0, status
    assert all(s == OK or (name == "hs_cifar10" and s == SKIPPED) for name, (s, _) in status.items()), status
