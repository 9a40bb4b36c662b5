"""Quantized linear layers whose stored form is the compact one (int8 / packed int4 + scales).

``WeightOnlyLinear`` keeps integer weights and dequantizes them on the fly: the artifact is small and
the arithmetic is exactly "dequantize, then fp32 matmul", which is also what a QDQ ONNX graph says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.nn import replayable


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric uses [-(2^(b-1)-1), 2^(b-1)-1]; asymmetric [0, 2^b - 1]."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """Per-output-channel (group_size None) or group-wise round-to-nearest quantization.

    Returns (q int8 in the integer range, scale (out, groups), zero (out, groups) or None).
    """
    out_f, in_f = w.shape
    g = group_size or in_f
    if in_f % g:
        raise ValueError(f"in_features {in_f} is not divisible by group size {g}")
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        scale = wg.abs().amax(-1).clamp_min(1e-12) / hi
        q = torch.clamp(torch.round(wg / scale[..., None]), lo, hi)
        zero = None
    else:
        wmin, wmax = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((wmax - wmin) / (hi - lo)).clamp_min(1e-12)
        zero = torch.clamp(torch.round(-wmin / scale), lo, hi)
        q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], lo, hi)
    return q.reshape(out_f, in_f).to(torch.int8 if symmetric else torch.uint8), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte (low nibble first); q holds values in [-8, 15] as int8/uint8."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor, signed: bool) -> torch.Tensor:
    lo, hi = (p & 0xF).to(torch.int16), (p >> 4).to(torch.int16)
    q = torch.stack([lo, hi], -1).reshape(p.shape[0], -1)
    return torch.where(q > 7, q - 16, q) if signed else q


class WeightOnlyLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored as int8 or packed int4 and fp32 scales (per channel or group)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8,
                 group_size: int | None = None, symmetric: bool = True):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = in_features // (group_size or in_features)
        qdtype = torch.int8 if symmetric else torch.uint8
        cols = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if bits == 4 else qdtype))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int = 8, group_size: int | None = None,
                    symmetric: bool = True) -> "WeightOnlyLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, group_size, symmetric)
        q, scale, zero = quantize_weight(lin.weight, bits, group_size, symmetric)
        m.qweight.copy_(pack_int4(q) if bits == 4 else q)
        m.scale.copy_(scale)
        if zero is not None:
            m.zero.copy_(zero.to(torch.uint8))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m.to(lin.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_int4(self.qweight, self.symmetric) if self.bits == 4 else self.qweight
        g = self.group_size or self.in_features
        qg = q.float().reshape(self.out_features, -1, g)
        if self.zero is not None:
            qg = qg - self.zero.float()[..., None]
        return (qg * self.scale[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


replayable(
    "weight_only_linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
               "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric},
    lambda s: WeightOnlyLinear(**s),
)(WeightOnlyLinear)
