"""The benchmark harness on a tiny native DiT: files, report schema, metrics that must hold, suite errors."""

import copy
import json

import pytest
import torch

from tests.test_native_dit import randomized

from compress import DitCompressError, get_adapter
from compress.bench import BenchConfig, Variant, load_suite, run_bench
from compress.bench.report import pareto_front
from compress.models.dit import DiT, DiTConfig
from compress.models.size import state_bytes
from exporters.runtime import Runner, TorchRunner

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                 num_classes=10, learn_sigma=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    base = randomized(DiT(TINY)).eval()
    pruned = copy.deepcopy(base)
    get_adapter(pruned).remove_blocks("block", [1])
    cfg = BenchConfig(samples=20, steps=4, repeats=3, warmup=1, speed_batch=4)
    same = copy.deepcopy(base)
    calls = []

    class Counting(Runner):  # stands in for an ONNX Runtime / TensorRT runner
        def __init__(self, model):
            inner = TorchRunner(model)
            self.contract, self.module, self.params, self.size_bytes = (inner.contract, model, inner.params,
                                                                        inner.size_bytes)
            self.description = "counting runner"

        def __call__(self, x, t, cond):
            calls.append(x.shape[0])
            return get_adapter(same).forward(x, t, cond)

    variants = [Variant("pruned", pruned.eval(), recipe="depth-prune"), Variant("copy", Counting(same))]
    report = run_bench(Variant("source", base), variants, cfg, out)
    # sampling (4 steps x CFG batch 40) and timing (1 warm-up + 3 timed at batch 4) both went through it
    assert calls.count(40) == 4 and calls.count(4) == 4
    return out, report


def test_files_written(bench):
    out, report = bench
    for f in ("report.json", "report.md", "pareto.png", "grid_source.png", "grid_pruned.png", "grid_copy.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.tmp"))
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| source |" in md and "| pruned |" in md and "interleaved" in md and "RSS" in md


def test_report_schema(bench):
    _, report = bench
    assert {"config", "machine", "variants"} <= set(report)
    assert report["config"]["samples"] == 20
    names = [v["name"] for v in report["variants"]]
    assert names == ["source", "pruned", "copy"]
    for v in report["variants"]:
        assert {"name", "recipe", "steps", "nfe", "quality", "speed", "params", "size_mb", "macs_per_call"} <= set(v)
        assert set(v["quality"]) == {"fd", "class_acc", "psnr_db", "ssim", "fd_to_source", "finite"}
        assert set(v["speed"]) == {"ms_per_call", "p90_ms_per_call", "ms_per_image", "images_per_s", "speedup",
                                   "peak_mem_mb", "skipped_block_fraction"}
        assert v["speed"]["skipped_block_fraction"] is None  # no cache policy: per-call timing, nothing skipped
        assert v["steps"] == 4 and v["nfe"] == 8  # CFG doubles the evaluations
        # digits family (10 classes, 1x8x8): the bundled evaluator scores it
        assert v["quality"]["fd"] is not None and 0 <= v["quality"]["class_acc"] <= 1
        assert v["speed"]["p90_ms_per_call"] >= v["speed"]["ms_per_call"] > 0
    base, pruned, same = report["variants"]
    assert base["recipe"] is None and pruned["recipe"] == "depth-prune"
    assert base["quality"]["psnr_db"] is None and base["quality"]["ssim"] is None
    assert base["quality"]["fd_to_source"] is None and pruned["quality"]["fd_to_source"] > 0
    assert base["speed"]["speedup"] == 1.0


def test_metrics(bench):
    _, report = bench
    base, pruned, same = report["variants"]
    assert same["quality"]["psnr_db"] >= 99 and same["quality"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["quality"]["fd"] == pytest.approx(base["quality"]["fd"])
    assert abs(same["quality"]["fd_to_source"]) < 1e-3 < pruned["quality"]["fd_to_source"]  # identical samples: 0
    assert pruned["quality"]["psnr_db"] < 99 and pruned["quality"]["ssim"] < 1
    assert pruned["params"] < base["params"] == same["params"]
    assert pruned["size_mb"] < base["size_mb"]
    assert 0 < pruned["macs_per_call"] < base["macs_per_call"] == same["macs_per_call"]
    for v in report["variants"]:
        s = v["speed"]
        assert isinstance(s["speedup"], float) and s["speedup"] > 0
        assert s["ms_per_image"] == pytest.approx(s["ms_per_call"] / 4 * 8, rel=1e-3)
        assert s["peak_mem_mb"] is None or s["peak_mem_mb"] > 0


def test_no_quality_no_speed_gives_nulls(tmp_path):
    base = randomized(DiT(TINY)).eval()
    cfg = BenchConfig(samples=4, steps=2, quality=False, speed=False)
    report = run_bench(Variant("a", base), [Variant("b", copy.deepcopy(base), steps=1)], cfg, tmp_path)
    v = report["variants"][1]
    assert v["steps"] == 1 and v["nfe"] == 2
    assert all(x is None for k, x in v["quality"].items() if k != "finite") and all(x is None for x in v["speed"].values())
    assert v["macs_per_call"] is None and v["params"] > 0
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    assert not (tmp_path / "pareto.png").exists()


def test_duplicate_names_rejected(tmp_path):
    m = randomized(DiT(TINY)).eval()
    with pytest.raises(DitCompressError, match="distinct names"):
        run_bench(Variant("a", m), [Variant("a", m)], BenchConfig(quality=False, speed=False), tmp_path)


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0)]
    assert pareto_front(pts, lower_is_better=True) == [0, 1, 3]
    assert pareto_front(pts, lower_is_better=False) == [0]


# ---- suites ---------------------------------------------------------------------------------------
def save_tiny(path):
    from safetensors.torch import save_file

    model = randomized(DiT(TINY))
    save_file(model.state_dict(), str(path), metadata={"dit_config": json.dumps(TINY.to_dict())})
    return model


def test_load_suite(tmp_path):
    model = save_tiny(tmp_path / "tiny.safetensors")
    suite = tmp_path / "suite.yaml"  # relative paths are read from the suite's folder
    suite.write_text("baseline: tiny.safetensors\nvariants:\n  - {name: again, path: tiny.safetensors, steps: 2}\n"
                     "  - DiT-S/8\nconfig: {samples: 16, steps: 20}\n")
    baseline, variants, config = load_suite(suite)
    assert baseline.name == "tiny.safetensors" and baseline.recipe is None
    assert baseline.size_bytes == (tmp_path / "tiny.safetensors").stat().st_size
    torch.testing.assert_close(baseline.model.state_dict(), model.state_dict())
    assert [v.name for v in variants] == ["again", "DiT-S/8"] and variants[0].steps == 2
    assert variants[1].steps is None  # a preset: random weights, no file: its size is its tensors'
    assert variants[1].size_bytes == state_bytes(variants[1].model)
    assert config.samples == 16 and config.steps == 20 and config.repeats == BenchConfig().repeats


@pytest.mark.parametrize("text, field", [
    ("baseline: reference\nvariants:\n  - {path: reference, stepz: 4}\n", "variants[0].stepz"),
    ("baseline: reference\nconfig: {samples: 10, turbo: true}\n", "config.turbo"),
    ("baseline: reference\nconfig: {samples: many}\n", "config.samples"),
    ("variants: []\n", "baseline"),
    ("baseline: reference\ncolour: blue\n", "colour"),
])
def test_suite_errors_name_file_and_field(tmp_path, text, field):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(DitCompressError) as e:
        load_suite(suite)
    msg = str(e.value)
    assert str(suite) in msg and field in msg and "\n" not in msg


def test_suite_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(DitCompressError, match="no such benchmark suite file") as e:
        load_suite(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("baseline: [reference\n")
    with pytest.raises(DitCompressError, match="not valid YAML at line"):
        load_suite(bad)


def test_suite_missing_model_names_field(tmp_path):
    suite = tmp_path / "suite.yaml"
    save_tiny(tmp_path / "tiny.safetensors")
    suite.write_text("baseline: tiny.safetensors\nvariants:\n  - {name: w8, path: out/w8}\n")
    with pytest.raises(DitCompressError) as e:
        load_suite(suite)
    assert "variants[0].path" in str(e.value) and "out/w8" in str(e.value)


def test_console_table_fits_120_columns_and_shows_the_per_image_speedup(bench):
    import io

    from rich.console import Console

    from compress.bench.report import print_table

    _, report = bench
    long = copy.deepcopy(report)
    long["variants"][1]["name"] = "a-variant-name-far-longer-than-any-column-should-be-allowed-to-grow"
    buf = io.StringIO()
    print_table(long, Console(file=buf, width=120, force_terminal=False))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120
    assert any("× / image" in line for line in lines) and any("NFE" in line for line in lines)
    pruned = report["variants"][1]
    want = report["variants"][0]["speed"]["ms_per_image"] / pruned["speed"]["ms_per_image"]
    assert f"{want:.3g}x" in buf.getvalue()  # per-image speed-up, baseline ms/image over the variant's


def test_pareto_plot_has_a_latency_and_a_size_panel(bench):
    import matplotlib.image

    out, _ = bench
    img = matplotlib.image.imread(out / "pareto.png")
    assert img.shape[1] > 1.8 * img.shape[0]  # two panels side by side
