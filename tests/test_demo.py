"""The demo's shipped artifacts: made by the bundled recipes, loadable, refused when their passes differ."""

import json
import shutil

import compress
from compress import demo


def test_every_training_recipe_of_the_demo_ships_an_artifact_made_by_the_bundled_recipe():
    trained = [d for d in demo.DEMO if d.trains]
    assert {d.axis for d in demo.DEMO} >= {"precision", "depth", "width", "steps", "caching", "composite"}
    for d in trained:
        path = demo.shipped_artifact(d.recipe)
        assert path is not None, d.recipe
        model = compress.load(path)  # strict load: architecture replayed, hashes checked
        ref = compress.get_adapter(compress.load_model("reference")).contract()
        assert tuple(compress.get_adapter(model).contract().latent_shape) == tuple(ref.latent_shape)
    steps = compress.get_adapter(compress.load(demo.shipped_artifact("few-step-4"))).contract()
    assert steps.nfe == 4  # 4 calls per image, guidance baked in


def test_shipped_artifact_whose_passes_differ_from_the_recipe_is_not_used(tmp_path, monkeypatch):
    shutil.copytree(demo.ARTIFACTS / "fastest", tmp_path / "fastest")
    monkeypatch.setattr(demo, "ARTIFACTS", tmp_path)
    assert demo.shipped_artifact("fastest") == tmp_path / "fastest"
    m = json.loads((tmp_path / "fastest" / "manifest.json").read_text())
    m["recipe"]["passes"][1]["steps"] = 10  # a shorter recovery than the bundled recipe's
    (tmp_path / "fastest" / "manifest.json").write_text(json.dumps(m))
    assert demo.shipped_artifact("fastest") is None
    assert demo.shipped_artifact("w8a8-int8") is None  # none shipped: applied live
