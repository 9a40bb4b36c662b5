"""ONNX export: validated against PyTorch, every family, quantized models, atomic failure, ORT runner."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")

from compress import apply_recipe, load_model  # noqa: E402
from compress.diffusion.sampling import make_noise, sample  # noqa: E402
from compress.errors import DitCompressError  # noqa: E402
from compress.metrics import psnr  # noqa: E402
from compress.models.adapters import get_adapter  # noqa: E402
from compress.recipe import parse_recipe  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.runtime import OnnxRunner  # noqa: E402
from tests.tiny_models import tiny_diffusers_model  # noqa: E402


def test_reference_exports_and_samples_like_pytorch(tmp_path):
    m = load_model("reference")
    d = export_onnx(m, tmp_path / "onnx")
    meta = json.loads((d / "export.json").read_text())
    assert meta["inputs"] == ["latent", "timestep", "y"] and meta["opset"] >= 18
    assert meta["validation"]["passed"] and meta["validation"]["max_rel_err"] < 1e-4
    assert len(meta["validation"]["cases"]) == 6  # 3 timesteps x cond / uncond
    runner = OnnxRunner(d)
    ad = get_adapter(m)
    y = torch.arange(10)
    noise = make_noise(10, ad.latent_shape, 0)
    a = sample(ad, {"y": y}, noise, steps=10, cfg_scale=1.5).samples
    b = sample(ad, {"y": y}, noise, steps=10, cfg_scale=1.5, denoiser=runner).samples  # batch 20 (dynamic)
    assert psnr(b, a) > 40


@pytest.mark.parametrize("family", ["diffusers-dit", "pixart", "sd3", "flux"])
def test_diffusers_families_export(family, tmp_path):
    d = export_onnx(tiny_diffusers_model(family), tmp_path / family)
    meta = json.loads((d / "export.json").read_text())
    assert meta["validation"]["passed"], meta["validation"]


def test_quantized_model_exports_within_fake_quant_tolerance(tiny_native, tmp_path):
    r = parse_recipe({"name": "q", "description": "q", "defaults": {"calibration": {"samples": 4, "steps": 4}},
                      "passes": [{"pass": "quantize", "activations": {}, "smoothing": {}}]})
    q = apply_recipe(tiny_native, r, show_progress=False)
    meta = json.loads((export_onnx(q, tmp_path / "q") / "export.json").read_text())
    assert meta["validation"]["precision"] == "fake-quant" and meta["validation"]["passed"]


def test_mismatching_export_fails_with_report_and_leaves_nothing(tmp_path):
    with pytest.raises(DitCompressError, match=r"failed validation.*t=50 cond: max abs") as e:
        export_onnx(load_model("reference"), tmp_path / "bad", tolerance=1e-12)  # forced: nothing is that exact
    assert "Nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
