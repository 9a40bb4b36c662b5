"""Quantized linear layers whose stored form is the compact one (int8 / packed int4 + scales).

``WeightOnlyLinear`` keeps integer weights and dequantizes them on the fly: the artifact is small and
the arithmetic is exactly "dequantize, then fp32 matmul", which is also what a QDQ ONNX graph says.
"""

from __future__ import annotations

import bisect
import contextlib
import platform

import torch
import torch.nn.functional as F
from torch import nn

from compress.nn.registry import replayable
from compress.nn.timestep import current_first_timestep


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
    """Inverse of ``pack_int4`` (int32 arithmetic only, so an exported graph runs on ONNX Runtime)."""
    lo, hi = (p & 0xF).to(torch.int32), (p >> 4).to(torch.int32)
    q = torch.stack([lo, hi], -1).reshape(p.shape[0], -1)
    return q - 16 * (q > 7).to(torch.int32) if signed else q


class _DerivedCache(dict):
    """Per-layer cache of ``reused`` values. Copies and pickles of a layer start empty (they recompute on first
    use): the values derive from the layer's own tensors, and some (oneDNN's packed weights) are opaque tensors
    that can be neither deep-copied nor serialised."""

    def __deepcopy__(self, memo):
        return _DerivedCache()

    def __reduce__(self):
        return _DerivedCache, ()


def eager_inference(x: torch.Tensor) -> bool:
    """True in plain eager inference on ``x``: no autograd, no tracing, export or compile (whose tensors are not
    plain tensors). Where inference-only shortcuts (caches, chunked kernels) may run; kept to a few attribute
    reads, as it runs per layer per call."""
    return not (torch.is_grad_enabled() or type(x) is not torch.Tensor or torch.jit.is_tracing()
                or torch.compiler.is_compiling())


def reused(layer: nn.Module, name: str, make, *stored: torch.Tensor | None):
    """``make()``, computed once per version of the ``stored`` tensors it derives from, then reused.

    For what a quantized layer derives from its compact tensors: the dequantized weight (PyTorch has no CPU
    kernel that beats an fp32 matmul on it at DiT widths: ``_weight_int8pack_mm`` is ~86x slower at the
    reference's shapes, so dequantizing on every call only adds time; reusing it keeps the same values, with
    an fp32 weight's memory while the artifact stays compact) and the integer matmul's packed weight.
    Outside ``eager_inference`` (autograd, tracing, export, compile) it is recomputed, so graphs keep the
    compact tensors. Called per layer per call: at the reference model's widths a microsecond here is a percent
    of the model's time.
    """
    first = stored[0]
    if not eager_inference(first):
        return make()
    key = (first.data_ptr(), *[t._version for t in stored if t is not None])  # a moved / new tensor: new key
    cache = layer.__dict__.get("_reused")
    if cache is None:
        cache = layer.__dict__["_reused"] = _DerivedCache()
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, make())
    return hit[1]


class WeightOnlyLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W stored as int8 or packed int4 and fp32 scales (per channel or group).

    On CPU the matmul is fp32 on the dequantized weight, dequantized once (``reused``).
    """

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
        bufs = self._buffers  # read from the dicts: see QuantLinear.forward
        w = reused(self, "weight", self.dequantized_weight, bufs["qweight"], bufs["scale"], bufs["zero"])
        b = self._parameters.get("bias")
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


replayable(
    "weight_only_linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
               "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric},
    lambda s: WeightOnlyLinear(**s),
)(WeightOnlyLinear)


# ---- weight + activation quantization (W8A8 INT8, FP8 E4M3, W4A8, low-rank outlier branch) ----------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
INT8_MAX = 127.0


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 round-to-nearest with saturation, returned dequantized (x ~ q * scale)."""
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 with saturation (the cast rounds to nearest even, as QuantizeLinear and TensorRT do). In eager
    float32 inference the same values come from ``round_to_e4m3_`` (CPU's float8-to-float cast is a scalar loop);
    graphs (autograd, export, compile) see the cast."""
    if x.dtype == torch.float32 and not x.is_cuda and eager_inference(x):
        return round_to_e4m3_(x / scale).mul_(scale)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


ACT_FORMATS = {"int8": (fake_quant_int8, INT8_MAX), "fp8": (fake_quant_fp8, FP8_MAX)}

_E4M3_MIN_NORMAL = (127 - 6) << 23  # float32 exponent field of 2^-6, E4M3's smallest normal value
_E4M3_ROUNDER = (20 << 23) | (1 << 22)  # added to an exponent field 2^e: the float 1.5 * 2^(e+20)


def round_to_e4m3_(y: torch.Tensor, out: torch.Tensor | None = None, saturate: bool = True) -> torch.Tensor:
    """``y`` (float32) rounded in place to the nearest FP8 E4M3 value, ties to even, saturating at +-448: the
    values of ``y.clamp(-448, 448).to(torch.float8_e4m3fn).float()`` (checked on every E4M3 value, midpoint
    and its neighbours), without that cast, whose float8-to-float half is a scalar loop on CPU (366 us against
    75 us at 256x384, one thread). Adding and subtracting 1.5 * 2^(e+20), where 2^e is y's binade (or E4M3's
    smallest normal, 2^-6, below it), leaves y rounded by the FPU at E4M3's spacing there, 2^(e-3). ``out``
    (e.g. a bfloat16 tensor, in which E4M3 values are exact) receives the result instead of ``y``.
    ``saturate=False`` skips the clamp, for callers whose values are already within +-464 (which round to 448
    at most)."""
    if saturate:
        y = y.clamp_(-FP8_MAX, FP8_MAX)
    rounder = (y.view(torch.int32).bitwise_and(0x7F800000).clamp_(min=_E4M3_MIN_NORMAL)
               .add_(_E4M3_ROUNDER).view(torch.float32))
    return torch.sub(y.add_(rounder), rounder, out=y if out is None else out)


def _onednn_int8() -> bool:
    """oneDNN's fused INT8 linear (x86 builds of torch): integer GEMM, per-channel rescale and bias in one op."""
    ops = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qlinear_pointwise")
            and hasattr(ops, "qlinear_prepack"))


def _x86_dot_isa() -> dict[str, bool] | None:
    """This CPU's int8 / bf16 dot-product extensions as torch reports them, {"vnni": ..., "amx": ...,
    "avx512_bf16": ...}; None off x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    probes = {"vnni": "_is_vnni_supported", "amx": "_is_amx_tile_supported",
              "avx512_bf16": "_is_avx512_bf16_supported"}
    return {k: bool(getattr(torch.cpu, f, None) is not None and getattr(torch.cpu, f)()) for k, f in probes.items()}


def _cpu_has_int8_dot() -> bool:
    """True where this CPU has int8 dot-product instructions that accumulate in int32: x86 with VNNI
    (AVX512-VNNI, AVX-VNNI) or AMX, and non-x86 builds (not measured here). x86 CPUs without them (AVX2 only:
    AMD Zen 3, pre-Cascade-Lake Xeons) change two things, both measured on a Zen 3 EPYC with torch 2.13:
    ``torch._int_mm`` is a scalar loop there, ~30x slower than an fp32 matmul (9.1 ms against 0.28 ms at
    256x96x384), and oneDNN's AVX2 INT8 kernels sum pairs of u8 x s8 products in int16 (``vpmaddubsw``), which
    saturates with 8-bit weights (relative error 0.23 against the exact sum) and is exact only with 7-bit ones
    (``reduce_range``: 2 x 255 x 63 < 2^15), the reason ONNX Runtime and fbgemm reduce the range on such CPUs."""
    isa = _x86_dot_isa()
    return isa is None or isa["vnni"] or isa["amx"]


def _cpu_has_bf16_dot() -> bool:
    """True on x86 CPUs with bfloat16 dot products (AVX512-BF16 or AMX): there oneDNN's bf16 matmul (fp32
    accumulation) is ~2x faster than fp32 (measured on a Zen 4 EPYC: 126 against 235 us at 256x96x384), and
    FP8 x FP8 layers run on it (E4M3 values are exact in bf16). Elsewhere bf16 is converted or emulated, slower
    than fp32, and FP8 stays on the fake-quant arithmetic."""
    isa = _x86_dot_isa()
    return isa is not None and (isa["avx512_bf16"] or isa["amx"])


def _onednn_wants_u8_source() -> bool:
    """True on x86 CPUs with VNNI but without AMX (measured on AMD Zen 4; by oneDNN PR #5111, where AVX-512 has
    no s8s8 matmul, also Intel's pre-AMX VNNI CPUs, not measured here): oneDNN's optimised INT8 matmul there
    (``brg_matmul:avx512_core_vnni``) takes unsigned sources only; a signed int8 source falls back to its
    reference loop (``ref_int8:any``), measured on a Zen 4 EPYC with torch 2.13 at 16.7 s against fp32's
    15 ms for 512x768x3072. The same integers shifted to uint8
    with zero point 128 run the VNNI kernel, exactly (``vpdpbusd`` accumulates in int32): 9.6 ms against fp32's
    35 ms at 1024x768x3072 there. AMX runs s8s8 itself; AVX2-only CPUs keep their measured s8 path."""
    isa = _x86_dot_isa()
    return isa is not None and isa["vnni"] and not isa["amx"]


INT8_CPU_BACKEND = "onednn" if _onednn_int8() else "int_mm"  # what CPU INT8 x INT8 layers call (tests pin it)
CPU_INT8_DOT = _cpu_has_int8_dot()  # False: CPU integer kernels only for 7-bit weights, always through oneDNN
ONEDNN_U8_SOURCE = _onednn_wants_u8_source()  # True: oneDNN gets the int8 rows as uint8, zero point 128
CPU_BF16_DOT = _cpu_has_bf16_dot()  # True: CPU FP8 x FP8 layers multiply their E4M3 values in a bf16 matmul
# oneDNN's call has a fixed cost of ~30 us (descriptors, scales, primitive lookup): below this many multiply-adds
# per call ``torch._int_mm`` + one scale op is as fast or faster where the CPU has VNNI (measured: parity at
# 256x96x384, the reference model's MLP; 3-6x faster than ``_int_mm`` at DiT-B/2's 1024x768x3072 with AMX).
# Without VNNI ``_int_mm`` is a scalar loop and every CPU call goes to oneDNN.
ONEDNN_MIN_MACS = 1 << 24 if CPU_INT8_DOT else 0
_ONE, _ZERO = torch.ones(()), torch.zeros((), dtype=torch.int64)  # oneDNN's unit input scale, zero point
_U8_ZERO = torch.full((), 128, dtype=torch.int64)  # the zero point of int8 rows shifted to uint8


def int8_linear(layer: "QuantLinear", xq: torch.Tensor, x_scale: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``(xq @ qweight^T) * x_scale * weight_scale + bias`` in fp32 from int8 rows ``xq`` (M, K), the sum exact
    in int32. ``x_scale`` is the static per-tensor scale, or None (the caller applies per-token scales).

    On x86 CPUs oneDNN's ``qlinear_pointwise`` does the integer GEMM, the rescale and the bias in one call on
    a weight packed once (at DiT-B/2's widths 3x faster than ``torch._int_mm`` followed by an int32-to-float copy
    and a scale op, which cost more than a small matmul saves). Elsewhere (CUDA, other CPUs, and CPU calls
    under ``ONEDNN_MIN_MACS``) ``torch._int_mm`` then one scale op."""
    qweight, sw = layer.int8_weight()
    if (not xq.is_cuda and INT8_CPU_BACKEND == "onednn"
            and xq.shape[0] * xq.shape[1] * qweight.shape[0] >= ONEDNN_MIN_MACS):
        packed, zeros = reused(layer, "onednn_w", lambda: (torch.ops.onednn.qlinear_prepack(qweight, None),
                                                            torch.zeros(qweight.shape[0], dtype=torch.int64)), qweight)
        zero = _ZERO
        if ONEDNN_U8_SOURCE:  # x + 128 as uint8 is x's bit pattern with the sign bit flipped: one cheap op
            xq, zero = torch.bitwise_xor(xq.view(torch.uint8), 128), _U8_ZERO
        return torch.ops.onednn.qlinear_pointwise.tensor(xq, _ONE if x_scale is None else x_scale, zero, packed,
                                                         sw, zeros, bias, 1.0, 0, torch.float32, "none", [], "")
    wt = reused(layer, "int8_wt", lambda: qweight.t().contiguous(), qweight)
    acc = torch._int_mm(xq, wt).float()
    scale = sw if x_scale is None else x_scale.reshape(1, 1) * sw
    return acc.mul_(scale) if bias is None else torch.addcmul(bias, acc, scale)


class QuantLinear(nn.Module):
    """A Linear with quantized weights and (optionally) quantized inputs, stored in compact form.

        y = Q_a(x / s) @ Q_w(W * s - L_up @ L_down)^T + (x / s) @ L_down^T @ L_up^T + b

    * weights: ``int8`` / ``int4`` (symmetric, per output channel or per group; int4 packed two per byte)
      or ``fp8`` (E4M3 stored as float8, per-tensor or per-channel scale);
    * inputs: ``int8`` / ``fp8``, ``static`` (calibrated per-tensor scale, optionally one per group of
      timesteps, chosen by the step being run) or ``dynamic`` (per-token absmax), or None (weight-only);
    * ``smooth`` (SmoothQuant): per-input-channel divisor migrating activation outliers into the weights;
    * ``rank`` > 0 (SVDQuant): a full-precision low-rank branch of the smoothed weight absorbs the
      outliers, and only the residual is quantized.

    INT8 x INT8 layers with per-channel weights, and INT4 x INT8 ones with ``integer_group_scales`` (exact int8
    per-channel weights: ``quantize_int4_two_level``), run an integer matmul (``int8_linear``: oneDNN or
    ``torch._int_mm`` on x86 CPUs, cuBLASLt on CUDA), exact in int32 and scaled once; FP8 x FP8 uses
    ``torch._scaled_mm`` on CUDA and a bf16 matmul of E4M3 values on CPUs with bf16 dot products
    (``_fp8_matmul_in_bf16``). On x86 CPUs without VNNI only 7-bit (``reduce_range``) weights take the integer
    path (oneDNN's AVX2 kernels saturate on 8-bit ones: ``_cpu_has_int8_dot``). Everything else (float group
    scales, FP8 on other CPUs) is fake-quant in fp32: the same values a QDQ graph computes, and the reference
    the kernels are tested against. ``kernel = "reference"`` forces the fake-quant arithmetic
    (``fake_quant_arithmetic``); it is also what tracing for export and torch.compile see.
    """

    kernel: str = "auto"  # "auto": integer / FP8 kernels where they exist; "reference": fake-quant only

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_format: str = "int8",
                 group_size: int | None = None, weight_per_channel: bool = True, act_format: str | None = "int8",
                 act_mode: str = "static", act_groups: int = 1, smooth: bool = False, rank: int = 0,
                 reduce_range: bool = False, integer_group_scales: bool = False):
        super().__init__()
        if integer_group_scales and (weight_format != "int4" or not group_size):
            raise ValueError("integer_group_scales: only group-wise int4 weights have group scales")
        if weight_format not in ("int8", "int4", "fp8"):
            raise ValueError(f"weight_format must be int8, int4 or fp8, not {weight_format!r}")
        if act_format not in (None, "int8", "fp8") or act_mode not in ("static", "dynamic"):
            raise ValueError(f"bad activation format {act_format!r}/{act_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_format, self.group_size, self.weight_per_channel = weight_format, group_size, weight_per_channel
        self.act_format, self.act_mode, self.act_groups = act_format, act_mode, act_groups
        self.rank, self.reduce_range = rank, reduce_range  # reduce_range: int8 weights limited to 7 bits
        self.integer_group_scales = integer_group_scales  # int4 groups = int8 per-channel weights (see _set_weight)
        g = group_size or in_features
        if in_features % g:
            raise ValueError(f"in_features {in_features} is not divisible by group size {g}")
        cols = in_features // 2 if weight_format == "int4" else in_features
        wdtype = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[weight_format]
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=wdtype))
        self.register_buffer("weight_scale", torch.ones(out_features if weight_per_channel else 1,
                                                        1 if integer_group_scales else in_features // g))
        self.register_buffer("group_scale", torch.ones(out_features, in_features // g, dtype=torch.uint8)
                             if integer_group_scales else None)
        self.register_buffer("smooth", torch.ones(in_features) if smooth else None)
        static = act_format is not None and act_mode == "static"
        self.register_buffer("act_scale", torch.ones(act_groups) if static else None)
        self.register_buffer("act_edges", torch.zeros(act_groups - 1) if static and act_groups > 1 else None)
        # the low-rank branch is kept in 16-bit, as SVDQuant does: high precision for a few directions, half the bytes
        self.register_buffer("lora_down", torch.zeros(rank, in_features, dtype=torch.float16) if rank else None)
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=torch.float16) if rank else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, lin: nn.Linear, *, smooth: torch.Tensor | None = None, act_scale: torch.Tensor | None = None,
                    act_edges: torch.Tensor | None = None, **fmt) -> "QuantLinear":
        """Quantize ``lin``; ``smooth`` (in,) and the static ``act_scale`` (groups,) come from calibration."""
        act_groups = 1 if act_scale is None else act_scale.numel()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, smooth=smooth is not None,
                act_groups=act_groups, **fmt)
        w = lin.weight.detach().float()
        if smooth is not None:
            m.smooth.copy_(smooth)
            w = w * smooth[None, :]
        if m.rank:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = m.rank
            m.lora_up.copy_(u[:, :r] * s[:r].sqrt())
            m.lora_down.copy_(s[:r].sqrt()[:, None] * vh[:r])  # balanced factors: both fit fp16 comfortably
            w = w - m.lora_up.float() @ m.lora_down.float()
        m._set_weight(w)
        if m.act_scale is not None:
            if act_scale is None:
                raise ValueError("static activation quantization needs a calibrated act_scale")
            m.act_scale.copy_(act_scale.reshape(-1).clamp_min(1e-8))
            if m.act_edges is not None:
                m.act_edges.copy_(act_edges)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m.to(lin.weight.device)

    def _set_weight(self, w: torch.Tensor) -> None:
        if self.weight_format == "fp8":
            amax = w.abs().amax(1, keepdim=True) if self.weight_per_channel else w.abs().amax().reshape(1, 1)
            scale = amax.clamp_min(1e-12) / FP8_MAX
            self.qweight.copy_((w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
            self.weight_scale.copy_(scale)
            return
        if self.integer_group_scales:
            q, channel, group = quantize_int4_two_level(w, self.group_size)
            self.qweight.copy_(pack_int4(q))
            self.weight_scale.copy_(channel)
            self.group_scale.copy_(group)
            return
        bits = (7 if self.reduce_range else 8) if self.weight_format == "int8" else 4
        q, scale, _ = quantize_weight(w, bits, self.group_size, True)
        self.qweight.copy_(pack_int4(q) if bits == 4 else q)
        self.weight_scale.copy_(scale)

    # -- arithmetic -----------------------------------------------------------------------------------
    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight (out, in), fp32 per-channel scale (out,)) of a layer whose weight is an int8 per-channel
        one (``int8`` weights, or ``int4`` with integer group scales: the 4-bit values times their group's
        integer scale, derived once): what integer matmuls and QDQ exports take."""
        bufs = self._buffers
        if not self.integer_group_scales:
            return bufs["qweight"], bufs["weight_scale"].reshape(-1)
        return reused(self, "int8_weight", self._int8_from_int4_groups, bufs["qweight"], bufs["group_scale"]), \
            bufs["weight_scale"].reshape(-1)

    def _int8_from_int4_groups(self) -> torch.Tensor:
        q = unpack_int4(self._buffers["qweight"], True).reshape(self.out_features, -1, self.group_size)
        return (q * self._buffers["group_scale"].to(torch.int32)[..., None]).reshape(
            self.out_features, self.in_features).to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        """The quantized residual weight in fp32 (what the integer/FP8 matmul multiplies by)."""
        if self.integer_group_scales:  # the int8 weight times its channel's scale, as the integer matmul sees it
            w8, scale = self.int8_weight()
            return w8.float() * scale[:, None]
        if self.weight_format == "int4":
            q = unpack_int4(self.qweight, True)
        else:
            q = self.qweight
        g = self.group_size or self.in_features
        qg = q.float().reshape(self.out_features, -1, g)
        return (qg * self.weight_scale[..., None]).reshape(self.out_features, self.in_features)

    def current_act_scale(self) -> torch.Tensor:
        """Static scale for the running timestep's group (the widest group's when the step is unknown), (1,)."""
        if self._buffers["act_edges"] is None:
            return self._buffers["act_scale"]
        t = current_first_timestep()
        scales = self._buffers["act_scale"]
        if t is None:
            return scales.max().reshape(1)
        # the call's first timestep is read once per call, the edges once per version: at the reference model's
        # widths a bucketize and two device copies per layer cost 5% of the call
        edges = self._buffers["act_edges"]
        group = bisect.bisect_left(reused(self, "act_edges", edges.tolist, edges), t)  # torch.bucketize's rule
        return scales[group:group + 1]

    def quantize_input(self, xs: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize the (smoothed) input; ``act_scale`` overrides the static scale (calibration search)."""
        if self.act_format is None:
            return xs
        fq, qmax = ACT_FORMATS[self.act_format]
        if self.act_mode == "dynamic":
            scale = xs.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
        else:
            scale = self.current_act_scale() if act_scale is None else act_scale
        return fq(xs, scale)

    def forward(self, x: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        # buffers are read from the module's dicts here and in the kernel path: nn.Module.__getattr__ costs
        # ~1.5 us a read, which at the reference model's widths (16 tokens, 96 channels) is a tenth of a matmul
        smooth = self._buffers["smooth"]
        kernel = act_scale is None and self._kernel_ok(x)
        if kernel and self.act_format == "fp8" and not x.is_cuda:
            y = self._fp8_matmul_in_bf16(x, smooth)  # folds the smoothing in itself
            if not self.rank:
                return y
            xs = x / smooth if smooth is not None else x
        else:
            xs = x / smooth if smooth is not None else x
            if kernel:
                y = self._low_precision_matmul(xs)
            else:
                bufs = self._buffers
                w = reused(self, "weight", self.dequantized_weight, bufs["qweight"], bufs["weight_scale"],
                           bufs["group_scale"])
                b = self._parameters.get("bias")
                y = F.linear(self.quantize_input(xs, act_scale), w.to(x.dtype), None if b is None else b.to(x.dtype))
        if self.rank:
            y = self._add_low_rank_branch(y, xs)
        return y

    def _add_low_rank_branch(self, y: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """``y + (xs @ L_down^T) @ L_up^T``: the 16-bit branch in ``xs``'s dtype (fp16 values are exact in fp32).
        In eager inference the factors are converted and transposed once and the up-projection accumulates into
        ``y`` (``addmm_``: no temporary, no separate add); the branch costs a fifth to a third of an fp32 matmul
        of the layer, more than anything else the quantized layer adds at the reference model's widths."""
        down, up = self._buffers["lora_down"], self._buffers["lora_up"]
        if not eager_inference(xs):
            return y.add_(F.linear(F.linear(xs, down.to(xs.dtype)), up.to(xs.dtype)))
        dtype = xs.dtype
        down_t, up_t = reused(self, f"low_rank_{dtype}", lambda: (down.t().to(dtype).contiguous(),
                                                                   up.t().to(dtype).contiguous()), down, up)
        y.view(-1, self.out_features).addmm_(torch.mm(xs.reshape(-1, self.in_features), down_t), up_t)
        return y

    def qdq_exportable(self) -> bool:
        """Static per-tensor int8 inputs and per-channel int8 weights: the form ONNX QDQ kernels run."""
        return (self.act_format == "int8" and self.act_mode == "static" and self.act_groups == 1
                and self.has_int8_weight())

    def has_int8_weight(self) -> bool:
        """Whether the weight is an int8 per-channel one (``int8_weight``): int8 weights without groups, or int4
        groups with integer group scales."""
        return (self.weight_format == "int8" and self.group_size is None) or self.integer_group_scales

    # -- real low-precision matmuls ------------------------------------------------------------------
    def _kernel_ok(self, x: torch.Tensor) -> bool:
        if self.kernel != "auto" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        if not ((self.act_format == "int8" and self.has_int8_weight())
                or (self.act_format == "fp8" and self.weight_format == "fp8" and self.group_size is None)):
            return False
        if x.is_cuda:  # cuBLASLt's shape constraints
            return self.in_features % 16 == 0 and self.out_features % 16 == 0 and x.numel() // x.shape[-1] > 16
        if self.act_format == "fp8":
            return x.dtype == torch.float32 and CPU_BF16_DOT
        # without VNNI the CPU's integer kernels are exact only on 7-bit weights (see _cpu_has_int8_dot): 8-bit
        # ones stay on the fake-quant arithmetic, slower but the values the layer stands for
        return x.dtype == torch.float32 and (CPU_INT8_DOT or (self.reduce_range and INT8_CPU_BACKEND == "onednn"))

    def _low_precision_matmul(self, xs: torch.Tensor) -> torch.Tensor:
        """The integer (or FP8) matmul on the smoothed input ``xs``, scaled once, the bias added in the same op.
        The integer path quantizes with the fake-quant path's own division and rounding (in
        place, on one copy of the input), then ``int8_linear``."""
        lead, k = xs.shape[:-1], xs.shape[-1]
        x2 = xs.reshape(-1, k).float()
        qmax = ACT_FORMATS[self.act_format][1]
        if self.act_mode == "dynamic":
            sa = x2.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
        else:
            sa = self.current_act_scale()
        bias = self._parameters.get("bias")
        if self.act_format == "int8":
            xq = torch.div(x2, sa).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            bias = None if bias is None else bias.float()
            if self.act_mode == "static":
                y = int8_linear(self, xq, sa, bias)
            else:  # the per-token scales after the per-channel ones
                y = int8_linear(self, xq, None, None)
                y = y.mul_(sa) if bias is None else torch.addcmul(bias, y, sa)
        else:
            sa = sa.reshape(-1, 1).expand(x2.shape[0], 1)
            xq = (x2 / sa).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            sw = self.weight_scale.reshape(1, -1).float()
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=sa.contiguous(),
                                 scale_b=sw.contiguous(), out_dtype=torch.bfloat16).float()
            if bias is not None:
                y = y + bias.float()
        return y.reshape(*lead, self.out_features).to(xs.dtype)

    def _fp8_matmul_in_bf16(self, x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
        """FP8 x FP8 on a CPU with bf16 dot products (``CPU_BF16_DOT``): the input rounded to E4M3 values
        (``round_to_e4m3_``) and the E4M3 weight, both exact in bf16, go through oneDNN's bf16 matmul (exact
        products, fp32 sums), whose bf16 output is scaled once, as ``torch._scaled_mm(out_dtype=bfloat16)`` on
        CUDA: within the output's bf16 rounding (2^-9 relative) of the fake-quant arithmetic. A static scale and
        the smoothing divisor are applied as one multiplier (the fake-quant path divides twice; the two differ by
        an ulp before rounding, so an input within an ulp of an E4M3 midpoint may round the other way)."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        bufs = self._buffers
        sw = bufs["weight_scale"].reshape(1, -1)
        saturate = True
        if self.act_mode == "dynamic":
            xs = x2 / smooth if smooth is not None else x2
            sa = xs.abs().amax(-1, keepdim=True).clamp_min(1e-8) / FP8_MAX
            y8 = xs.div_(sa) if smooth is not None else xs / sa
            saturate = False  # each row's absmax maps to 448 (up to an ulp, which rounds to 448)
            out_scale = sw
            if sw.numel() == 1:  # one weight scale: folded into the per-token ones, one output op fewer
                sa, out_scale = sa * sw, None
        else:
            sa = self.current_act_scale()
            # at the reference model's widths each op here is a few percent of the layer: with one static scale
            # (no timestep groups) the scalings derived from it are reused
            one = self.act_groups == 1
            if smooth is None:
                y8 = x2 / sa
            else:
                in_scale = lambda: (sa * smooth).reciprocal()  # noqa: E731
                y8 = x2 * (reused(self, "fp8_in", in_scale, bufs["act_scale"], smooth) if one else in_scale())
            out_scale = reused(self, "fp8_out", lambda: sw * sa, bufs["act_scale"], sw) if one else sw * sa
        xb = round_to_e4m3_(y8, out=torch.empty(y8.shape, dtype=torch.bfloat16), saturate=saturate)
        qweight = bufs["qweight"]
        y = F.linear(xb, reused(self, "bf16_w", lambda: qweight.to(torch.bfloat16), qweight)).float()
        bias = self._parameters.get("bias")
        # per-channel x static scales, or per-channel then per-token ones (fp32 ops: mixed-dtype ones cast first)
        if out_scale is not None:
            y = y.mul_(out_scale) if bias is None or self.act_mode == "dynamic" else torch.addcmul(bias, y, out_scale)
        if self.act_mode == "dynamic":
            y = y.mul_(sa) if bias is None else torch.addcmul(bias, y, sa)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = "weight-only" if self.act_format is None else f"act={self.act_format}/{self.act_mode}" + (
            f"x{self.act_groups} timestep groups" if self.act_groups > 1 else "")
        return (f"{self.in_features}, {self.out_features}, weight={self.weight_format}"
                f"{'/g' + str(self.group_size) if self.group_size else ''}, {a}, smooth={self.smooth is not None}, "
                f"rank={self.rank}")


@contextlib.contextmanager
def fake_quant_arithmetic(model: nn.Module):
    """Inside, every ``QuantLinear`` of ``model`` computes the fake-quant arithmetic (``kernel = "reference"``):
    the values an exported QDQ graph stands for, which export validation compares against (the CPU FP8 kernel's
    bf16 output is 2^-9 off it; integer kernels are exact). Each layer's own setting is restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [m.__dict__.get("kernel") for m in layers]
    try:
        for m in layers:
            m.kernel = "reference"
        yield model
    finally:
        for m, k in zip(layers, saved):
            if k is None:
                m.__dict__.pop("kernel", None)
            else:
                m.kernel = k


def under_fake_quant_arithmetic(model: nn.Module, fn):
    """``fn`` (e.g. an adapter's forward) run inside ``fake_quant_arithmetic(model)`` at each call."""
    def call(*args, **kwargs):
        with fake_quant_arithmetic(model):
            return fn(*args, **kwargs)
    return call


INT4_GROUP_SCALE_MAX = 18  # 7 x 18 = 126: every int4 value times its integer group scale fits int8


def quantize_int4_two_level(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise symmetric INT4 whose group scales are integers (1..18) times one fp32 scale per output channel
    (QServe's progressive group quantization, Lin et al. 2024): w ~ channel * group * q. Each int4 value times its
    group's integer scale is an int8 (|q x group| <= 126), so the layer is exactly an int8 per-channel weight
    and W4A8 runs the W8A8 integer kernels. The largest group of a channel gets scale 18; every other group the
    integer just below or above its ideal scale, whichever gives the smaller squared error.

    Returns (q int8 in [-7, 7] (out, in), channel scale (out, 1), group scale uint8 (out, groups)).
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not divisible by group size {group_size}")
    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    ideal = wg.abs().amax(-1).clamp_min(1e-12) / 7  # each group's own fp32 scale
    channel = ideal.amax(-1, keepdim=True) / INT4_GROUP_SCALE_MAX
    best_q, best_s, best_err = None, None, None
    for rnd in (torch.floor, torch.ceil):
        sg = rnd(ideal / channel).clamp_(1, INT4_GROUP_SCALE_MAX)
        step = (channel * sg)[..., None]
        q = torch.clamp(torch.round(wg / step), -7, 7)
        err = ((q * step - wg) ** 2).sum(-1)
        if best_err is None:
            best_q, best_s, best_err = q, sg, err
        else:
            better = err < best_err
            best_q = torch.where(better[..., None], q, best_q)
            best_s, best_err = torch.where(better, sg, best_s), torch.minimum(err, best_err)
    return best_q.reshape(out_f, in_f).to(torch.int8), channel, best_s.to(torch.uint8)


replayable(
    "quant_linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
               "weight_format": m.weight_format, "group_size": m.group_size,
               "weight_per_channel": m.weight_per_channel, "act_format": m.act_format, "act_mode": m.act_mode,
               "act_groups": m.act_groups, "smooth": m.smooth is not None, "rank": m.rank,
               "reduce_range": m.reduce_range, "integer_group_scales": m.integer_group_scales},
    lambda s: QuantLinear(**s),
)(QuantLinear)
