"""Export forms of quantized layers: explicit quantize / dequantize ops that ONNX lowers to QDQ.

``lower_for_export(model)`` returns a copy of ``model`` in which every QDQ-exportable ``QuantLinear``
(static per-tensor INT8 inputs, per-channel INT8 weights) is replaced by a ``QDQLinear`` with the same
tensors. The exporter traces that copy; the model the user holds is never modified. Other quantized
layers export as their exact fake-quant float arithmetic.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import DitCompressError
from compress.nn.quant import INT8_MAX, QuantLinear


class QDQLinear(nn.Module):
    """A ``QuantLinear`` written as quantize -> dequantize -> matmul, the pattern QDQ runtimes fuse.

    Inputs are clamped to +-127 steps, then go out as uint8 with zero point 128 (the U8S8 form ONNX
    Runtime's x86 integer kernels prefer) or as int8 with zero point 0 (what TensorRT requires): both
    exactly the symmetric int8 grid of the fake-quant path. The activation scale is frozen as a Python
    float so the exporter writes it as a constant.
    """

    def __init__(self, layer: QuantLinear, act_dtype: str):
        super().__init__()
        if not layer.qdq_exportable():
            raise ValueError("only static per-tensor INT8 x per-channel INT8 layers have a QDQ form")
        self.layer = layer
        self.scale = float(layer.act_scale[0])
        self.act_dtype = act_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

        m, s = self.layer, self.scale
        qd = torch.ops.quantized_decomposed
        xs = x / m.smooth if m.smooth is not None else x
        zp, lo, hi, dt = (128, 0, 255, torch.uint8) if self.act_dtype == "uint8" else (0, -128, 127, torch.int8)
        xq = qd.quantize_per_tensor.default(xs.clamp(-INT8_MAX * s, INT8_MAX * s), s, zp, lo, hi, dt)
        xd = qd.dequantize_per_tensor.default(xq, s, zp, lo, hi, dt)
        zeros = torch.zeros(m.out_features, dtype=torch.int64, device=xs.device)
        w = qd.dequantize_per_channel.default(m.qweight, m.weight_scale[:, 0], zeros, 0, -128, 127, torch.int8)
        y = F.linear(xd, w.to(xs.dtype))
        if m.rank:
            y = y + F.linear(F.linear(xs, m.lora_down.to(x.dtype)), m.lora_up.to(x.dtype))
        return y if m.bias is None else y + m.bias.to(y.dtype)


def lower_for_export(model: nn.Module, act_dtype: str = "uint8") -> tuple[nn.Module, int]:
    """(copy of ``model`` with QDQ layers swapped in, number swapped); ``model`` itself when none qualify.

    Layers whose static scale depends on the timestep group cannot be expressed as one QuantizeLinear, so
    they are refused with a clear error instead of being exported with a silently different scale.
    """
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.act_groups > 1:
            raise DitCompressError(
                f"{name}: its activation scale is chosen per timestep group ({m.act_groups} groups), which an ONNX "
                f"graph cannot select; re-quantize with 'activations: {{timestep_groups: 1}}' to export.")
        if m.qdq_exportable():
            names.append(name)
    if not names:
        return model, 0
    lowered = copy.deepcopy(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = lowered.get_submodule(parent) if parent else lowered
        setattr(owner, attr, QDQLinear(getattr(owner, attr), act_dtype))
    return lowered, len(names)


def qdq_translations() -> dict:
    """torch -> onnxscript translations of the quantized_decomposed ops QDQLinear emits."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from onnxscript.function_libs.torch_lib.ops import quantized_decomposed as qd

    ops = torch.ops.quantized_decomposed
    return {ops.quantize_per_tensor.default: qd.quantized_decomposed_quantize_per_tensor,
            ops.dequantize_per_tensor.default: qd.quantized_decomposed_dequantize_per_tensor,
            ops.dequantize_per_channel.default: qd.quantized_decomposed_dequantize_per_channel}
