"""The README's export compatibility table: every family x fp32 / quantized / pruned exports to ONNX and
validates on ONNX Runtime. The quantized model carries all three formats at once (attention W8A8 INT8 as
QDQ, adaLN INT4 weight-only, MLPs FP8), so one export per family covers each of them."""

import json

import pytest

pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")

from compress import apply_recipe  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from tests.conftest import randomized_dit  # noqa: E402
from tests.tiny_models import tiny_diffusers_model  # noqa: E402

CAL = {"samples": 2, "steps": 2, "batch_size": 2}
RECIPES = {
    "fp32": None,
    "quantized": [
        {"pass": "quantize", "weights": {"dtype": "int8", "reduce_range": True},
         "activations": {"dtype": "int8", "mode": "static"}, "smoothing": {"alpha": "search"},
         "layers": {"include": ["*attn*"]}},
        {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 16}, "layers": {"modulation": "only"},
         "allow_empty": True},
        {"pass": "quantize", "weights": {"dtype": "fp8"}, "activations": {"dtype": "fp8", "mode": "static"}},
    ],
    "pruned": [
        {"pass": "prune_depth", "depth": 0.5, "method": "influence"},
        {"pass": "prune_width", "heads": 0.5, "mlp": 0.3, "importance": "magnitude"},
    ],
}


@pytest.mark.parametrize("what", list(RECIPES))
@pytest.mark.parametrize("family", ["dit", "diffusers-dit", "pixart", "sd3", "flux"])
def test_export_compatibility(family, what, tmp_path):
    model = randomized_dit() if family == "dit" else tiny_diffusers_model(family)
    if RECIPES[what] is not None:
        model = apply_recipe(model, {"name": what, "description": what, "defaults": {"calibration": CAL},
                                     "passes": RECIPES[what]}, show_progress=False)
    meta = json.loads((export_onnx(model, tmp_path / "onnx") / "export.json").read_text())
    assert meta["validation"]["passed"], meta["validation"]
    if what == "quantized":
        from compress.nn.quant import QuantLinear, WeightOnlyLinear

        kinds = {(m.weight_format, m.act_format) for m in model.modules() if isinstance(m, QuantLinear)}
        assert {("int8", "int8"), ("fp8", "fp8")} <= kinds and meta["qdq_layers"] > 0
        if family != "pixart":  # PixArt's adaLN lives outside the blocks
            assert any(isinstance(m, WeightOnlyLinear) and m.bits == 4 for m in model.modules())
