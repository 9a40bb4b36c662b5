"""Export forms of quantized layers: explicit quantize / dequantize ops that ONNX lowers to QDQ.

``lower_for_export(model)`` returns a copy of ``model`` in which every QDQ-exportable ``QuantLinear``
(static per-tensor INT8 inputs, per-channel INT8 weights) is replaced by a ``QDQLinear`` with the same
tensors, and every ``QuantAttention`` kernel by a ``QDQAttention`` (both batched matmuls' inputs
quantized). The exporter traces that copy; the model the user holds is never modified. Other quantized
layers export as their exact fake-quant float arithmetic.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import DitCompressError
from compress.nn.attention import AttentionKernel, QuantAttention, attention_8bit
from compress.nn.quant import CPU_INT8_DOT, INT8_MAX, QuantLinear


def _int8_grid(dtype: str) -> tuple[int, int, int, torch.dtype]:
    """(zero point, low, high, dtype) of the symmetric int8 grid, for activations or weights: uint8 with zero
    point 128 (ONNX Runtime's x86 kernels) or int8 with zero point 0 (TensorRT, OpenVINO)."""
    return (128, 0, 255, torch.uint8) if dtype == "uint8" else (0, -128, 127, torch.int8)


def qdq_symmetric(x: torch.Tensor, s: float, act_dtype: str) -> torch.Tensor:
    """x on the +-127-step grid of scale ``s`` as QuantizeLinear -> DequantizeLinear."""
    qd = torch.ops.quantized_decomposed
    zp, lo, hi, dt = _int8_grid(act_dtype)
    xq = qd.quantize_per_tensor.default(x.clamp(-INT8_MAX * s, INT8_MAX * s), s, zp, lo, hi, dt)
    return qd.dequantize_per_tensor.default(xq, s, zp, lo, hi, dt)


class QDQLinear(nn.Module):
    """A ``QuantLinear`` written as quantize -> dequantize -> matmul, the pattern QDQ runtimes fuse.

    Inputs are clamped to +-127 steps, then go out as uint8 with zero point 128 (the U8S8 form ONNX
    Runtime's x86 integer kernels prefer) or as int8 with zero point 0 (what TensorRT requires): both
    exactly the symmetric int8 grid of the fake-quant path. Weights go out as int8, or (``weight_dtype``
    "uint8") as the same integers shifted by 128 with zero point 128: ONNX Runtime then runs its U8U8 kernels,
    exact on x86 CPUs without VNNI, where its U8S8 ones sum pairs of products in int16 and saturate on 8-bit
    weights (measured on a Zen 3: relative error 0.03-0.12 on tiny W8A8 models, against 0.007 with U8U8). The
    activation scale is frozen as a Python float so the exporter writes it as a constant.
    """

    def __init__(self, layer: QuantLinear, act_dtype: str, weight_dtype: str = "int8"):
        super().__init__()
        if not layer.qdq_exportable():
            raise ValueError("only static per-tensor INT8 x per-channel INT8 layers have a QDQ form")
        self.layer = layer
        self.scale = float(layer.act_scale[0])
        self.act_dtype, self.weight_dtype = act_dtype, weight_dtype
        # the int8 weight (int4 groups with integer group scales go out as theirs), or it shifted to uint8, stored
        # so the graph's initializer is the tensor itself (no shift op at run time); None: the layer's own qweight
        qweight, _ = layer.int8_weight()
        self.register_buffer("qweight", (qweight.to(torch.int16) + 128).to(torch.uint8) if weight_dtype == "uint8"
                             else qweight.clone() if layer.integer_group_scales else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

        m = self.layer
        qd = torch.ops.quantized_decomposed
        xs = x / m.smooth if m.smooth is not None else x
        xd = qdq_symmetric(xs, self.scale, self.act_dtype)
        zp, lo, hi, dt = _int8_grid(self.weight_dtype)
        zeros = torch.full((m.out_features,), zp, dtype=torch.int64, device=xs.device)
        qweight = self.qweight if self.qweight is not None else m.qweight
        w = qd.dequantize_per_channel.default(qweight, m.weight_scale[:, 0], zeros, 0, lo, hi, dt)
        y = F.linear(xd, w.to(xs.dtype))
        if m.rank:
            y = y + F.linear(F.linear(xs, m.lora_down.to(x.dtype)), m.lora_up.to(x.dtype))
        return y if m.bias is None else y + m.bias.to(y.dtype)


class QDQAttention(AttentionKernel):
    """A ``QuantAttention`` written with explicit quantize / dequantize ops on both matmuls' inputs.

    q, k, v go out on the symmetric int8 grid (as ``QDQLinear`` inputs), the probabilities as uint8 with zero
    point 0; scales are frozen as Python floats so the exporter writes constants.
    """

    def __init__(self, kernel: QuantAttention, act_dtype: str):
        super().__init__(kernel.heads, kernel.head_dim, kernel.grid, kernel.image)
        self.s = {r: float(t) for r, t in kernel.scales().items()}
        self.act_dtype = act_dtype

    def attend(self, q, k, v, scale):
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

        qd, s = torch.ops.quantized_decomposed, self.s

        def quant_prob(p: torch.Tensor) -> torch.Tensor:
            pq = qd.quantize_per_tensor.default(p, s["p"], 0, 0, 255, torch.uint8)
            return qd.dequantize_per_tensor.default(pq, s["p"], 0, 0, 255, torch.uint8)

        return attention_8bit(q, k, v, scale, lambda x, r: qdq_symmetric(x, s[r], self.act_dtype), quant_prob)


def qdq_weight_dtype(layer: QuantLinear, act_dtype: str, weight_dtype: str) -> str:
    """``weight_dtype`` resolved for one layer: "auto" is uint8 only where ONNX Runtime's U8S8 kernels would
    saturate: uint8 activations, 8-bit weights, and a host CPU without VNNI (the validation runs here)."""
    if weight_dtype != "auto":
        return weight_dtype
    return "uint8" if act_dtype == "uint8" and not layer.reduce_range and not CPU_INT8_DOT else "int8"


def lower_for_export(model: nn.Module, act_dtype: str = "uint8", weight_dtype: str = "auto") -> tuple[nn.Module, int]:
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
    names += [name for name, m in model.named_modules() if isinstance(m, QuantAttention)]
    if not names:
        return model, 0
    lowered = copy.deepcopy(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = lowered.get_submodule(parent) if parent else lowered
        layer = getattr(owner, attr)
        setattr(owner, attr, QDQAttention(layer, act_dtype) if isinstance(layer, QuantAttention)
                else QDQLinear(layer, act_dtype, qdq_weight_dtype(layer, act_dtype, weight_dtype)))
    return lowered, len(names)


def weight_forms(lowered: nn.Module) -> str:
    """How the QDQ Linear weights of a lowered model go out, e.g. '16 int8' or '12 uint8, 4 int8' (for logs)."""
    counts: dict[str, int] = {}
    for m in lowered.modules():
        if isinstance(m, QDQLinear):
            counts[m.weight_dtype] = counts.get(m.weight_dtype, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def qdq_translations() -> dict:
    """torch -> onnxscript translations of the quantized_decomposed ops QDQLinear emits."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from onnxscript.function_libs.torch_lib.ops import quantized_decomposed as qd

    ops = torch.ops.quantized_decomposed
    return {ops.quantize_per_tensor.default: qd.quantized_decomposed_quantize_per_tensor,
            ops.dequantize_per_tensor.default: qd.quantized_decomposed_dequantize_per_tensor,
            ops.dequantize_per_channel.default: qd.quantized_decomposed_dequantize_per_channel}
