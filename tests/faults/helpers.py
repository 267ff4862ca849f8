"""Running a pipeline job as a real process, stopped at a named fault point (repopt/faults.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.runs import _env, pipeline_overrides, read_json

# One job of the pipeline on the tiny model: one epoch of stage one, two of stage two (so that a
# fault inside stage two's training leaves a checkpoint to resume from), deploy.pt exported.
JOB = [o for o in pipeline_overrides() if not o.startswith(("target.deploy", "target.epochs"))] + [
    "target.epochs=2",
    "target.deploy=true",
    "variant=searched",
]
KILLED = -9  # returncode of a process ended by SIGKILL
TERMINATED = -15


def run_job(job_dir: Path, *extra: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pipelines.search_and_train`` into ``job_dir`` (one thread: the same numerics in every run)."""
    env = _env(threads=1)
    env.pop("REPOPT_FAULT", None)
    if fault:
        env["REPOPT_FAULT"] = fault
    command = [sys.executable, "-m", "pipelines.search_and_train", *JOB, *extra, f"hydra.run.dir={job_dir}"]
    return subprocess.run(command, cwd=job_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outcome(job_dir: Path) -> dict:
    """What a finished job delivered, for comparing two runs bit for bit: the scales' tensors, the
    target's final and best weights, the numbers of both stages, and the hand-off's hashes."""
    job = read_json(job_dir / "metrics.json")
    return {
        "scales": load_file(job_dir / "hs" / "scales.safetensors"),
        "last": model_weights(job_dir / "target" / "last.pt"),
        "best": model_weights(job_dir / "target" / "best.pt"),
        "numbers": {k: (job["hs"][k], job["target"][k]) for k in ("top1", "top5", "loss", "best_top1", "epochs", "steps")},
        "optimizer": job["target"]["optimizer"],
        "handoff": (job["hs_scales_sha256"], job["scales_sha256"]),
    }


def assert_same_outcome(a: dict, b: dict) -> None:
    assert same_tensors(a["scales"], b["scales"])
    assert same_tensors(a["last"], b["last"])
    assert same_tensors(a["best"], b["best"])
    assert a["numbers"] == b["numbers"]
    assert a["optimizer"] == b["optimizer"]
    assert a["handoff"][0] == a["handoff"][1] is not None  # stage two read exactly the file stage one wrote
