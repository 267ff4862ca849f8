"""The parts of the device check: machine facts, ``pytest -m gpu``, the benchmark, the paper HS on
CIFAR-10, and a 224 px target epoch of RepOpt-VGG vs RepVGG.

Every part but ``env`` runs the project's own commands as child processes (``python -m ...``) with
a time limit, and reads their figures from the files they write (``metrics.json``,
``history.csv``, the benchmark's JSON, pytest's JUnit XML). Each takes the full or the quick
settings; the quick ones run the same commands at sizes a 2-core CPU finishes in minutes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .runner import Part, PartFailed, Skip, run_logged

REPO = Path(__file__).resolve().parents[2]
CIFAR10_CANDIDATES = (REPO / "shared" / "data" / "cifar10-jpeg.tar.gz", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
DEVICE_VARIABLE = "REPOPT_GPU_CHECK_DEVICE"  # tests/test_gpu_paths.py: run the gpu tests on this device

# import name -> distribution, for the packages the parts need (pyproject's dependencies, dev extras)
REQUIRED = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "numpy": "numpy",
    "pandas": "pandas",
    "scipy": "scipy",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "torchvision": "torchvision",
    "pytest": "pytest",
}
OPTIONAL = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}  # the export test


@dataclass
class CheckSettings:
    """One check run: the device, full or quick sizes, where results and cached data go."""

    device: str  # cuda | cpu
    quick: bool
    out: Path
    data_cache: Path
    cifar10: Path | None = None  # the archive or extracted folder; None: look in the usual places
    python: str = sys.executable

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def child_env(self) -> dict:
        """The children's environment: the checkout first on the path, unbuffered output."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env[DEVICE_VARIABLE] = self.device
        return env


def missing_packages(names: dict) -> list[str]:
    return [dist for module, dist in names.items() if importlib.util.find_spec(module) is None]


def _require(settings: CheckSettings) -> None:
    missing = missing_packages(REQUIRED)
    if missing:
        raise PartFailed(
            f"missing Python packages: {', '.join(missing)}; install the project (pip install -e '.[dev]') or "
            f"bring them as wheels (docs/benchmarks.md, 'GPU results')"
        )


# ------------------------------------------------------------------------------------------- env
def _nvidia_smi() -> tuple[str | None, str | None]:
    """(driver version, the full ``nvidia-smi`` text), None where there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None
    try:
        driver = (
            subprocess.run(
                [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            .stdout.strip()
            .splitlines()
        )
        full = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (driver[0] if driver else None), full


def env_part(settings: CheckSettings) -> Part:
    def run(timeout_s: float) -> dict:
        import torch

        from repopt.host import cpu_name

        driver, smi = _nvidia_smi()
        if smi:
            (settings.out / "nvidia-smi.txt").write_text(smi)
        cuda = torch.cuda.is_available()
        figures = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": cpu_name(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "cuda_available": cuda,
            "driver": driver,
            "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU ({cpu_name()})",
            "device_capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
            "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            "missing_packages": missing_packages(REQUIRED),
            "missing_optional_packages": missing_packages(OPTIONAL),
        }
        for module in ("torchvision", "hydra", "onnxruntime"):
            spec = importlib.util.find_spec(module)
            if spec is not None:
                figures[f"{module}_version"] = getattr(__import__(module), "__version__", None)
        if settings.cuda and not cuda:
            raise PartFailed("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)", figures)
        if figures["missing_packages"]:
            raise PartFailed(f"missing Python packages: {', '.join(figures['missing_packages'])}", figures)
        return figures

    return Part("env", run, 60)


# ------------------------------------------------------------------------------------------ tests
def _junit(path: Path) -> dict:
    """Per-test outcomes, seconds and the first failure/skip message of a JUnit XML file."""
    tests, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, node.get("message") or (node.text or "")[:500]
                break
        counts[outcome] += 1
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return {**counts, "tests": tests}


def tests_part(settings: CheckSettings) -> Part:
    def run(timeout_s: float) -> dict:
        _require(settings)
        xml = settings.out / "gpu_tests.xml"
        command = [
            settings.python,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu_paths.py",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            f"--junitxml={xml}",
            "--timeout=300",
        ]
        if importlib.util.find_spec("pytest_timeout") is None:
            command.remove("--timeout=300")
        try:
            run_logged(command, settings.out / "gpu_tests.log", timeout_s, env=settings.child_env(), cwd=REPO)
        except PartFailed as exc:
            raise PartFailed(str(exc), _junit(xml) if xml.is_file() else {}) from None
        figures = _junit(xml)
        if figures["skipped"] and settings.cuda:
            raise PartFailed(f"{figures['skipped']} gpu test(s) skipped on CUDA (see their messages)", figures)
        if not figures["passed"]:
            raise PartFailed("no gpu test ran", figures)
        return figures

    return Part("tests", run, 300 if settings.cuda else 600)


# -------------------------------------------------------------------------------------- benchmark
QUICK_BENCHMARK = (
    "--arch tiny --steps 3 --warmup 1 --hs-images 512 --hs-batch 128 --resolution 32 --batch 8 --workers 1 "
    "--loader-epochs 1 --num-classes 10 --threads 1"
).split()


def benchmark_part(settings: CheckSettings) -> Part:
    def run(timeout_s: float) -> dict:
        _require(settings)
        out_json = settings.out / "benchmark.json"
        command = [settings.python, "-m", "pipelines.benchmark", "--device", settings.device, "--out", str(out_json)]
        run_logged(
            command + (QUICK_BENCHMARK if settings.quick else []),
            settings.out / "benchmark.log",
            timeout_s,
            env=settings.child_env(),
            cwd=REPO,
        )
        from pipelines.bench.report import format_table

        result = json.loads(out_json.read_text())
        (settings.out / "benchmark.txt").write_text(format_table(result) + "\n")

        return {
            "targets": result.get("targets", []),
            "settings": result.get("settings", {}),
            "total_seconds": result.get("meta", {}).get("total_seconds"),
            "table_file": "benchmark.txt",
        }

    return Part("benchmark", run, 300)


# ------------------------------------------------------------------------------------- HS on CIFAR
def find_cifar10(settings: CheckSettings) -> Path:
    """The extracted shared CIFAR-10 (train/ and test/); ``Skip`` when it is nowhere to be found."""
    from pipelines.bench.data import cifar10_root

    if settings.cifar10 is not None:
        candidates = [settings.cifar10]
    else:
        from_env = os.environ.get("REPOPT_CIFAR10")  # the extracted folder the CPU recipes read
        candidates = ([Path(os.path.expanduser(from_env))] if from_env else []) + list(CIFAR10_CANDIDATES)
    for path in candidates:
        if path.exists():
            return cifar10_root(path, settings.data_cache)
    raise Skip(
        "the shared CIFAR-10 is not here (looked for "
        + ", ".join(map(str, candidates))
        + "); pass --cifar10 <cifar10-jpeg.tar.gz or its extracted folder>"
    )


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in rows]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def hs_cifar10_part(settings: CheckSettings) -> Part:
    """The paper HS (``experiment=paper``: B1, ImageNet strides, batch 256, SGD recipe, compile on) on
    the 50,000 CIFAR-10 training images for 3 epochs; quick: tiny, 1,024 images, 2 epochs."""

    def run(timeout_s: float) -> dict:
        _require(settings)
        root = find_cifar10(settings)
        run_dir = settings.out / "hs_cifar10"
        sizes = (
            [
                "arch=tiny",
                "data.train_subset=1024",
                "data.test_subset=256",
                "data.batch_size=128",
                "epochs=2",
                "data.num_workers=1",
            ]
            if settings.quick
            else ["epochs=3", "data.num_workers=8"]
        )
        command = [
            settings.python,
            "-m",
            "hypersearch",
            "experiment=paper",
            "data=imagefolder",
            f"data.root={root}",
            *sizes,
            "sched.warmup_epochs=1",
            "compile=true",
            "compile_mode=auto",
            "progress=log",
            f"device={settings.device}",
            f"hydra.run.dir={run_dir}",
        ]
        batch = 128 if settings.quick else 256  # the paper's 256 comes with experiment=paper
        wall = run_logged(command, settings.out / "hs_cifar10.log", timeout_s, env=settings.child_env(), cwd=REPO)
        history, metrics = _history(run_dir), _metrics(run_dir)
        after = [row["epoch_seconds"] for row in history[1:]]
        return {
            "arch": metrics.get("arch"),
            "train_images": _train_images(metrics, batch),
            "batch": batch,
            "compile": "auto mode (reduce-overhead on one GPU)" if settings.cuda else "default mode",
            "epochs": [{k: row.get(k) for k in ("epoch", "epoch_seconds", "images_per_sec", "test_top1")} for row in history],
            "first_epoch_s": history[0]["epoch_seconds"] if history else None,
            "s_per_epoch_after_compile": sum(after) / len(after) if after else None,
            "top1": metrics.get("top1"),
            "peak_memory_gib": metrics.get("peak_memory_gib"),
            "device": metrics.get("device"),
            "wall_seconds": wall,
            "status": metrics.get("status"),
        }

    return Part("hs_cifar10", run, 300 if settings.cuda else 420)


def _train_images(metrics: dict, batch: int) -> int | None:
    """Training images per epoch (drop_last: steps per epoch x batch), from the run's own metrics."""
    steps, epochs = metrics.get("steps"), metrics.get("epochs")
    return steps // epochs * batch if steps and epochs else None


# --------------------------------------------------------------------------------- 224 px target
def target_224_part(settings: CheckSettings) -> Part:
    """A stage-two epoch at 224 px on a synthetic ImageFolder (worker DataLoader, RandomResizedCrop,
    bf16 + channels_last on CUDA): RepOpt-VGG-B1 with the released B1 scales vs RepVGG-B1.
    Two epochs each; the figures are the second epoch's. Quick: the tiny architecture, 48 images."""

    def run(timeout_s: float) -> dict:
        _require(settings)
        from .synthetic_folder import synthetic_image_folder

        train_images, batch = (48, 16) if settings.quick else (5120, 128)
        root = synthetic_image_folder(
            settings.data_cache / f"synthetic-224-{train_images}",
            image_size=224,
            train_images=train_images,
            val_images=max(batch, train_images // 20),
        )
        workers = 1 if settings.quick else max(1, min(12, (os.cpu_count() or 2) - 2))
        arch = ["arch=tiny"] if settings.quick else ["arch=B1"]
        deadline = time.monotonic() + timeout_s
        models = {}
        for model, scales in (("target", "init" if settings.quick else "official:B1"), ("repvgg", "none")):
            run_dir = settings.out / "target_224" / model
            command = [
                settings.python,
                "-m",
                "target_train",
                f"model={model}",
                f"scales={scales}",
                *arch,
                "data=imagefolder",
                f"data.root={root}",
                "data.image_size=224",
                "data.random_resized_crop=true",
                f"data.batch_size={batch}",
                f"data.num_workers={workers}",
                "epochs=2",
                "sched.warmup_epochs=0",
                "deploy=false",
                "progress=log",
                f"device={settings.device}",
                f"hydra.run.dir={run_dir}",
            ]
            run_logged(
                command, settings.out / f"target_224_{model}.log", deadline - time.monotonic(), env=settings.child_env(), cwd=REPO
            )
            metrics, history = _metrics(run_dir), _history(run_dir)
            # the second epoch: worker start-up, cuDNN's first calls and the allocator's growth are behind it
            models[model] = {
                "images_per_sec": history[-1]["images_per_sec"],
                "epoch_seconds": history[-1]["epoch_seconds"],
                "peak_memory_gib": metrics.get("peak_memory_gib"),
                "steps": metrics.get("steps"),
                "top1": metrics.get("top1"),
                "status": metrics.get("status"),
            }
        t, r = models["target"], models["repvgg"]

        def ratio(key):
            return t[key] / r[key] if t.get(key) and r.get(key) else None

        return {
            "arch": "tiny" if settings.quick else "B1",
            "image_size": 224,
            "train_images": train_images,
            "batch": batch,
            "workers": workers,
            "models": models,
            "target_over_repvgg_img_s": ratio("images_per_sec"),
            "target_over_repvgg_peak_mem": ratio("peak_memory_gib"),
        }

    return Part("target_224", run, 240 if settings.cuda else 300)


PARTS = {
    "env": env_part,
    "tests": tests_part,
    "benchmark": benchmark_part,
    "hs_cifar10": hs_cifar10_part,
    "target_224": target_224_part,
}
