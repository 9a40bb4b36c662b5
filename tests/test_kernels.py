"""Integer kernels: W8A8 layers run a real int8 matmul in PyTorch, with exactly the fake-quant arithmetic's values."""

from __future__ import annotations

import pytest
import torch

import compress
import compress.nn.quant as quant
from compress.nn.quant import QuantLinear
from tests.conftest import randomized_dit

BACKENDS = ["int_mm", pytest.param("onednn", marks=pytest.mark.skipif(
    not quant._onednn_int8(), reason="this torch build has no oneDNN qlinear ops (non-x86)"))]


def exact_here(backend: str, reduce_range: bool = False) -> bool:
    """Whether ``backend``'s CPU kernel computes the exact integer sum on this CPU: torch._int_mm always (a scalar
    loop without VNNI), oneDNN with VNNI/AMX, or without them on 7-bit weights only (AVX2 int16 pair sums)."""
    return backend == "int_mm" or quant.CPU_INT8_DOT or reduce_range


def counted_int8_calls(monkeypatch, backend: str) -> list:
    """Pin the CPU integer backend (oneDNN at every size) and record the shape of every integer matmul's input
    rows, and "_int_mm" for every call of torch's integer matmul (which the oneDNN backend must not make). A
    backend that is exact on this CPU is also allowed for 8-bit weights (CPU_INT8_DOT), as on a VNNI CPU."""
    calls = []
    real, real_mm = quant.int8_linear, torch._int_mm
    monkeypatch.setattr(quant, "INT8_CPU_BACKEND", backend)
    monkeypatch.setattr(quant, "CPU_INT8_DOT", exact_here(backend))
    monkeypatch.setattr(quant, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(quant, "int8_linear", lambda layer, xq, *a: calls.append(xq.shape) or real(layer, xq, *a))
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append("_int_mm") or real_mm(a, b))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("extras", [{}, {"reduce_range": True}, {"smooth": True, "rank": 4}, {"bias": False}])
def test_integer_kernel_equals_the_fake_quant_arithmetic(mode, extras, backend, monkeypatch):
    if not exact_here(backend, extras.get("reduce_range", False)):
        pytest.skip("this CPU has no VNNI: oneDNN's AVX2 kernels saturate on 8-bit weights, so those layers stay on "
                    "the fake-quant arithmetic (test_a_cpu_without_vnni_...)")
    calls = counted_int8_calls(monkeypatch, backend)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 288, bias=extras.get("bias", True))
    x = torch.randn(3, 16, 96) * 2
    smooth = torch.rand(96) + 0.5 if extras.get("smooth") else None
    scale = ((x / (smooth if smooth is not None else 1)).abs().amax() / 127).reshape(1) if mode == "static" else None
    q = QuantLinear.from_linear(lin, smooth=smooth, act_scale=scale, weight_format="int8", act_format="int8",
                                act_mode=mode, rank=extras.get("rank", 0), reduce_range=extras.get("reduce_range", False))
    with torch.no_grad():
        y = q(x)
        q.kernel = "reference"
        ref = q(x)
    # the integer kernel ran, once, on all 48 rows
    assert calls == [torch.Size([48, 96])] + (["_int_mm"] if backend == "int_mm" else [])
    assert (y - ref).abs().max() / ref.abs().max() < 2e-6  # measured ~8e-7: one fp32 rounding of an exact sum


W4A8_G16 = {"name": "w4a8-g16", "description": "w4a8 at the test model's width (48: groups of 16)", "passes": [
    {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 16, "group_scales": "integer"},
     "activations": {"dtype": "int8"}, "smoothing": {}}]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["w8a8-int8", W4A8_G16], ids=["w8a8-int8", "w4a8"])
def test_a_w8a8_or_w4a8_model_runs_integer_matmuls_in_every_quantized_layer(recipe, backend, monkeypatch):
    if not exact_here(backend):
        pytest.skip("this CPU has no VNNI: 8-bit weights stay on the fake-quant arithmetic here")
    m = compress.apply_recipe(randomized_dit(), recipe, show_progress=False)
    n_layers = sum(isinstance(mod, QuantLinear) for mod in m.modules())
    calls = counted_int8_calls(monkeypatch, backend)
    adapter = compress.get_adapter(m)
    with torch.no_grad():
        adapter.forward(torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), {"y": torch.tensor([1, 2])})
    rows = [c for c in calls if c != "_int_mm"]
    assert n_layers == 16 and len(rows) == n_layers  # 4 blocks x qkv, proj, fc1, fc2
    assert calls.count("_int_mm") == (n_layers if backend == "int_mm" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_quantized_layer_that_ran_deep_copies_and_pickles_to_the_same_outputs(backend, monkeypatch):
    import copy
    import io

    counted_int8_calls(monkeypatch, backend)  # its caches hold oneDNN's opaque packed weight on that backend
    torch.manual_seed(0)
    x = torch.randn(32, 96)
    q = QuantLinear.from_linear(torch.nn.Linear(96, 64), act_scale=(x.abs().amax() / 127).reshape(1),
                                weight_format="int8", act_format="int8", act_mode="static")
    with torch.no_grad():
        y = q(x)
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        for other in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
            assert torch.equal(other(x), y)


def pretend_cpu(monkeypatch, arch: str, vnni: bool, amx: bool) -> None:
    """Make torch report another CPU: its architecture and whether it has VNNI and AMX."""
    monkeypatch.setattr(quant.platform, "machine", lambda: arch)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("arch, vnni, amx, vectorised", [("x86_64", False, False, False), ("x86_64", True, False, True),
                                                         ("x86_64", False, True, True), ("aarch64", False, False, True)])
def test_only_x86_cpus_without_vnni_or_amx_count_as_lacking_int8_dot_products(arch, vnni, amx, vectorised, monkeypatch):
    # there torch._int_mm is a scalar loop and oneDNN's AVX2 kernels saturate on 8-bit weights
    pretend_cpu(monkeypatch, arch, vnni, amx)
    assert quant._cpu_has_int8_dot() is vectorised


@pytest.mark.skipif(not quant._onednn_int8(), reason="this torch build has no oneDNN qlinear ops (non-x86)")
def test_a_cpu_without_vnni_runs_only_7_bit_weights_on_integer_kernels_and_keeps_every_output_exact(monkeypatch):
    calls = counted_int8_calls(monkeypatch, "onednn")
    monkeypatch.setattr(quant, "CPU_INT8_DOT", False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), {"y": torch.tensor([1, 2])}
    for recipe, integer_layers in (("w8a8-int8", 0), ("w8a8-int8-ort-cpu", 16)):
        m = compress.apply_recipe(randomized_dit(), recipe, show_progress=False)
        adapter = compress.get_adapter(m)
        calls.clear()
        with torch.no_grad():
            out = adapter.forward(x, t, y)
            assert len(calls) == integer_layers and "_int_mm" not in calls
            for mod in m.modules():
                if isinstance(mod, QuantLinear):
                    mod.kernel = "reference"
            ref = adapter.forward(x, t, y)
        # 8-bit weights: the fake-quant path itself; 7-bit: oneDNN's AVX2 sums do not saturate, one fp32 rounding
        assert (out - ref).abs().max() <= (0 if integer_layers == 0 else 2e-6) * ref.abs().max()


@pytest.mark.parametrize("arch, vnni, amx, u8", [("x86_64", True, False, True), ("x86_64", True, True, False),
                                                 ("x86_64", False, True, False), ("x86_64", False, False, False),
                                                 ("aarch64", True, False, False)])
def test_onednn_gets_uint8_rows_only_on_x86_cpus_with_vnni_and_no_amx(arch, vnni, amx, u8, monkeypatch):
    # there oneDNN has no optimised s8 x s8 matmul and runs its reference loop (~1000x slower than fp32)
    pretend_cpu(monkeypatch, arch, vnni, amx)
    assert quant._onednn_wants_u8_source() is u8


@pytest.mark.skipif(not (quant._onednn_int8() and quant.CPU_INT8_DOT),
                    reason="needs oneDNN on a CPU with int8 dot products (VNNI or AMX): AVX2's u8 x s8 pair sums "
                           "saturate on 8-bit weights")
@pytest.mark.parametrize("u8_source", [True, False])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_onednn_rows_as_uint8_with_zero_point_128_give_the_fake_quant_arithmetic(u8_source, mode, monkeypatch):
    """int8 rows handed to oneDNN as uint8 (the sign bit flipped, zero point 128), or as int8: both the exact sum."""
    counted_int8_calls(monkeypatch, "onednn")
    monkeypatch.setattr(quant, "ONEDNN_U8_SOURCE", u8_source)
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 288)
    x = torch.randn(3, 16, 96) * 2
    x[0, 0, :4] = torch.tensor([-50.0, 50.0, -0.01, 0.0])  # rows reaching -127 and +127
    scale = (x.abs().amax() / 127).reshape(1) if mode == "static" else None
    q = QuantLinear.from_linear(lin, act_scale=scale, weight_format="int8", act_format="int8", act_mode=mode)
    with torch.no_grad():
        y = q(x)
        q.kernel = "reference"
        ref = q(x)
    assert (y - ref).abs().max() / ref.abs().max() < 2e-6


def test_round_to_e4m3_gives_the_float8_casts_values_on_every_value_midpoint_and_neighbour():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2  # ties: E4M3 rounds them to the even neighbour
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    torch.manual_seed(0)
    x = torch.cat([values, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), torch.randn(100_000) * 60,
                   torch.randn(100_000) * 0.01, torch.tensor([500.0, -1e6, 449.0, 1e-30, -0.0])])
    expected = x.clamp(-quant.FP8_MAX, quant.FP8_MAX).to(torch.float8_e4m3fn).float()
    assert torch.equal(quant.round_to_e4m3_(x.clone()), expected)
    into = torch.empty(x.shape, dtype=torch.bfloat16)  # E4M3 values are exact in bf16
    quant.round_to_e4m3_(x.clone(), out=into)
    assert torch.equal(into.float(), expected)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("extras", [{}, {"smooth": True}, {"bias": False}, {"weight_per_channel": False},
                                    {"weight_per_channel": False, "bias": False}])
def test_fp8_layer_on_a_bf16_cpu_is_within_the_bf16_outputs_rounding_of_the_fake_quant_arithmetic(mode, extras,
                                                                                                   monkeypatch):
    # bf16 matmuls give the same values on any CPU (slower without AVX512-BF16 / AMX): pin the gate to run it here
    monkeypatch.setattr(quant, "CPU_BF16_DOT", True)
    rounded = []
    real = quant.round_to_e4m3_
    monkeypatch.setattr(quant, "round_to_e4m3_",
                        lambda y, out=None, **kw: rounded.append(None if out is None else out.dtype) or real(y, out, **kw))
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 288, bias=extras.get("bias", True))
    x = torch.randn(3, 16, 96) * 2
    smooth = torch.rand(96) + 0.5 if extras.get("smooth") else None
    xs = x / smooth if smooth is not None else x
    scale = (xs.abs().amax() / quant.FP8_MAX).reshape(1) if mode == "static" else None
    q = QuantLinear.from_linear(lin, smooth=smooth, act_scale=scale, weight_format="fp8", act_format="fp8",
                                act_mode=mode, weight_per_channel=extras.get("weight_per_channel", True))
    with torch.no_grad():
        y = q(x)
        assert rounded == [torch.bfloat16]  # the bf16 path ran, once
        q.kernel = "reference"
        ref = q(x)
    err = (y - ref).abs()
    assert float(err.max()) <= 2 ** -8 * float(ref.abs().max())  # bf16 keeps 8 significant bits
    assert float(err.max()) > 0  # and it is not the fake-quant path itself
    monkeypatch.setattr(quant, "CPU_BF16_DOT", False)  # a CPU without bf16 dot products: the fake-quant path
    q.kernel = "auto"
    with torch.no_grad():
        assert torch.equal(q(x), ref)


def test_int4_groups_with_integer_scales_are_int8_weights_and_run_the_integer_kernel(monkeypatch):
    if not exact_here("int_mm"):
        pytest.skip("unreachable: torch._int_mm is exact everywhere")
    calls = counted_int8_calls(monkeypatch, "int_mm")
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    x = torch.randn(2, 24, 128)
    q = QuantLinear.from_linear(lin, act_scale=(x.abs().amax() / 127).reshape(1), weight_format="int4",
                                group_size=32, act_format="int8", integer_group_scales=True)
    w8, channel = q.int8_weight()
    assert w8.dtype == torch.int8 and int(w8.abs().max()) <= 126 and channel.shape == (64,)
    assert 1 <= int(q.group_scale.min()) and int(q.group_scale.max()) == quant.INT4_GROUP_SCALE_MAX
    assert torch.equal(q.dequantized_weight(), w8.float() * channel[:, None])
    with torch.no_grad():
        y = q(x)
        q.kernel = "reference"
        ref = q(x)
    assert calls == [torch.Size([48, 128]), "_int_mm"]
    assert (y - ref).abs().max() / ref.abs().max() < 2e-6
    # two-level scales cost little weight accuracy against one fp32 scale per group (measured: 0.92x on this layer)
    float_groups = QuantLinear.from_linear(lin, act_scale=q.act_scale, weight_format="int4", group_size=32,
                                           act_format="int8")
    w = lin.weight.detach()
    err = lambda m: float((m.dequantized_weight() - w).pow(2).sum() / w.pow(2).sum())  # noqa: E731
    assert err(q) < 1.1 * err(float_groups)


def test_the_low_rank_branch_gives_the_same_outputs_in_eager_inference_as_under_autograd_and_tracing():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 288)
    x = torch.randn(3, 16, 96)
    q = QuantLinear.from_linear(lin, act_scale=(x.abs().amax() / 127).reshape(1), weight_format="int4", group_size=32,
                                act_format="int8", rank=8, smooth=torch.rand(96) + 0.5)
    q.kernel = "reference"
    with torch.no_grad():
        eager = q(x)  # factors converted and transposed once, the up-projection accumulated in place
        again = q(x)  # the reused factors
    graph = q(x.requires_grad_())  # autograd: the factors recomputed, the branch out of place
    traced = torch.jit.trace(q, x.detach(), check_trace=False)(x.detach())
    assert torch.equal(eager, again)
    assert (graph - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert (traced - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert graph.grad_fn is not None
