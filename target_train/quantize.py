"""ONNX Runtime side of ``repopt-export``: static INT8 post-training quantization, evaluation, latency.

Everything here works on ONNX files and numpy/torch batches; nothing imports the training code.
``onnxruntime`` (the ``deploy`` extra) is imported lazily, so the rest of the package works
without it.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from repopt.errors import ConfigError
from repopt.host import cpu_flags

from .step_config import ACTIVATION_TYPE, ACTIVATION_TYPES, CALIBRATION_METHOD, CALIBRATION_METHODS, PER_CHANNEL, REDUCE_RANGE

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def require_onnxruntime():
    """Import onnx + onnxruntime, or say how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"the export needs onnx and onnxruntime ({exc}); install them with: pip install 'repopt-pipeline[deploy]'"
        ) from None
    return onnxruntime


# ---------------------------------------------------------------------------- settings
def has_vnni(flags: Optional[set[str]] = None) -> Optional[bool]:
    """True / False on x86 Linux (AVX-512 VNNI or AVX-VNNI), None where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return bool({"avx512_vnni", "avx_vnni"} & flags)


@dataclass
class QuantSettings:
    """What ``quantize_static`` is called with (recorded verbatim in quant.json)."""

    activation_type: str  # QUInt8 | QInt8
    weight_type: str
    per_channel: bool
    reduce_range: bool
    calibration_method: str
    format: str = "QDQ"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_settings() -> "QuantSettings":
    """The default INT8 scheme (the constants above) on this machine."""
    return choose_settings(ACTIVATION_TYPE, REDUCE_RANGE, PER_CHANNEL, CALIBRATION_METHOD)


def choose_settings(
    activation_type: str,
    reduce_range: Optional[bool],
    per_channel: bool,
    calibration_method: str,
    machine: Optional[str] = None,
    vnni: Optional[bool] | str = "detect",
) -> QuantSettings:
    """ONNX Runtime's CPU guidance (``quantize_static`` docstring): QDQ with int8 weights;
    uint8 activations on x86-64 (``reduce_range`` where the CPU has no VNNI, to avoid int16
    saturation in the u8s8 kernels), int8 activations on ARM."""
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError(f"activation_type={activation_type!r}: choose one of {', '.join(ACTIVATION_TYPES)}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration_method={calibration_method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686", "x86")
    vnni = has_vnni() if vnni == "detect" else vnni
    reasons = []
    if activation_type == "auto":
        activation_type = "uint8" if x86 else "int8"
        reasons.append(f"activations {activation_type} for {'x86-64' if x86 else machine}")
    if reduce_range is None:
        reduce_range = bool(x86 and not vnni)
        reasons.append(
            f"reduce_range={str(reduce_range).lower()} "
            f"({'VNNI found' if vnni else 'no VNNI' if vnni is False else 'VNNI unknown'})"
            if x86
            else "reduce_range=false (not x86)"
        )
    return QuantSettings(
        activation_type="QUInt8" if activation_type == "uint8" else "QInt8",
        weight_type="QInt8",
        per_channel=bool(per_channel),
        reduce_range=bool(reduce_range),
        calibration_method=calibration_method,
        reason="; ".join(reasons),
    )


# ---------------------------------------------------------------------------- sessions
def session(path: Path, threads: Optional[int] = None):
    """A CPU inference session with all graph optimizations."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess, x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


# ---------------------------------------------------------------------------- quantization
def make_reader(batches: Iterable[torch.Tensor]):
    """A ``CalibrationDataReader`` over float NCHW batches (already normalized)."""
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        def __init__(self):
            self.count = 0
            self._it: Iterator = iter(batches)

        def get_next(self):
            x = next(self._it, None)
            if x is None:
                return None
            self.count += int(x.shape[0])
            return {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}

    return BatchReader()


def quantize(fp32_path: Path, int8_path: Path, batches: Iterable[torch.Tensor], settings: QuantSettings, work_dir: Path) -> int:
    """Pre-process (shape inference + ORT optimizations), then static QDQ quantization.

    Returns the number of calibration images that went through the model.
    """
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work_dir / "model.preprocessed.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
    reader = make_reader(batches)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.calibration_method]
    quantize_static(
        str(pre),
        str(int8_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=settings.per_channel,
        reduce_range=settings.reduce_range,
        activation_type=getattr(QuantType, settings.activation_type),
        weight_type=getattr(QuantType, settings.weight_type),
        calibrate_method=method,
        extra_options={"ActivationSymmetric": settings.activation_symmetric, "WeightSymmetric": settings.weight_symmetric},
    )
    pre.unlink(missing_ok=True)
    return reader.count


# ---------------------------------------------------------------------------- evaluation
def evaluate(sessions: dict, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict:
    """Top-1 / top-5 (percent) of every session on the same batches, and how often they agree."""
    k = min(5, num_classes)
    correct1 = {name: 0 for name in sessions}
    correct5 = {name: 0 for name in sessions}
    preds: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    n = 0
    for x, y in batches:
        y = y.cpu().numpy()
        x_np = x.detach().cpu().numpy()
        for name, sess in sessions.items():
            logits = run_session(sess, x_np)
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            correct1[name] += int((top[:, 0] == y).sum())
            correct5[name] += int((top == y[:, None]).any(axis=1).sum())
            preds[name].append(top[:, 0])
        n += int(y.shape[0])
    if n == 0:
        raise ConfigError("the evaluation set is empty; set eval_images=null or a positive number")
    out = {"images": n, "top5_k": k}
    for name in sessions:
        out[f"{name}_top1"] = 100.0 * correct1[name] / n
        out[f"{name}_top5"] = 100.0 * correct5[name] / n
    names = list(sessions)
    if len(names) == 2:
        a, b = (np.concatenate(preds[m]) for m in names)
        out["agreement"] = 100.0 * float((a == b).mean())
    return out


def latency_ms_per_image(sess, example: torch.Tensor, batch: int, runs: int, warmup: int = 3) -> float:
    """Median wall time of one ``run`` divided by the batch size, after ``warmup`` runs."""
    x = example.detach().cpu().numpy().astype(np.float32)
    reps = -(-batch // x.shape[0])
    x = np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:batch])
    feed = {INPUT_NAME: x}
    for _ in range(max(0, warmup)):
        sess.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], feed)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


LATENCY_BATCHES = (1, 32)


def latency_table(sess, example: torch.Tensor, runs: int, warmup: int = 3) -> dict[str, float]:
    """``{"batch1": ms, "batch32": ms}``: ms per image at each of ``LATENCY_BATCHES``."""
    return {f"batch{b}": latency_ms_per_image(sess, example, b, runs, warmup) for b in LATENCY_BATCHES}
