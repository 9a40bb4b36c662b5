"""The CLI end to end on small models: inspect, sample, apply, bench."""

import json

from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from compress.cli import app
from tests.conftest import randomized_dit
from tests.tiny_models import tiny_diffusers_model

runner = CliRunner()


def test_inspect_json_reference():
    r = runner.invoke(app, ["inspect", "reference", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["family"] == "dit" and info["depth"] == 12 and info["hidden"] == 96 and info["heads"] == 6
    assert info["params"] == 2_064_004


def test_inspect_flux_counts_both_block_kinds(tmp_path):
    tiny_diffusers_model("flux").save_pretrained(tmp_path / "flux")
    r = runner.invoke(app, ["inspect", str(tmp_path / "flux"), "--json"])
    info = json.loads(r.output)
    assert info["family"] == "flux" and info["depth"] == info["blocks"]["joint"] + info["blocks"]["single"] == 4


def test_sample_grid_rows_per_class(tmp_path):
    r = runner.invoke(app, ["sample", "reference", "--classes", "0-2", "--per-class", "4", "--steps", "5",
                            "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert "10 transformer evaluations per image" in r.output  # 5 steps x 2 CFG branches
    w, h = Image.open(tmp_path / "g.png").size
    assert w > h  # 3 rows of 4


def test_apply_then_bench(tmp_path):
    src = tmp_path / "tiny.safetensors"
    m = randomized_dit()
    save_file(m.state_dict(), src, metadata={"dit_config": json.dumps(m.config.to_dict())})
    r = runner.invoke(app, ["apply", "int8-weights", "--model", str(src), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["apply", "int8-weights", "--model", str(src), "--out", str(tmp_path / "a")])
    assert r.exit_code != 0  # exists, no --force
    r = runner.invoke(app, ["bench", str(tmp_path / "a"), "--baseline", str(src), "--out", str(tmp_path / "b"),
                            "--samples", "10", "--steps", "3", "--repeats", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    v = rep["variants"][1]
    # measured 42.7 dB (torch 2.13 CPU); 38 dB allows 3x that error
    assert v["recipe"] == "int8-weights" and v["quality"]["psnr_db"] > 38
    assert v["size_mb"] < 0.5 * rep["variants"][0]["size_mb"]  # int8 block weights: about 4x smaller blocks
    for key in ("ms_per_call", "ms_per_image", "speedup"):
        assert v["speed"][key] > 0
    assert (tmp_path / "b" / "pareto.png").exists() and (tmp_path / "b" / "report.md").exists()
