"""TensorRT exporter: the logic that does not need TensorRT (profiles, precision plan, cache key, metadata),
and a clear exit where TensorRT is absent. Building and running engines is untested in CI (no TensorRT)."""

import importlib.util
import json

import pytest

pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")

from compress import DitCompressError, load_model  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.tensorrt import (  # noqa: E402
    BuildPlan, engine_cache_key, engine_metadata, graph_quantization, onnx_inputs, plan_precision, profile_shapes,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory):
    return export_onnx(load_model("reference"), tmp_path_factory.mktemp("trt") / "onnx", source="reference")


def test_profiles_from_the_onnx_inputs(reference_export):
    inputs = onnx_inputs(reference_export / "model.onnx")
    assert list(inputs) == ["latent", "timestep", "y"] and inputs["latent"][1:] == [1, 8, 8]
    assert isinstance(inputs["latent"][0], str)  # the dynamic batch axis
    shapes = profile_shapes(inputs, (1, 4, 16))
    assert shapes["latent"] == [[1, 1, 8, 8], [4, 1, 8, 8], [16, 1, 8, 8]] and shapes["y"] == [[1], [4], [16]]
    with pytest.raises(DitCompressError, match="need 1 <= min <= opt <= max"):
        profile_shapes(inputs, (4, 2, 8))
    with pytest.raises(DitCompressError, match="dynamic non-batch dimensions"):
        profile_shapes({"latent": ["batch", 4, "h", "w"]}, (1, 2, 4))


def test_precision_plan_follows_the_graph_and_version():
    none, int8 = {"int8": False, "fp8": False}, {"int8": True, "fp8": False}
    assert plan_precision("fp16", none, "10.3.0") == BuildPlan("fp16", False, ["FP16"])
    assert plan_precision("int8", int8, "10.3.0").flags == ["INT8", "FP16"]
    assert plan_precision("fp16", int8, "10.3.0").flags == ["FP16", "INT8"]  # QDQ needs the INT8 flag honoured
    assert plan_precision("int8", int8, "10.3.0", strongly_typed=True) == BuildPlan("int8", True, [])
    with pytest.raises(DitCompressError, match="needs an ONNX export with INT8 QDQ"):
        plan_precision("int8", none, "10.3.0")
    with pytest.raises(DitCompressError, match="FP8 QDQ"):
        plan_precision("fp8", int8, "10.3.0")
    with pytest.raises(DitCompressError, match="strongly typed networks need TensorRT 10"):
        plan_precision("fp16", none, "8.6.1", strongly_typed=True)
    with pytest.raises(DitCompressError, match="BF16 engines need TensorRT 9"):
        plan_precision("bf16", none, "8.6.1")
    with pytest.raises(DitCompressError, match="--qdq-activations int8"):
        plan_precision("int8", {"int8": True, "uint8_activations": True}, "10.3.0")
    with pytest.raises(DitCompressError, match="choose one of"):
        plan_precision("int4", none, "10.3.0")


def test_graph_quantization_sees_qdq_and_its_form(tiny_native, tmp_path, reference_export):
    from compress import apply_recipe

    assert graph_quantization(reference_export / "model.onnx") == {"int8": False, "fp8": False,
                                                                    "uint8_activations": False}
    q = apply_recipe(tiny_native, {"name": "q", "description": "q", "defaults": {"calibration": {"samples": 4,
                                                                                                 "steps": 4}},
                                   "passes": [{"pass": "quantize", "weights": {"reduce_range": True},
                                               "activations": {}}]}, show_progress=False)
    u8 = graph_quantization(export_onnx(q, tmp_path / "u8") / "model.onnx")
    s8 = graph_quantization(export_onnx(q, tmp_path / "s8", qdq_activations="int8") / "model.onnx")
    assert u8["int8"] and u8["uint8_activations"] and s8["int8"] and not s8["uint8_activations"]


def test_cache_key_and_metadata():
    plan = BuildPlan("fp16", False, ["FP16"])
    shapes = {"latent": [[1, 1, 8, 8], [4, 1, 8, 8], [16, 1, 8, 8]]}
    key = engine_cache_key("abc", plan, shapes, "10.3.0", "H100")
    assert key == engine_cache_key("abc", plan, shapes, "10.3.0", "H100")
    for other in (engine_cache_key("abd", plan, shapes, "10.3.0", "H100"),
                  engine_cache_key("abc", BuildPlan("int8", False, ["INT8", "FP16"]), shapes, "10.3.0", "H100"),
                  engine_cache_key("abc", plan, shapes, "10.4.0", "H100"),
                  engine_cache_key("abc", plan, shapes, "10.3.0", "A100")):
        assert other != key
    meta = engine_metadata({"inputs": ["latent", "timestep", "y"], "output": "prediction", "source": "reference"},
                           plan, shapes, "10.3.0", "H100", key, 12.34)
    assert meta["precision"] == "fp16" and meta["profiles"] == [shapes] and meta["gpu"] == "H100"
    assert json.loads(json.dumps(meta)) == meta


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the message where it is not")
def test_cli_exits_clearly_without_tensorrt(reference_export, tmp_path):
    from typer.testing import CliRunner

    from compress.cli import app

    r = CliRunner().invoke(app, ["export", "tensorrt", str(reference_export), "--out", str(tmp_path / "e")])
    msg = r.output + str(r.exception)
    assert r.exit_code != 0 and "TensorRT is not installed" in msg and "dit-compress[tensorrt]" in msg
    assert not (tmp_path / "e").exists()
