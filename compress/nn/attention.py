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
- ``LinearAttention`` (SANA / LiT's ReLU kernel, or Katharopoulos et al.'s ELU+1):
  ``phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j))``, O(L d^2) instead of O(L^2 d), plus LiT's depthwise
  convolution of the values over the 2-D image-token grid (zero-initialised, so the kernel starts as
  plain linear attention). It exports as MatMul / Relu (or Elu) / ReduceSum / Conv: no L x L matrix.
- ``WindowAttention`` (CLEAR's local attention, with a square window): softmax attention of every image
  token over its ``window x window`` neighbourhood, computed tile by tile, O(L window^2 d).

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

from compress.nn.quant import INT8_MAX, eager_inference, fake_quant_int8
from compress.nn.registry import replayable
from compress.nn.timestep import current_grid

FEATURES = ("relu", "elu")
LAYOUTS = ("all", "first", "last")
_EPS = 1e-6  # added to the linear-attention normaliser (0 only where every feature of a query is 0)
_MAX = 1 << 16  # bound on heads, head_dim, grid sides and window read from an (untrusted) artifact spec
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
                enable_gqa: bool = False, *, query_is_scratch: bool = False) -> torch.Tensor:
        """``F.scaled_dot_product_attention``'s signature; masks, dropout and causality are refused.

        ``query_is_scratch``: the caller never reads ``query`` again (a model forward whose query is a temporary of
        its projection), so a kernel may write its output into the query's buffer (``attend_into_query``)."""
        if attn_mask is not None or is_causal or dropout_p or enable_gqa:
            raise ValueError(f"{type(self).__name__} replaces unmasked, non-causal attention only (got a mask, "
                             f"dropout, causality or grouped-query heads)")
        if query.shape[1] != self.heads or query.shape[-1] != self.head_dim:
            raise ValueError(f"{type(self).__name__} was built for {self.heads} heads of {self.head_dim}, got q of "
                             f"shape {tuple(query.shape)}")
        if query_is_scratch:
            return self.attend_into_query(query, key, value, scale)
        return self.attend(query, key, value, scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        raise NotImplementedError  # every registered kernel defines it

    def attend_into_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """``attend`` where ``q``'s buffer may hold the output; softmax kernels read every query row until the end,
        so by default they allocate their output as ``attend`` does."""
        return self.attend(q, k, v, scale)

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


INFERENCE_CHUNK = 512  # tokens per chunk of LinearAttention at inference (longer sequences are chunked)


class LinearAttention(AttentionKernel):
    """ReLU (SANA, LiT) or ELU+1 linear attention, with LiT's depthwise convolution on the values.

    ``conv`` is the odd kernel size of the depthwise convolution over the image-token grid (0: none); its
    output is added to the attention output of the image tokens. It starts at zero, so the kernel begins
    exactly as linear attention on the source's projections. Computed in float32 whatever the model's
    dtype (the normaliser is a sum over every token).
    """

    def __init__(self, heads: int, head_dim: int, grid, image: str = "all", feature: str = "relu", conv: int = 3):
        super().__init__(heads, head_dim, grid, image)
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
        _check_int("conv", conv, 0, 31)
        if conv and conv % 2 == 0:
            raise ValueError(f"conv must be odd (a centred kernel) or 0, got {conv}")
        self.feature, self.conv = feature, conv
        channels = heads * head_dim
        self.dwc = nn.Conv2d(channels, channels, conv, padding=conv // 2, groups=channels, bias=False) if conv else None
        if self.dwc is not None:
            nn.init.zeros_(self.dwc.weight)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.feature == "relu" else F.elu(x) + 1

    @staticmethod
    def chunked(q: torch.Tensor) -> bool:
        """Whether this call runs chunk by chunk: long sequences in eager inference (autograd, tracing and export
        see the whole-sequence form, one graph)."""
        return q.shape[2] > INFERENCE_CHUNK and eager_inference(q)

    def attend(self, q, k, v, scale):
        if self.chunked(q):
            return self.attend_in_chunks(q, k, v)
        dtype = v.dtype
        v = v.float()
        fk = self.phi(k.float())
        kv = fk.transpose(-2, -1) @ v  # (B, H, d, d): the only token sum, linear in L
        z = fk.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, H, d, 1)
        del fk  # token-sized temporaries are freed as soon as they are used (peak memory at long sequences)
        fq = self.phi(q.float())
        out = (fq @ kv) / (fq @ z + _EPS)
        del fq
        if self.dwc is not None:
            out = out + self.conv_values(v)
        return out.to(dtype)

    def attend_into_query(self, q, k, v, scale):
        """At inference on long sequences, the chunked kernel with its output written over ``q`` (each chunk of
        queries is read before its rows are written, and nothing else reads q): no token-sized tensor is allocated
        at all, and a processor's ``out.transpose(1, 2).reshape(b, n, h * d)`` is then a view of the projection's
        buffer, not a copy. Only for a float32 ``q`` that shares no memory with ``k`` or ``v`` (torch's overlap
        test is by storage range, so a fused qkv's slices, as in the native DiT, allocate their output)."""
        if self.chunked(q) and q.dtype == torch.float32 and not (torch._C._overlaps(q, k) or torch._C._overlaps(q, v)):
            return self.attend_in_chunks(q, k, v, out=q)
        return self.attend(q, k, v, scale)

    def attend_in_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """``attend`` for inference at long sequences, ``INFERENCE_CHUNK`` tokens at a time: the same sums (the
        token sum of ``phi(k)^T v`` accumulated chunk by chunk), with only the output as a token-sized tensor.

        The whole-sequence form holds phi(q), phi(q) kv, the output and the convolution's input and output
        at once (4 x 75 MB for PixArt-XL/2 at 16k tokens); here the output is written in place, chunk by chunk,
        and the depthwise convolution runs on bands of grid rows with their halo. ``out``: a float32 tensor of
        q's shape to write into (``q`` itself from ``attend_into_query``), else one is allocated."""
        dtype, (b, h, length, d) = v.dtype, q.shape
        kv = q.new_zeros(b, h, d, d, dtype=torch.float32)
        z = q.new_zeros(b, h, 1, d, dtype=torch.float32)
        for s in range(0, length, INFERENCE_CHUNK):
            fk = self.phi(k[:, :, s:s + INFERENCE_CHUNK].float())
            kv.add_(fk.transpose(-2, -1) @ v[:, :, s:s + INFERENCE_CHUNK].float())
            z.add_(fk.sum(dim=-2, keepdim=True))
        z = z.transpose(-2, -1)
        out = q.new_empty(b, h, length, d, dtype=torch.float32) if out is None else out
        for s in range(0, length, INFERENCE_CHUNK):
            fq = self.phi(q[:, :, s:s + INFERENCE_CHUNK].float())
            torch.div(fq @ kv, fq @ z + _EPS, out=out[:, :, s:s + INFERENCE_CHUNK])
        if self.dwc is not None:
            start, rows, cols = self.image_tokens(length)
            band = max(1, INFERENCE_CHUNK // cols)
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                out[:, :, start + r0 * cols:start + r1 * cols].add_(self.conv_rows(v, start, rows, cols, r0, r1))
        return out.to(dtype)

    def conv_rows(self, v: torch.Tensor, start: int, rows: int, cols: int, r0: int, r1: int) -> torch.Tensor:
        """The depthwise convolution's output for grid rows ``r0`` .. ``r1`` of the image tokens (which start at
        token ``start`` of ``v``), as (b, h, (r1 - r0) * cols, d): it reads those rows and up to ``conv // 2``
        rows either side, zeros past the grid's edges (the whole grid is the band 0 .. rows).

        The grid is taken token-major, (b, rows, cols, h * d) seen as channels-last NCHW: a view of the values'
        projection when ``v`` is its head view (as model forwards pass it), and the convolution's output comes
        back in the same layout, so adding it to an output in the projection's layout is one strided pass
        (measured on PixArt-XL/2 at 16k tokens: 25 ms per call against 270 ms through channel-major copies)."""
        b, h, _, d = v.shape
        r = self.conv // 2
        lo, hi = max(0, r0 - r), min(rows, r1 + r)  # the band with its halo, inside the grid
        tokens = v[:, :, start + lo * cols:start + hi * cols].transpose(1, 2)  # (b, band tokens, h, d)
        grid = tokens.reshape(b, hi - lo, cols, h * d).permute(0, 3, 1, 2).to(self.dwc.weight.dtype)
        if r0 - lo < r or hi - r1 < r:  # the band touches the grid's top or bottom edge: zero rows past it
            grid = F.pad(grid, (0, 0, r - (r0 - lo), r - (hi - r1)))
        conv = F.conv2d(grid, self.dwc.weight, padding=(0, r), groups=h * d).to(v.dtype)
        return conv.permute(0, 2, 3, 1).reshape(b, (r1 - r0) * cols, h, d).transpose(1, 2)

    def conv_values(self, v: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution of the image tokens' values on their grid; zeros at other tokens."""
        b, h, length, d = v.shape
        start, rows, cols = self.image_tokens(length)
        out = self.conv_rows(v, start, rows, cols, 0, rows)
        if rows * cols == length:
            return out
        before, after = v.new_zeros(b, h, start, d), v.new_zeros(b, h, length - start - rows * cols, d)
        return torch.cat([before, out, after], dim=2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature={self.feature}, conv={self.conv}"


class WindowAttention(AttentionKernel):
    """Softmax attention of each image token over the ``window x window`` tokens around it (CLEAR, square).

    The grid is cut into ``window x window`` tiles; a tile's queries attend to the tile and a halo of
    ``window // 2`` tokens around it (one SDPA call over every tile at once) under a fixed mask that keeps
    each query's own window and drops tokens outside the grid. Every query keeps at least itself.
    Image-only sequences (``image: all``): which text tokens a local window should see is not defined.
    """

    def __init__(self, heads: int, head_dim: int, grid, image: str = "all", window: int = 7):
        super().__init__(heads, head_dim, grid, image)
        _check_int("window", window, 1)
        if window % 2 == 0:
            raise ValueError(f"window must be odd (centred on its query), got {window}")
        if image != "all":
            raise ValueError("window attention needs an image-only sequence (image: all)")
        if window > min(self.grid):
            raise ValueError(f"window {window} is larger than the {self.grid[0]}x{self.grid[1]} token grid")
        self.window = window
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask(self, rows: int, cols: int) -> torch.Tensor:
        """(tiles, window^2, (window + 2r)^2) booleans: which halo tokens each query of a tile may attend to."""
        if (rows, cols) not in self._masks:
            t, r = self.window, self.window // 2
            span = t + 2 * r
            nh, nw = math.ceil(rows / t), math.ceil(cols / t)
            ty, tx = torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij")
            a = torch.arange(t)
            c = torch.arange(span)
            qy = ty.reshape(-1, 1, 1) * t + a.repeat_interleave(t).reshape(1, -1, 1)  # (tiles, t*t, 1)
            qx = tx.reshape(-1, 1, 1) * t + a.repeat(t).reshape(1, -1, 1)
            ky = ty.reshape(-1, 1, 1) * t - r + c.repeat_interleave(span).reshape(1, 1, -1)  # (tiles, 1, span^2)
            kx = tx.reshape(-1, 1, 1) * t - r + c.repeat(span).reshape(1, 1, -1)
            near = ((ky - qy).abs() <= r) & ((kx - qx).abs() <= r)
            inside = (ky >= 0) & (ky < rows) & (kx >= 0) & (kx < cols)
            padded_query = (qy >= rows) | (qx >= cols)  # cropped away later; any finite row will do
            self._masks[(rows, cols)] = (near & inside) | padded_query
        return self._masks[(rows, cols)]

    def attend(self, q, k, v, scale):
        b, h, length, d = q.shape
        _, rows, cols = self.image_tokens(length)
        t, r = self.window, self.window // 2
        nh, nw = math.ceil(rows / t), math.ceil(cols / t)
        pad_h, pad_w = nh * t - rows, nw * t - cols

        def grid(x: torch.Tensor, halo: int) -> torch.Tensor:
            x = x.reshape(b, h, rows, cols, d)
            return F.pad(x, (0, 0, halo, pad_w + halo, halo, pad_h + halo))

        qt = grid(q, 0).reshape(b, h, nh, t, nw, t, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, nh * nw, t * t, d)

        def halo_tiles(x: torch.Tensor) -> torch.Tensor:
            span = t + 2 * r
            x = grid(x, r).unfold(2, span, t).unfold(3, span, t)  # (b, h, nh, nw, d, span, span)
            return x.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, h, nh * nw, span * span, d)

        out = F.scaled_dot_product_attention(qt, halo_tiles(k), halo_tiles(v), attn_mask=self.mask(rows, cols).to(
            q.device), scale=scale)
        out = out.reshape(b, h, nh, nw, t, t, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, nh * t, nw * t, d)
        return out[:, :, :rows, :cols].reshape(b, h, rows * cols, d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


replayable(
    "linear_attention",
    lambda m: {"heads": m.heads, "head_dim": m.head_dim, "grid": list(m.grid), "image": m.image,
               "feature": m.feature, "conv": m.conv},
    lambda s: LinearAttention(**s),
)(LinearAttention)
replayable(
    "window_attention",
    lambda m: {"heads": m.heads, "head_dim": m.head_dim, "grid": list(m.grid), "image": m.image, "window": m.window},
    lambda s: WindowAttention(**s),
)(WindowAttention)


class _Route(TorchFunctionMode):
    """Calls ``kernel`` wherever ``F.scaled_dot_product_attention`` is called (the mode is off inside it)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel, self.calls = kernel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # a processor's query is a temporary it never reads again
            self.calls += 1
            return self.kernel(*args, **kwargs, query_is_scratch=True)
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
