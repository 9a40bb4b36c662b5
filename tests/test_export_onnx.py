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


def test_8_bit_weights_go_out_as_uint8_for_a_host_without_vnni_and_validate(tiny_native, tmp_path, monkeypatch):
    # ONNX Runtime's U8S8 kernels saturate on 8-bit weights without VNNI; its U8U8 ones are exact on every x86 CPU
    import onnx
    from exporters import qdq

    monkeypatch.setattr(qdq, "CPU_INT8_DOT", False)
    r = parse_recipe({"name": "q", "description": "q", "defaults": {"calibration": {"samples": 4, "steps": 4}},
                      "passes": [{"pass": "quantize", "weights": {"dtype": "int8"}, "activations": {}}]})
    d = export_onnx(apply_recipe(tiny_native, r, show_progress=False), tmp_path / "q")
    meta = json.loads((d / "export.json").read_text())
    assert meta["validation"]["passed"] and meta["qdq_weights"] == "16 uint8"
    weights = [i for i in onnx.load(str(d / "model.onnx")).graph.initializer if len(i.dims) == 2
               and i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)]
    assert len(weights) == 16 and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)
    # 7-bit weights never saturate: they stay int8, as an explicit qdq_weights does
    assert json.loads((export_onnx(_w8a8(tiny_native), tmp_path / "r") / "export.json").read_text())[
        "qdq_weights"] == "16 int8"


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


def scale_initializer(onnx_path, name: str, factor: float) -> None:
    """Corrupt an exported graph: multiply one weight initializer by ``factor`` (external data rewritten)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(onnx_path))
    init = next(i for i in g.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))
    for f in onnx_path.parent.glob(onnx_path.name + ".data"):
        f.unlink()
    onnx.save(g, str(onnx_path), save_as_external_data=True, location=onnx_path.name + ".data")


WEIGHT = "model.blocks.5.adaLN_modulation.1.weight"  # one block's adaLN weights, 0.1% too large


def test_gate_fails_a_wrong_graph_at_its_default_tolerance(tmp_path):
    import shutil

    from exporters.onnx import validate_onnx

    m = load_model("reference")
    good = export_onnx(m, tmp_path / "good")
    shutil.copytree(good, tmp_path / "bad")
    scale_initializer(tmp_path / "bad" / "model.onnx", WEIGHT, 1.001)
    ok, bad = validate_onnx(good / "model.onnx", m), validate_onnx(tmp_path / "bad" / "model.onnx", m)
    assert ok["passed"] and ok["max_rel_err"] < 1e-5 and ok["tolerance_rel"] == 1e-4
    # measured: 2.2e-4 relative; the default fp32 tolerance (1e-4) fails it
    assert not bad["passed"] and 1.5e-4 < bad["max_rel_err"] < 1e-3


def test_mismatching_export_fails_with_report_and_leaves_nothing(tmp_path, monkeypatch):
    import exporters.onnx as onnx_export

    fix = onnx_export.fix_noop_squeeze

    def corrupting(path):  # a post-export step that damages the graph: what the gate is there to catch
        scale_initializer(path, WEIGHT, 1.001)
        return fix(path)

    monkeypatch.setattr(onnx_export, "fix_noop_squeeze", corrupting)
    with pytest.raises(DitCompressError, match=r"failed validation.*tolerance 0.0001 relative.*t=50 cond: max abs") as e:
        export_onnx(load_model("reference"), tmp_path / "bad")  # the default tolerance
    assert "Nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []
