"""The benchmark harness on a tiny native DiT: files, report schema, metrics that must hold, suite errors;
sharded sampling and the bench under torchrun (two gloo ranks) against one process."""

import copy
import json
import os

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


# ---- distributed evaluation -----------------------------------------------------------------------
def test_shard_rows_split_the_indices_in_order_and_cut_batch_wide_contracts_at_sampler_batches():
    from compress.evaluation import shard_rows

    for n, world, unit in [(20, 2, 1), (21, 2, 1), (7, 3, 1), (21, 3, 8), (600, 2, 250), (100, 4, 250)]:
        parts = [shard_rows(n, r, world, unit) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n)), (n, world, unit)
        assert len(parts[0]) > 0 and all(p.start % unit == 0 for p in parts if len(p))
    assert [len(shard_rows(21, r, 2)) for r in range(2)] == [11, 10]
    assert [len(shard_rows(600, r, 2, 250)) for r in range(2)] == [500, 100]  # three batches: two and one
    assert [len(shard_rows(100, r, 2, 250)) for r in range(2)] == [100, 0]  # one batch: rank 0 samples it


@pytest.fixture(scope="module")
def reference():
    from compress.sources import load_model

    return load_model("reference")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "lcm", "tcd"])
def test_a_shard_of_the_samples_is_those_samples_of_the_whole_run(reference, sampler):
    """Shards cut across the sampler's batches (21 samples in batches of 8, three shards of 7) give the
    samples of the one-call run: same noise, labels and, for the stochastic samplers, the same step noise.
    Up to the matmul rounding of a smaller batch (measured < 4e-6 here); a wrong draw differs by O(0.1)."""
    from compress.evaluation import generate, shard_rows

    c = get_adapter(reference).contract().with_overrides(steps=4, sampler=sampler)
    if sampler == "tcd":
        c = c.model_copy(update={"eta": 0.5})  # eta 0 would be deterministic
    whole = generate(reference, 21, contract=c, seed=3, batch_size=8)
    shards = [generate(reference, 21, contract=c, seed=3, batch_size=8, shard=shard_rows(21, r, 3)) for r in range(3)]
    torch.testing.assert_close(torch.cat([s.images for s in shards]), whole.images, rtol=0, atol=1e-4)
    assert torch.equal(torch.cat([s.labels for s in shards]), whole.labels)
    assert all(s.nfe == whole.nfe for s in shards)


def test_a_batch_wide_cache_is_sharded_by_whole_sampler_batches_and_samples_exactly(reference, monkeypatch):
    """A first_block cache decides from a metric over its whole batch: the rows each of three ranks samples
    (``rank_rows``) are whole sampler batches, sampled exactly as in the one-process run (bit-identical: the
    same batches); a static cache schedule is split by sample."""
    from compress import evaluation as ev
    from compress.models.cache_policy import CachePolicy

    c = get_adapter(reference).contract().with_overrides(steps=4)
    c = c.model_copy(update={"cache": CachePolicy(method="first_block", threshold=0.2, warmup=1, cooldown=0)})
    static = c.model_copy(update={"cache": CachePolicy(method="fora", interval=2)})
    rows, static_rows = [], []
    for r in range(3):
        monkeypatch.setattr(ev, "world", lambda r=r: (r, 3))
        rows.append(ev.rank_rows(21, c, 8))
        static_rows.append(ev.rank_rows(21, static, 8))
    assert [len(x) for x in rows] == [8, 8, 5] and [len(x) for x in static_rows] == [7, 7, 7]
    whole = ev.generate(reference, 21, contract=c, seed=3, batch_size=8)
    shards = [ev.generate(reference, 21, contract=c, seed=3, batch_size=8, shard=x) for x in rows]
    assert torch.equal(torch.cat([s.images for s in shards]), whole.images)


def test_bench_under_torchrun_two_ranks_writes_the_single_process_report(tmp_path):
    """`torchrun --nproc-per-node 2 -m compress.cli bench` (two gloo ranks, 10 samples each) and one process
    on the same suite: the same quality figures and byte-identical grids; rank 1 printed nothing; the report
    says it was sharded."""
    import subprocess
    import sys

    from tests.conftest import ROOT, run_torchrun

    suite = tmp_path / "suite.yaml"
    suite.write_text("baseline: reference\nvariants:\n  - {name: three-steps, path: reference, steps: 3}\n"
                     "config: {samples: 20, steps: 5, repeats: 1, warmup: 0, speed_batch: 2}\n")
    bench = ["-m", "compress.cli", "bench", "--suite", str(suite), "--out"]
    r = run_torchrun([*bench, str(tmp_path / "ranks")], port=29535)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, *bench, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ranks", "one"))
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert "2 torch.distributed ranks" in a["notes"]["distributed"] and b["notes"]["distributed"] is None
    for va, vb in zip(a["variants"], b["variants"], strict=True):
        assert (va["name"], va["steps"], va["nfe"]) == (vb["name"], vb["steps"], vb["nfe"])
        for k in ("fd", "class_acc", "psnr_db", "ssim", "fd_to_source"):
            assert (va["quality"][k] is None) == (vb["quality"][k] is None), k
            if vb["quality"][k] is not None:
                assert va["quality"][k] == pytest.approx(vb["quality"][k], abs=1e-6), (va["name"], k)
    assert b["variants"][1]["quality"]["psnr_db"] is not None  # the comparison columns were compared too
    assert a["files"]["grids"] == b["files"]["grids"] and len(a["files"]["grids"]) == 2
    for f in a["files"]["grids"].values():
        assert (tmp_path / "ranks" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert r.stdout.count("wrote ") == 1 and r.stdout.count("three-steps") == one.stdout.count("three-steps")
