"""Attention kernels: what a model computes between its q/k/v projections and its output projection.

A kernel is a drop-in replacement for ``F.scaled_dot_product_attention(q, k, v)`` on (batch, heads,
tokens, head_dim) tensors. The projections stay where they are (and keep the source's weights), so a
kernel swap changes only how attention mixes tokens. The adapter installs kernels
(``ModelAdapter.set_attention_kernel``): the native DiT calls its ``Attention.kernel``; diffusers
families keep their own attention processor, whose softmax attention call is routed to the kernel
(``routed_attention``), so projections, QK norms, RoPE and stream concatenation are untouched.

- ``QuantAttention``: softmax attention whose two batched matmuls (q k^T and p v) take 8-bit inputs, the
  form CPU INT8 runtimes (OpenVINO, ONNX Runtime) execute as integer matmuls when the exported graph
  quantizes both operands (``exporters.qdq``).

Kernels know where the image tokens sit in the sequence (``image``: all of it; first, as SD3 concatenates
[image | text]; last, as Flux concatenates [text | image]) and on which grid (the one the adapter
recorded when the kernel was installed, or the running call's, ``current_grid``), for kernels that work
on the 2-D token layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from compress.nn.quant import INT8_MAX, fake_quant_int8
from compress.nn.registry import replayable
from compress.nn.timestep import current_grid

LAYOUTS = ("all", "first", "last")
_MAX = 1 << 16  # bound on heads, head_dim and grid sides read from an (untrusted) artifact spec
UINT8_MAX = 255.0


def _check_int(name: str, value, lo: int, hi: int = _MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class AttentionKernel(nn.Module):
    """Base of the kernels: the head layout, where the image tokens are, and the SDPA-compatible call."""

    def __init__(self, heads: int, head_dim: int, grid: tuple[int, int] | list[int], image: str = "all"):
        super().__init__()
        self.heads, self.head_dim = _check_int("heads", heads, 1), _check_int("head_dim", head_dim, 1)
        if len(grid) != 2:
            raise ValueError(f"grid must be (rows, columns), got {grid!r}")
        self.grid = (_check_int("grid rows", grid[0], 1), _check_int("grid columns", grid[1], 1))
        if image not in LAYOUTS:
            raise ValueError(f"image must be one of {', '.join(LAYOUTS)}, got {image!r}")
        self.image = image

    def image_tokens(self, length: int) -> tuple[int, int, int]:
        """(start, rows, columns) of the image-token grid in a sequence of ``length`` tokens."""
        rows, cols = current_grid() or self.grid
        n = rows * cols
        if n > length or (self.image == "all" and n != length):
            raise ValueError(f"{type(self).__name__}: a {rows}x{cols} token grid does not fit a sequence of {length} "
                             f"tokens (image tokens: {self.image})")
        return (length - n if self.image == "last" else 0), rows, cols

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        """``F.scaled_dot_product_attention``'s signature; masks, dropout and causality are refused."""
        if attn_mask is not None or is_causal or dropout_p or enable_gqa:
            raise ValueError(f"{type(self).__name__} replaces unmasked, non-causal attention only (got a mask, "
                             f"dropout, causality or grouped-query heads)")
        if query.shape[1] != self.heads or query.shape[-1] != self.head_dim:
            raise ValueError(f"{type(self).__name__} was built for {self.heads} heads of {self.head_dim}, got q of "
                             f"shape {tuple(query.shape)}")
        return self.attend(query, key, value, scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        raise NotImplementedError  # every registered kernel defines it

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, grid={self.grid}, image={self.image}"


def fake_quant_uint8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Unsigned 8-bit, zero point 0, with saturation (for non-negative tensors: softmax probabilities)."""
    return torch.clamp(torch.round(x / scale), 0.0, UINT8_MAX) * scale


def attention_8bit(q, k, v, scale: float | None, quant_sym, quant_prob) -> torch.Tensor:
    """``QuantAttention``'s arithmetic with its quantizers given: ``quant_sym(x, role)`` for q, k, v (roles "q",
    "k", "v") and ``quant_prob(p)`` for the softmax probabilities. Fake quantization in PyTorch, QuantizeLinear /
    DequantizeLinear ops when exported (``exporters.qdq.QDQAttention``): one computation for both."""
    dtype = v.dtype
    qq, kq, vq = (quant_sym(x.float(), r) for x, r in ((q, "q"), (k, "k"), (v, "v")))
    logits = (qq @ kq.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    return (quant_prob(logits.softmax(-1)) @ vq).to(dtype)


class QuantAttention(AttentionKernel):
    """Softmax attention with 8-bit inputs to both batched matmuls:

        out = Q_u8(softmax(Q_i8(q) Q_i8(k)^T * scale)) Q_i8(v)

    q, k and v are symmetric INT8 with static per-tensor scales, the softmax probabilities unsigned 8-bit
    (zero point 0: they lie in [0, 1]) with a static scale; all four come from calibration on the
    source's trajectories (``compress.passes.quantize``). Softmax and the scaling stay in float, as in
    NNCF's and TensorRT's INT8 attention. In PyTorch this is fake quantization (PyTorch has no CPU batched
    INT8 matmul); exported as QDQ (``exporters.qdq``) the runtimes execute both matmuls in integers.
    """

    ROLES = ("q", "k", "v", "p")

    def __init__(self, heads: int, head_dim: int, grid, image: str = "all"):
        super().__init__(heads, head_dim, grid, image)
        for role in self.ROLES:
            self.register_buffer(f"{role}_scale", torch.ones(()))

    def scales(self) -> dict[str, torch.Tensor]:
        return {r: getattr(self, f"{r}_scale") for r in self.ROLES}

    def attend(self, q, k, v, scale, scales: dict[str, torch.Tensor] | None = None):
        """``scales`` overrides the stored ones (the calibration's clipping search)."""
        s = scales or self.scales()
        return attention_8bit(q, k, v, scale, lambda x, r: fake_quant_int8(x, s[r]),
                              lambda p: fake_quant_uint8(p, s["p"]))

    def set_scales(self, amax: dict[str, float]) -> None:
        """Scales from calibrated ranges: |q|, |k|, |v| maxima onto +-127, the probabilities' maximum onto 255."""
        for r in self.ROLES:
            getattr(self, f"{r}_scale").fill_(max(float(amax[r]), 1e-8) / (UINT8_MAX if r == "p" else INT8_MAX))


replayable(
    "quant_attention",
    lambda m: {"heads": m.heads, "head_dim": m.head_dim, "grid": list(m.grid), "image": m.image},
    lambda s: QuantAttention(**s),
)(QuantAttention)


class _Route(TorchFunctionMode):
    """Calls ``kernel`` wherever ``F.scaled_dot_product_attention`` is called (the mode is off inside it)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel, self.calls = kernel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.kernel(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def routed_attention(kernel: nn.Module, where: str) -> Iterator[None]:
    """Inside the block, softmax attention calls run ``kernel``; exactly one call must happen (``where`` names
    the attention for the error when an attention backend other than torch's SDPA computed it instead)."""
    with _Route(kernel) as route:
        yield
    if route.calls != 1:
        raise RuntimeError(f"{where}: its attention processor made {route.calls} scaled_dot_product_attention calls; "
                           f"a replaced attention kernel needs exactly one (is another attention backend active?)")
