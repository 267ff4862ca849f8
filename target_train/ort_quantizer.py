"""A torchao PT2E quantizer whose fake quantization is ONNX Runtime's static QDQ scheme (``quantize.py``).

Quantization-aware training is only worth its cost when the grid it trains against is the grid the
deployed model runs on. torchao's own quantizers target other back ends (``X86InductorQuantizer``:
weights in [-128, 127] and per-channel only under QAT; the XNNPACK quantizer: int8 activations, and in
torchao only as a testing module since it moved to ExecuTorch), so this one annotates the folded
conv+ReLU network the way ``onnxruntime.quantization.quantize_static`` quantizes its ONNX graph
(``exporter.py`` writes that one):

* weights: int8, symmetric, [-127, 127] ([-64, 64] with ``reduce_range``), one scale per output
  channel or one per tensor;
* biases: int32 with scale = input scale x weight scale and zero point 0, derived at conversion
  (the training forward keeps them float, as torchao does for derived specs);
* activations: 256-level affine, uint8 [0, 255] or int8 [-128, 127] (``settings.activation_type``),
  on the network input, on every conv/linear output (after its ReLU when one follows: the ReLU folds
  into the output's zero point, as in ONNX Runtime's graph) and on the global-average-pool output;
  a flatten/reshape shares its input's grid. Other ops (a GhostNet's Add, Mul, HardSigmoid) stay
  float between a DequantizeLinear and a QuantizeLinear.

Ranges are moving-average min/max, the QAT analogue of export's default ``minmax`` calibration,
fake-quantized by torchao's ``FakeQuantize``: its qparams come from the observer's
``calculate_qparams``, as ``convert_pt2e``'s do, so the trained grid is the converted one. (The fused
``FusedMovingAvgObsFakeQuantize`` divides a symmetric [-127, 127] range by 127.5 instead of 127: 0.4 %
off, training and conversion would round on different grids.) Everything is public torchao API
(``torchao.quantization.pt2e.quantizer``), so ``prepare_qat_pt2e`` / ``convert_pt2e`` work unchanged.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .quantize import QuantSettings

# the ops whose outputs the scheme quantizes (aten overloads as torch.export writes them)
_WEIGHTED = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
_POOL = (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.mean.dim, torch.ops.aten.avg_pool2d.default)
_SHAPE = (torch.ops.aten.flatten.using_ints, torch.ops.aten.view.default, torch.ops.aten.reshape.default)

OBSERVER_EPS = 2**-12  # the smallest scale an observer reports (torchao's quantizers use the same)


def weight_range(reduce_range: bool) -> tuple[int, int]:
    """ONNX Runtime's symmetric int8 weight range (``get_qmin_qmax_for_qType``)."""
    return (-64, 64) if reduce_range else (-127, 127)


def activation_range(activation_type: str) -> tuple[torch.dtype, int, int]:
    """The 256-level affine activation grid of ``activation_type`` (QUInt8 | QInt8)."""
    return (torch.uint8, 0, 255) if activation_type == "QUInt8" else (torch.int8, -128, 127)


def qat_specs(settings: QuantSettings):
    """(activation spec, weight spec) for ``prepare_qat_pt2e`` under ``settings``."""
    from torchao.quantization.pt2e import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    dtype, lo, hi = activation_range(settings.activation_type)
    activation = QuantizationSpec(
        dtype=dtype,
        quant_min=lo,
        quant_max=hi,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=OBSERVER_EPS),
    )
    wlo, whi = weight_range(settings.reduce_range)
    if settings.per_channel:
        weight = QuantizationSpec(
            dtype=torch.int8,
            quant_min=wlo,
            quant_max=whi,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, eps=OBSERVER_EPS),
        )
    else:
        weight = QuantizationSpec(
            dtype=torch.int8,
            quant_min=wlo,
            quant_max=whi,
            qscheme=torch.per_tensor_symmetric,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=OBSERVER_EPS),
        )
    return activation, weight


def bias_qparams(observers) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 bias grid: scale = input scale x weight scale, zero point 0 (what ONNX Runtime stores)."""
    act_scale, _ = observers[0].calculate_qparams()
    weight_scale, _ = observers[1].calculate_qparams()
    scale = (act_scale * weight_scale).to(torch.float32)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def make_quantizer(settings: QuantSettings):
    """A ``torchao`` Quantizer annotating a ``torch.export``-ed folded network with the ORT QDQ scheme."""
    from torchao.quantization.pt2e.quantizer import (
        DerivedQuantizationSpec,
        QuantizationAnnotation,
        Quantizer,
        SharedQuantizationSpec,
    )

    activation, weight = qat_specs(settings)
    bias_scheme = torch.per_channel_symmetric if settings.per_channel else torch.per_tensor_symmetric

    def bias_spec(node: Node) -> DerivedQuantizationSpec:
        return DerivedQuantizationSpec(
            derived_from=[(node.args[0], node), (node.args[1], node)],
            derive_qparams_fn=bias_qparams,
            dtype=torch.int32,
            quant_min=-(2**31),
            quant_max=2**31 - 1,
            qscheme=bias_scheme,
            ch_axis=0,
        )

    def annotate(node: Node, inputs: dict, output) -> None:
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map=inputs, output_qspec=output, _annotated=True
        )

    def is_annotated(node: Node) -> bool:
        a = node.meta.get("quantization_annotation")
        return a is not None and a._annotated

    class OrtQdqQuantizer(Quantizer):
        def annotate(self, model: GraphModule) -> GraphModule:
            for node in model.graph.nodes:
                if node.op != "call_function" or is_annotated(node):
                    continue
                if node.target in _WEIGHTED and isinstance(node.args[0], Node) and isinstance(node.args[1], Node):
                    users = list(node.users)
                    fused_relu = users[0] if len(users) == 1 and users[0].target in _RELU else None
                    inputs = {node.args[0]: activation, node.args[1]: weight}
                    if len(node.args) > 2 and isinstance(node.args[2], Node):
                        inputs[node.args[2]] = bias_spec(node)
                    annotate(node, inputs, None if fused_relu is not None else activation)
                    if fused_relu is not None:
                        annotate(fused_relu, {}, activation)
                elif node.target in _POOL and isinstance(node.args[0], Node):
                    annotate(node, {node.args[0]: activation}, activation)
                elif node.target in _SHAPE and isinstance(node.args[0], Node):
                    source = node.args[0]
                    annotate(node, {source: activation}, SharedQuantizationSpec((source, node)))
            return model

        def validate(self, model: GraphModule) -> None:
            """Every annotation above is one ONNX Runtime quantizes; nothing to refuse."""

    return OrtQdqQuantizer()
