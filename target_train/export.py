"""``python -m target_train.export run=<stage-two run dir>`` (console script ``repopt-export``).

Deployment check of a trained stage-two run (``model=target`` or the baseline, ``repvgg`` / ``rep``):

1. load ``best.pt`` (or ``last.pt``) safely, rebuild the model and fold it into the plain
   conv+ReLU network (``fuse``, the family's folding);
2. export ``model.onnx`` (dynamic batch axis) and check ONNX Runtime's FP32 logits against
   PyTorch's on a real test batch (max relative difference <= 1e-4, else ``OnnxMismatchError``);
3. static INT8 post-training quantization with ONNX Runtime (QDQ, per-channel int8 weights),
   calibrated on ``calibration_images`` training images under the evaluation transform
   (no augmentation), written as ``model.int8.onnx`` (``model.int8-<tag>.onnx`` with ``tag``);
4. FP32 and INT8 top-1/top-5 on the run's test set, latency per image at batch 1 and 32, and
   per-layer weight statistics of the folded convs (abs-max / std: how long-tailed the kernel
   is, which is what makes per-tensor/per-channel int8 lose precision).

Results go to ``quant.json`` in the run directory. ``tag=X`` names the INT8 files ``model.int8-X.onnx``
and ``quant-X.json`` instead, so that several PTQ settings of one run (per channel and per tensor, say)
sit side by side; ``model.onnx`` is shared by all of them (``_place_fp32``). The run itself is read
by ``finished_run``, the ONNX file written by ``onnx_io``, quantized and timed by ``quantize``, its
kernels described by ``weight_stats``. Every file is produced in a scratch folder first and moved
into place only after all checks passed, so a failure leaves the run directory as it was. Hydra's
own logs go to ``<run>/export_logs``.

This module is the app; the step is ``exporter.py``, the schema ``step_config.ExportConfig``. The
settings are checked before the step's modules (and torch) load.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repopt.app import run_step
from repopt.results import QuantResult

from .step_config import ExportConfig, validate_export


def export(cfg: ExportConfig) -> QuantResult:
    """The step, imported only now: the settings were checked before torch loads."""
    from .exporter import export_run

    return export_run(cfg)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="export")
def main(cfg: DictConfig):
    return run_step(cfg, ExportConfig, validate_export, export)


if __name__ == "__main__":
    main()
