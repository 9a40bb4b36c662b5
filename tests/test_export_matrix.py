"""The README's export compatibility table: every family x every pass exports to ONNX and validates on ONNX Runtime."""

import json

import pytest

pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")

from compress import apply_recipe  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from tests.conftest import randomized_dit  # noqa: E402
from tests.tiny_models import tiny_diffusers_model  # noqa: E402

CAL = {"samples": 2, "steps": 2, "batch_size": 2}
PASSES = {
    "fp32": None,
    "w8a8-int8-ort-cpu": "w8a8-int8-ort-cpu",  # QDQ
    "int4-weights-g32": "int4-weights-g32",
    "fp8": "fp8",
    "pruned": {"name": "pruned", "description": "depth and width", "passes": [
        {"pass": "prune_depth", "depth": 0.5, "method": "influence"},
        {"pass": "prune_width", "heads": 0.5, "mlp": 0.3, "importance": "magnitude"}]},
}


@pytest.mark.parametrize("what", list(PASSES))
@pytest.mark.parametrize("family", ["dit", "diffusers-dit", "pixart", "sd3", "flux"])
def test_export_compatibility(family, what, tmp_path):
    model = randomized_dit() if family == "dit" else tiny_diffusers_model(family)
    recipe = PASSES[what]
    if recipe is not None:
        if isinstance(recipe, str):
            recipe = load_recipe(recipe).model_dump(mode="json", by_alias=True)
            for p in recipe["passes"]:
                if p["weights"]["group_size"]:
                    p["weights"]["group_size"] = 16  # the tiny models are 32 and 48 wide
        recipe = {**recipe, "defaults": {"calibration": CAL}}
        model = apply_recipe(model, recipe, show_progress=False)
    meta = json.loads((export_onnx(model, tmp_path / "onnx") / "export.json").read_text())
    assert meta["validation"]["passed"], meta["validation"]
    if what == "w8a8-int8-ort-cpu":
        assert meta["qdq_layers"] > 0
