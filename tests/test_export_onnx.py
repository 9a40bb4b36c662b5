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
from exporters.onnx import OnnxRunner, export_onnx  # noqa: E402
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
    c = ad.contract().with_overrides(steps=10, guidance_scale=1.5)
    a = sample(ad, {"y": y}, noise, contract=c).samples
    b = sample(runner, {"y": y}, noise, contract=c).samples  # batch 20 (dynamic)
    assert psnr(b, a) > 40


@pytest.mark.parametrize("family", ["diffusers-dit", "pixart", "sd3", "flux"])
def test_diffusers_families_export(family, tmp_path):
    d = export_onnx(tiny_diffusers_model(family), tmp_path / family)
    meta = json.loads((d / "export.json").read_text())
    assert meta["validation"]["passed"], meta["validation"]


def _w8a8(model, **extra):
    r = parse_recipe({"name": "q", "description": "q", "defaults": {"calibration": {"samples": 4, "steps": 4}},
                      "passes": [{"pass": "quantize", "weights": {"dtype": "int8", "reduce_range": True},
                                  "activations": extra, "smoothing": {}}]})
    return apply_recipe(model, r, show_progress=False)


@pytest.mark.parametrize("acts", ["uint8", "int8"])
def test_w8a8_exports_as_qdq_with_integer_weights(tiny_native, tmp_path, acts):
    import onnx

    q = _w8a8(tiny_native)
    d = export_onnx(q, tmp_path / "q", qdq_activations=acts)
    meta = json.loads((d / "export.json").read_text())
    assert meta["validation"]["precision"] == "fake-quant" and meta["validation"]["passed"]
    assert meta["qdq_layers"] == 16 and meta["qdq_activations"] == acts  # 4 blocks x qkv, proj, fc1, fc2
    g = onnx.load(str(d / "model.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") == 16 and ops.count("DequantizeLinear") >= 32
    int8_weights = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) == 16  # the weights stay int8 in the file: DequantizeLinear at run time
    zps = {i.data_type for i in g.initializer if i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
           and len(i.dims) == 0}
    zps |= {a.t.data_type for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
            and a.t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8) and len(a.t.dims) == 0}
    assert (onnx.TensorProto.UINT8 if acts == "uint8" else onnx.TensorProto.INT8) in zps


def test_qdq_export_samples_like_fake_quant_model(tmp_path):
    q = _w8a8(load_model("reference"))
    runner = OnnxRunner(export_onnx(q, tmp_path / "q"))
    ad = get_adapter(q)
    y = torch.arange(10)
    noise = make_noise(10, ad.latent_shape, 0)
    c = ad.contract().with_overrides(steps=10, guidance_scale=1.5)
    a = sample(ad, {"y": y}, noise, contract=c).samples
    b = sample(runner, {"y": y}, noise, contract=c).samples
    assert psnr(b.clamp(-1, 1), a.clamp(-1, 1), 2.0) > 35


def test_timestep_group_scales_refuse_to_export(tiny_native, tmp_path):
    q = _w8a8(tiny_native, timestep_groups=2)
    with pytest.raises(DitCompressError, match=r"activation scale is chosen per timestep group.*timestep_groups: 1"):
        export_onnx(q, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_bench_accepts_an_onnx_export_as_variant(tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    r = CliRunner().invoke(app, ["export", "onnx", "reference", "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "onnx"), "--out", str(tmp_path / "b"), "--samples", "10",
                                 "--steps", "5", "--repeats", "2"])
    assert r.exit_code == 0, r.output
    v = json.loads((tmp_path / "b" / "report.json").read_text())["variants"][1]
    assert v["runtime"].startswith("ONNX Runtime") and v["quality"]["psnr_db"] > 40
    assert v["speed"]["ms_per_call"] > 0


def test_mismatching_export_fails_with_report_and_leaves_nothing(tmp_path):
    with pytest.raises(DitCompressError, match=r"failed validation.*t=50 cond: max abs") as e:
        export_onnx(load_model("reference"), tmp_path / "bad", tolerance=1e-12)  # forced: nothing is that exact
    assert "Nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
