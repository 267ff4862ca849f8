"""``python -m target_train.qat run=<stage-two run dir>``: quantization-aware training of a finished run.

Static INT8 post-training quantization (``target_train.export``) rounds the folded kernels once; a
RepOpt/RepVGG kernel folded from several branches is long-tailed, so its INT8 grid can be too coarse
for the rest of the weights. QAT fine-tunes the *folded* deploy model (a plain conv+ReLU stack: what
runs in deployment) for a few epochs with the INT8 rounding simulated in the forward pass, so the
weights move to where the rounding hurts least. Steps:

1. load ``best.pt`` (or ``last.pt``), fold it (``fuse``), capture it with ``torch.export`` and let
   torchao's PT2E flow (``prepare_qat_pt2e``) insert fake quantization with ONNX Runtime's QDQ scheme
   (``ort_quantizer``: the grid ``export`` quantizes to, per-channel or per-tensor int8 weights);
2. warm the range observers on ``calibration_images`` un-augmented training images (as export
   calibrates), then train ``epochs`` epochs on the run's training split with its augmentation:
   SGD, momentum 0.9, no weight decay, the learning rate cosine-annealed to 0 per step;
   ``masks=true`` multiplies each folded conv kernel's gradient by the run's RepOpt mask, carried
   through the fold (``folded_masks``);
3. ``convert_pt2e``, export the converted model to ONNX (QuantizeLinear/DequantizeLinear, int8
   weights and int32 biases, like ``model.int8.onnx``), check ONNX Runtime's logits against the
   converted PyTorch model's on a test batch (``ONNX_MAX_DIFF``), evaluate top-1/top-5 and
   time it at batch 1 and 32.

Writes ``model.qat.int8.onnx``, ``qat_history.csv`` (one row per QAT epoch; ``history.csv`` is the
run's own training history and stays untouched) and ``qat.json`` into the run directory, all built
in a scratch folder and moved into place only after every check passed. Hydra's logs go to
``<run>/qat_logs``.

This module is the app; the step is ``qat_trainer.py``, the schema ``step_config.QatConfig``. The
settings are checked before the step's modules (and torch) load.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repopt.app import run_step

from .step_config import QatConfig, validate_qat


def qat(cfg: QatConfig) -> dict:
    """The step, imported only now: the settings were checked before torch loads."""
    from .qat_trainer import qat_run

    return qat_run(cfg)


@hydra.main(version_base="1.3", config_path="pkg://repopt.conf", config_name="qat")
def main(cfg: DictConfig):
    return run_step(cfg, QatConfig, validate_qat, qat)


if __name__ == "__main__":
    main()
