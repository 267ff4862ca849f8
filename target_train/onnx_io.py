"""ONNX files of a folded model: writing one (either exporter), and reading back its opset and node types."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from repopt.errors import RepOptError

from .quantize import INPUT_NAME, OUTPUT_NAME


class ExportError(RepOptError, RuntimeError):
    """The exported or quantized model is not usable (wrong numbers, exporter failure)."""


class OnnxMismatchError(ExportError):
    """ONNX Runtime's FP32 logits differ from PyTorch's by more than the bound."""


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int, exporter: str) -> None:
    """Write the (folded) model as ONNX with a dynamic batch axis; deterministic for a given torch."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        if exporter == "torchscript":
            kwargs = {}
            if "dynamo" in inspect.signature(torch.onnx.export).parameters:
                kwargs["dynamo"] = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    do_constant_folding=True,
                    export_params=True,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    **kwargs,
                )
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:  # the exporters raise many types; name the setting to change
        raise ExportError(
            f"torch.onnx.export (exporter={exporter}, opset={opset}) failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}; try opset=17 exporter=torchscript"
        ) from None
    import onnx

    onnx.checker.check_model(str(path))


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def node_types(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def qdq_node_types(path: Path, what: str) -> dict[str, int]:
    """``node_types`` of an INT8 model, refused unless it quantizes (QuantizeLinear and DequantizeLinear)."""
    nodes = node_types(path)
    if not nodes.get("QuantizeLinear") or not nodes.get("DequantizeLinear"):
        raise ExportError(f"{what} has no QuantizeLinear/DequantizeLinear nodes ({nodes})")
    return nodes
