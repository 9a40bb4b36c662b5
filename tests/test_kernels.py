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


def counted_int8_calls(monkeypatch, backend: str) -> list:
    """Pin the CPU integer backend (oneDNN at every size) and record the shape of every integer matmul's input
    rows, and "_int_mm" for every call of torch's integer matmul (which the oneDNN backend must not make)."""
    calls = []
    real, real_mm = quant.int8_linear, torch._int_mm
    monkeypatch.setattr(quant, "INT8_CPU_BACKEND", backend)
    monkeypatch.setattr(quant, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(quant, "int8_linear", lambda layer, xq, *a: calls.append(xq.shape) or real(layer, xq, *a))
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append("_int_mm") or real_mm(a, b))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("extras", [{}, {"reduce_range": True}, {"smooth": True, "rank": 4}, {"bias": False}])
def test_integer_kernel_equals_the_fake_quant_arithmetic(mode, extras, backend, monkeypatch):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_w8a8_model_runs_integer_matmuls_in_every_quantized_layer(backend, monkeypatch):
    m = compress.apply_recipe(randomized_dit(), "w8a8-int8", show_progress=False)
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
