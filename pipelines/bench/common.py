"""Shared helpers: timing, peak memory, machine facts, scales, data sources and the settings."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import re
import statistics
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from repopt.engine.runtime import Runtime
from repopt.setup import place as _place
from repopt.host import cpu_name

log = logging.getLogger("repopt.benchmark")

SECTIONS = ("opt", "train", "loader", "hs_epoch")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CIFAR10_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


# ----------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Every knob of one benchmark run, resolved for the device (see ``pipelines.benchmark``)."""

    device: torch.device
    sections: tuple[str, ...]
    opt_arch: str
    train_arch: str
    hs_arch: str
    resolution: int
    batch: int
    steps: int
    warmup: int
    num_classes: int
    hs_images: int
    hs_batch: int
    loader_epochs: int
    workers: int
    compile: bool
    compile_modes: tuple[str, ...]
    data: str
    data_cache: str
    amp: bool
    channels_last: bool
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(self.device)
        d["sections"] = list(self.sections)
        d["compile_modes"] = list(self.compile_modes)
        return d


def runtime(settings: Settings) -> Runtime:
    """The trainer's runtime for the benchmark's device, AMP and memory-format switches."""
    return Runtime(settings.device, torch.bfloat16 if settings.amp else None, settings.channels_last)


def place(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """``repopt.setup.place``: ``model`` on the run's device, channels_last when the run trains in it."""
    return _place(model, runtime(settings))


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], object], device: torch.device, before: Optional[Callable[[], object]] = None) -> float:
    """Milliseconds of one call of ``fn``; ``before`` runs first, outside the timed region.

    On CUDA the device is synchronized before the call and the call is timed with CUDA events, so
    the figure is the wall time of the call including any launch overhead. On the CPU the call is
    timed with ``time.perf_counter`` (CPU kernels run synchronously).
    """
    if before is not None:
        before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_rounds(calls: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time several variants in interleaved rounds: each round runs one call of every variant.

    ``calls`` maps a key to ``(fn, before)``. Interleaving makes a change in machine load (other
    processes on a shared machine, clock changes) hit every variant alike instead of whichever
    happened to run at the time. Returns the milliseconds of the ``repeats`` timed calls per key.
    """
    for _ in range(warmup):
        for fn, before in calls.values():
            if before is not None:
                before()
            fn()
    sync(device)
    out: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, (fn, before) in calls.items():
            out[key].append(time_one(fn, device, before))
    return out


def timing_note(device: torch.device, what: str) -> str:
    """How the ``what`` (models, variants) of a section interleaved in rounds were timed."""
    how = "CUDA events, synchronized before each step" if device.type == "cuda" else "time.perf_counter per step"
    return f"{how}; {what} interleaved round by round"


def ratio(rows: dict, a: str, b: str, field: str = "ms") -> Optional[float]:
    """``rows[a][field] / rows[b][field]``, None where either row or value is missing or zero."""
    va, vb = rows.get(a, {}).get(field), rows.get(b, {}).get(field)
    return va / vb if va and vb else None


def summarize_ms(samples: list[float]) -> dict:
    """Median (the reported figure), min, max and all samples of a list of milliseconds."""
    return {
        "ms": statistics.median(samples),
        "ms_min": min(samples),
        "ms_max": max(samples),
        "ms_all": [round(s, 4) for s in samples],
    }


class Stopwatch:
    """Wall time of a block that ends with a device synchronization."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS baselines are not inflated."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what is built and run between ``start()`` and ``stop()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, less the memory allocated at
    ``start()`` (tensors only: weights, gradients, optimizer state and activations; not the caching
    allocator's reserve or the CUDA context).
    CPU (Linux): the rise of the process's peak resident set (VmHWM, reset through
    ``/proc/self/clear_refs``) over its resident set at ``start()``. It counts everything the
    process touched (allocator slack, oneDNN scratch buffers, library code paged in), so it is an
    indicative figure, not a tensor count. Elsewhere: not measured (None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kib: Optional[int] = None
        self.ok = False

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated rise"
        return "peak RSS rise (VmHWM - VmRSS at start)" if self.ok else "n/a"

    def start(self) -> None:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            self.ok = True
            return
        self.ok = _reset_rss_peak()
        self.base_kib = _proc_status_kib("VmRSS") if self.ok else None
        self.ok = self.ok and self.base_kib is not None

    def stop(self) -> Optional[float]:
        """The peak in MiB, or None where it cannot be measured."""
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base_bytes) / 2**20
        if not self.ok:
            return None
        hwm = _proc_status_kib("VmHWM")
        return None if hwm is None else max(hwm - self.base_kib, 0) / 1024.0


# ------------------------------------------------------------------------------------ machine facts
def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 min load averages (rounded), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    import torchvision

    cpu = cpu_name()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "load_average_start": load_average(),
        "other_cpu_busy_start": cpu_busy_fraction(),
    }


def cpu_busy_fraction(interval: float = 0.5) -> Optional[float]:
    """Share of all cores busy during ``interval`` s while this process sleeps (i.e. other processes' load).

    Read from /proc/stat (Linux); None elsewhere. A CPU timing taken while other processes keep the
    cores busy measures the scheduler more than the code: with 2 threads on 2 shared cores every
    parallel region waits for its second thread to be scheduled.
    """
    def snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields[:8])

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else None


# -------------------------------------------------------------------------------------------- data
def parse_data(spec: str) -> tuple[str, Optional[Path]]:
    """``synthetic`` or ``cifar10-jpeg[:<path to the .tar.gz or its extracted folder>]``."""
    if spec == "synthetic":
        return "synthetic", None
    if spec == "cifar10-jpeg" or spec.startswith("cifar10-jpeg:"):
        path = spec.partition(":")[2] or str(DEFAULT_CIFAR10_JPEG)
        return "cifar10-jpeg", Path(os.path.expanduser(path))
    raise ValueError(f"--data {spec!r}: use 'synthetic' or 'cifar10-jpeg:<path to cifar10-jpeg.tar.gz or its folder>'")


def cifar10_root(path: Path, cache: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``path`` itself, or ``path`` extracted into ``cache``."""
    if path.is_dir():
        if (path / "train").is_dir():
            return path
        raise FileNotFoundError(f"{path} has no train/ folder (expected the extracted cifar10-jpeg layout train/<class>/*.jpg)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass --data cifar10-jpeg:<path to cifar10-jpeg.tar.gz>")
    root = cache / "cifar10-jpeg"
    marker = root / ".extracted"
    if not marker.exists():
        log.info("extracting %s to %s (once)", path, root)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            try:
                tar.extractall(root, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(root)  # noqa: S202 - the shared, trusted archive
        inner = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()]
        if not (root / "train").is_dir() and len(inner) == 1:
            root = inner[0]
        marker.write_text(str(root))
    else:
        root = Path(marker.read_text().strip() or root)
    return root


class DataSources:
    """Builds (once) the CIFAR-sized training data the ``loader`` and ``hs_epoch`` sections share."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._device_bundle = None

    def config(self, loader: str = "device", workers: int = 0):
        from repopt.config import DataConfig

        s = self.settings
        kind, path = parse_data(s.data)
        common = dict(image_size=32, batch_size=s.hs_batch, eval_batch_size=512, loader=loader, num_workers=workers,
                      crop_padding=4, hflip=True, drop_last=True)
        if kind == "synthetic":
            return DataConfig(name="synthetic", synthetic_num_classes=10, synthetic_train_size=s.hs_images,
                              synthetic_test_size=64, **common)
        root = cifar10_root(path, Path(os.path.expanduser(s.data_cache)))
        return DataConfig(name="imagefolder", root=str(root), train_subset=s.hs_images, test_subset=64,
                          cache_dir=str(Path(os.path.expanduser(s.data_cache)) / "decoded"), **common)

    def build(self, loader: str = "device", workers: int = 0):
        """``build_data`` for this run's data, built now (the caller owns it and its workers)."""
        from repopt.data import build_data

        cfg = self.config(loader, workers)
        if cfg.name == "imagefolder" and loader == "device":
            cfg.num_workers = max(self.settings.workers, 0)  # decode workers, once
        t0 = time.perf_counter()
        bundle = build_data(cfg, self.settings.device, seed=self.settings.seed)
        log.info("data %s (%s loader) ready in %.1f s", cfg.name, loader, time.perf_counter() - t0)
        return bundle

    def bundle(self):
        """The device-loader bundle, built once and shared by the sections."""
        if self._device_bundle is None:
            self._device_bundle = self.build("device")
        return self._device_bundle
