"""A pipeline job stopped at each named fault point, then resumed: the result equals an uninterrupted
job's bit for bit, or the program refuses with one line. Real processes, real SIGKILL / SIGTERM.

Each fault: ``python -m pipelines.search_and_train`` with ``REPOPT_FAULT=<point>:<action>`` dies at
that point; the job's result must not say ``completed``; the same command with ``resume=true``
must then finish with the same scales, weights (last.pt and best.pt) and numbers as a job that was
never interrupted, stage two trained with exactly the file stage one wrote, and no temporary file
left behind. docs/reliability.md lists them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from repopt.rundir import RunLock
from tests.faults.helpers import KILLED, TERMINATED, assert_same_outcome, outcome, run_job
from tests.helpers.runs import read_json

# point, action, what it stands for
FAULTS = [
    ("train.end@1", "kill", "stage one trained, scales not exported yet"),
    ("write:scales.safetensors", "kill", "during the scales export"),
    ("job.between_stages", "kill", "between the stages"),
    ("write:last.pt@2", "kill", "mid-write of stage two's first last.pt"),
    ("best.before_last", "kill", "stage two: best.pt written, last.pt not yet"),
    ("train.end@2", "kill", "stage two trained, deploy.pt not exported yet"),
    ("write:deploy.pt", "term", "SIGTERM during the deploy.pt export"),
    ("write:deploy.pt", "kill", "SIGKILL during the deploy.pt export"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One job that was never interrupted."""
    job = tmp_path_factory.mktemp("reference") / "job"
    done = run_job(job)
    assert done.returncode == 0, done.stderr[-2000:]
    return job


def _temporaries(job: Path) -> list[Path]:
    return [p for p in job.rglob(".*.tmp")]


@pytest.mark.parametrize("point,action,meaning", FAULTS, ids=[f"{p}:{a}" for p, a, _ in FAULTS])
def test_fault_then_resume_equals_the_uninterrupted_job(tmp_path, reference, point, action, meaning):
    job = tmp_path / "job"
    stopped = run_job(job, fault=f"{point}:{action}")
    assert stopped.returncode == (KILLED if action == "kill" else TERMINATED), (meaning, stopped.stderr[-2000:])
    job_result = read_json(job / "metrics.json") if (job / "metrics.json").is_file() else {}
    assert job_result.get("status") != "completed"
    for stage in ("hs", "target"):  # a stage that says completed has every file it promises
        result = read_json(job / stage / "metrics.json") if (job / stage / "metrics.json").is_file() else {}
        if result.get("status") == "completed":
            assert all((job / stage / name).is_file() for name in result["manifest"])
    if point == "write:deploy.pt":
        assert not (job / "target" / "deploy.pt").is_file()

    resumed = run_job(job, "resume=true")
    assert resumed.returncode == 0, (meaning, resumed.stderr[-2000:])
    assert read_json(job / "metrics.json")["status"] == "completed"
    assert (job / "target" / "deploy.pt").is_file()
    assert_same_outcome(outcome(job), outcome(reference))
    assert outcome(job)["optimizer"] != "SGD"  # searched: the RepOptimizer, never plain SGD
    assert _temporaries(job) == []


def _copy(reference: Path, tmp_path: Path) -> Path:
    job = tmp_path / "job"
    shutil.copytree(reference, job)
    return job


def _snapshot(job: Path) -> dict[str, bytes]:
    """Every file of the job but the lock and Hydra's job log (a refused run appends its one error line)."""
    return {
        str(p.relative_to(job)): p.read_bytes()
        for p in sorted(job.rglob("*"))
        if p.is_file() and p.name != ".lock" and p.suffix != ".log"
    }


@pytest.mark.parametrize("resume", [False, True])
def test_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, reference, resume):
    job = _copy(reference, tmp_path)
    before = _snapshot(job)
    refused = run_job(job, "hs.epochs=4", "target.epochs=4", "hs.optim.lr=0.5", *(["resume=true"] if resume else []))
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hs.epochs: 1 -> 4" in errors[0] and "hs.optim.lr: 0.1 -> 0.5" in errors[0]
    assert "Traceback" not in refused.stderr
    assert _snapshot(job) == before  # .hydra/ included: nothing was rewritten


def test_rerun_with_the_same_settings_skips_and_keeps_wall_times(tmp_path, reference):
    job = _copy(reference, tmp_path)
    before = read_json(job / "metrics.json")
    (job / "target" / ".last.pt.x1y2.tmp").write_bytes(b"left by a killed write")
    again = run_job(job, "resume=true", "hs.progress=bar", "hs.data.num_workers=0")  # keys that change no number
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("already completed with the same settings: skipped") == 2
    after = read_json(job / "metrics.json")
    assert after["wall_seconds"] == before["wall_seconds"]
    assert after["top1"] == before["top1"] and after["manifest"] == before["manifest"]
    assert _temporaries(job) == []


def test_a_damaged_artifact_of_a_completed_stage_is_made_again(tmp_path, reference):
    job = _copy(reference, tmp_path)
    (job / "target" / "deploy.pt").unlink()
    history = job / "hs" / "history.csv"
    history.write_text(history.read_text().replace("9", "8"))  # same stage, a changed file
    again = run_job(job, "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "history.csv differs from the file the run wrote" in again.stdout + again.stderr
    assert "deploy.pt is missing" in again.stdout + again.stderr
    assert (job / "target" / "deploy.pt").is_file()
    assert_same_outcome(outcome(job), outcome(reference))


def test_a_moved_job_resumes_with_its_own_scales(tmp_path, reference):
    job = tmp_path / "job"
    assert run_job(job, fault="train.end@2:kill").returncode == KILLED  # stage two trained, not completed
    moved = tmp_path / "elsewhere" / "job"
    moved.parent.mkdir()
    job.rename(moved)
    scales = moved / "hs" / "scales.safetensors"
    original = scales.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0x01  # a different, still valid file in its place: one float's lowest bit
    scales.write_bytes(bytes(data))
    resumed = run_job(moved, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the replaced file is not trained with: stage one's manifest catches it and re-exports the file it wrote
    assert "scales.safetensors differs from the file the run wrote" in resumed.stdout + resumed.stderr
    assert scales.read_bytes() == original
    assert_same_outcome(outcome(moved), outcome(reference))


def test_a_second_writer_is_refused_while_the_first_holds_the_job(tmp_path, reference):
    job = _copy(reference, tmp_path)
    before = _snapshot(job)
    with RunLock(job):  # a run in progress in this directory
        refused = run_job(job, "resume=true")
    assert refused.returncode == 1
    assert f"run directory {job} is in use by another run" in refused.stderr
    assert _snapshot(job) == before


def test_an_undecodable_result_is_not_trusted(tmp_path, reference):
    job = _copy(reference, tmp_path)
    result = job / "hs" / "metrics.json"
    result.write_bytes(result.read_bytes().replace(b'"completed"', b'"compl\xffted"', 1))
    again = run_job(job, "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_json(result)["status"] == "completed"
    assert_same_outcome(outcome(job), outcome(reference))
