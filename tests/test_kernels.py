"""Integer kernels: W8A8 layers run a real int8 matmul in PyTorch, with exactly the fake-quant arithmetic's values."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.nn.quant import QuantLinear
from tests.conftest import randomized_dit


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("extras", [{}, {"reduce_range": True}, {"smooth": True, "rank": 4}])
def test_integer_kernel_equals_the_fake_quant_arithmetic(mode, extras, monkeypatch):
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 288)
    x = torch.randn(3, 16, 96) * 2
    smooth = torch.rand(96) + 0.5 if extras.get("smooth") else None
    scale = ((x / (smooth if smooth is not None else 1)).abs().amax() / 127).reshape(1) if mode == "static" else None
    q = QuantLinear.from_linear(lin, smooth=smooth, act_scale=scale, weight_format="int8", act_format="int8",
                                act_mode=mode, rank=extras.get("rank", 0), reduce_range=extras.get("reduce_range", False))
    with torch.no_grad():
        y = q(x)
        q.kernel = "reference"
        ref = q(x)
    assert calls == [torch.Size([48, 96])]  # the integer kernel ran, once, on all 48 rows
    assert (y - ref).abs().max() / ref.abs().max() < 2e-6  # measured ~8e-7: one fp32 rounding of an exact sum


def test_a_w8a8_model_runs_integer_matmuls_in_every_quantized_layer(monkeypatch):
    m = compress.apply_recipe(randomized_dit(), "w8a8-int8", show_progress=False)
    n_layers = sum(isinstance(mod, QuantLinear) for mod in m.modules())
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    adapter = compress.get_adapter(m)
    with torch.no_grad():
        adapter.forward(torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), {"y": torch.tensor([1, 2])})
    assert n_layers == 16 and len(calls) == n_layers  # 4 blocks x qkv, proj, fc1, fc2
