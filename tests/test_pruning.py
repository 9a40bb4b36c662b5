"""Depth and width pruning, recovery distillation, resume after SIGKILL, torchrun (DDP)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import compress
from compress import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.dit import DIT_CONFIGS, DiT
from compress.models.provenance import provenance, stamp_source
from compress.recipe import load_recipe, parse_recipe
from tests.conftest import randomized_dit, run_torchrun
from tests.tiny_models import tiny_diffusers_model

FAMILIES = ["diffusers-dit", "pixart", "sd3", "flux"]
CAL = {"samples": 4, "steps": 3, "batch_size": 4}
FAST_TRAIN = {"steps": 3, "batch_size": 4, "warmup": 1}


def recipe(*passes, **defaults):
    return parse_recipe({"name": "t", "description": "test", "defaults": {"calibration": CAL, **defaults},
                         "passes": list(passes)})


def fast(name: str) -> dict:
    """A bundled recipe with training cut to a few steps (structure and fields unchanged)."""
    data = load_recipe(name).model_dump(mode="json", by_alias=True)
    data["defaults"]["calibration"] = CAL
    for p in data["passes"]:
        if p["pass"] == "distill":
            p.update(FAST_TRAIN)
        if p["pass"] == "prune_depth" and p["method"] == "learned":
            p["learned"]["training"].update(FAST_TRAIN)
            p["learned"]["blocks_per_group"] = 2
    return data


def outputs(model, seed=0, n=3):
    a = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *a.latent_shape), generator=g)
    cond = a.contract().example_cond(n, g)
    with torch.no_grad():
        return a.forward(x, torch.tensor([50.0, 400.0, 900.0][:n]), cond)


def identity_blocks(model, which):
    """Zero the adaLN gates of some native blocks: they become exact identities."""
    with torch.no_grad():
        for i in which:
            lin = model.blocks[i].adaLN_modulation[1]
            lin.weight.zero_()
            lin.bias.zero_()
    return model


# --- depth --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["influence", "remove_one", "learned"])
def test_scored_selection_drops_identity_blocks(method):
    """Blocks 1 and 3 do nothing: every data-driven method must drop exactly those."""
    model = identity_blocks(randomized_dit(), [1, 3])
    extra = {"learned": {"blocks_per_group": 2, "lora_rank": 2, "gate_lr": 0.1,
                         "training": {"steps": 150, "batch_size": 8, "lr": 1e-3, "warmup": 1,
                                      "loss": {"features": 0}}}} if method == "learned" else {}
    out = compress.apply_recipe(model, recipe({"pass": "prune_depth", "depth": 2, "method": method, **extra}),
                                show_progress=False)
    assert len(out.blocks) == 2
    assert torch.allclose(outputs(out), outputs(model), atol=1e-5)  # identical function: only no-ops removed
    notes = provenance(out)["passes"][0]["notes"]
    assert f"kept blocks ({method}): block [0, 2]" in notes[-1]


def source_indices(pruned, source) -> list[int]:
    """For each block left in ``pruned``, the index of the ``source`` block whose weights it holds exactly."""
    src = [blk.state_dict() for blk in source.blocks]
    found = []
    for blk in pruned.blocks:
        sd = blk.state_dict()
        found.append(next(i for i, s in enumerate(src) if s.keys() == sd.keys()
                          and all(torch.equal(s[k], sd[k]) for k in s)))
    return found


@pytest.mark.parametrize("method,kept", [("uniform", [0, 2]), ("last", [0, 1])])
def test_baseline_selections(method, kept):
    source = randomized_dit()
    out = compress.apply_recipe(source, recipe({"pass": "prune_depth", "depth": 0.5, "method": method}),
                                show_progress=False)
    assert source_indices(out, source) == kept  # the kept blocks are those source blocks, weights untouched
    assert f"block {kept}" in provenance(out)["passes"][0]["notes"][-1]


def test_manual_keep_and_bad_fields():
    source = randomized_dit()
    out = compress.apply_recipe(source, recipe({"pass": "prune_depth", "depth": 3, "method": "manual",
                                                "keep": {"block": [0, 1, 3]}}), show_progress=False)
    assert source_indices(out, source) == [0, 1, 3]
    with pytest.raises(DitCompressError, match=r"field 'keep.block'.*0..3"):
        compress.apply_recipe(randomized_dit(), recipe({"pass": "prune_depth", "depth": 1, "method": "manual",
                                                        "keep": {"block": [7]}}), show_progress=False)
    with pytest.raises(DitCompressError, match="field 'depth': 9 blocks requested but the model has 4"):
        compress.apply_recipe(randomized_dit(), recipe({"pass": "prune_depth", "depth": 9, "method": "last"}),
                              show_progress=False)
    with pytest.raises(DitCompressError, match=r"unknown block kind\(s\) \['single'\]"):
        compress.apply_recipe(randomized_dit(), recipe({"pass": "prune_depth", "depth": {"single": 1}}),
                              show_progress=False)
    with pytest.raises(DitCompressError, match="field 'keep'"):
        recipe({"pass": "prune_depth", "depth": 2, "method": "uniform", "keep": {"block": [0]}})
    with pytest.raises(DitCompressError, match="training.loss.features must be 0"):
        recipe({"pass": "prune_depth", "depth": 2, "learned": {"training": {"loss": {"features": 0.1}}}})


def test_flux_depth_counts_per_kind():
    out = compress.apply_recipe(tiny_diffusers_model("flux"), recipe(
        {"pass": "prune_depth", "depth": {"joint": 1, "single": 2}, "method": "influence"}), show_progress=False)
    assert len(out.transformer_blocks) == 1 and len(out.single_transformer_blocks) == 2
    assert out.config.num_layers == 1 and out.config.num_single_layers == 2


# --- width --------------------------------------------------------------------------------------------

def silence_units(model, head=0, channels=(0, 1, 2)):
    """Make one head of every attention and a few MLP channels contribute exactly nothing (zero weights)."""
    with torch.no_grad():
        for b in get_adapter(model).blocks():
            for a in b.attentions:
                hd = a.head_dim
                sl = slice(head * hd, (head + 1) * hd)
                for lin in (a.q, a.k, a.v, a.context_q, a.context_k, a.context_v):
                    if lin is not None:
                        lin.weight[sl] = 0
                        if lin.bias is not None:
                            lin.bias[sl] = 0
                if a.qkv is not None:
                    for s in range(3):
                        rows = slice(s * a.heads * hd + head * hd, s * a.heads * hd + (head + 1) * hd)
                        a.qkv.weight[rows] = 0
                        a.qkv.bias[rows] = 0
                for lin in (a.out, a.context_out):
                    if lin is not None:
                        lin.weight[:, sl] = 0
                if a.out is None:  # Flux single: attention columns of the shared proj_out
                    b.mlps[0].fc_out.weight[:, sl] = 0
            for m in b.mlps:
                for c in channels:
                    for r in ([c, m.hidden + c] if m.gated else [c]):
                        m.fc_in.weight[r] = 0
                        m.fc_in.bias[r] = 0.0
                    m.fc_out.weight[:, m.fc_out_offset + c] = 0
    return model


@pytest.mark.parametrize("family", ["native", *FAMILIES])
def test_width_pruning_removes_dead_units_exactly(family, tmp_path):
    """Heads and channels that contribute nothing are the ones removed, and the function is unchanged."""
    model = randomized_dit() if family == "native" else tiny_diffusers_model(family)
    heads = get_adapter(model).blocks()[0].attentions[0].heads
    silence_units(model)
    before = outputs(model)
    out = compress.apply_recipe(model, recipe({"pass": "prune_width", "heads": 1 / heads, "mlp": 3 / 128 if
                                               family != "native" else 3 / 192, "importance": "magnitude"}),
                                show_progress=False)
    for b in get_adapter(out).blocks():
        for a in b.attentions:
            assert a.heads == heads - 1
        for m in b.mlps:
            assert m.hidden == (128 if family != "native" else 192) - 3
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(outputs(out), before, atol=2e-5, rtol=1e-4)
    compress.save(out, tmp_path / "w")
    again = compress.load(tmp_path / "w")
    assert torch.equal(outputs(again), outputs(out))  # pruned artifacts reload bit-exactly


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_data_driven_width_scores_find_dead_units(importance):
    model = silence_units(randomized_dit())
    before = outputs(model)
    out = compress.apply_recipe(model, recipe({"pass": "prune_width", "heads": 0.25, "mlp": 3 / 192,
                                               "importance": importance}), show_progress=False)
    torch.testing.assert_close(outputs(out), before, atol=2e-5, rtol=1e-4)


def test_params_target_and_global_scope():
    model = randomized_dit()
    total = sum(p.numel() for p in model.parameters())
    out = compress.apply_recipe(model, recipe({"pass": "prune_width", "params": 0.3, "importance": "magnitude"}),
                                show_progress=False)
    assert abs(1 - sum(p.numel() for p in out.parameters()) / total - 0.3) < 0.01
    g = compress.apply_recipe(model, recipe({"pass": "prune_width", "heads": 0.5, "mlp": 0.5, "scope": "global",
                                             "importance": "magnitude", "min_keep": 0.25}), show_progress=False)
    heads = [b.attentions[0].heads for b in get_adapter(g).blocks()]
    assert sum(heads) == 8 and min(heads) >= 1  # 16 heads in all, half removed, none emptied
    with pytest.raises(DitCompressError, match="field 'params'"):
        compress.apply_recipe(model, recipe({"pass": "prune_width", "params": 0.95}), show_progress=False)
    with pytest.raises(DitCompressError, match="give either 'params' or 'heads'/'mlp'"):
        recipe({"pass": "prune_width", "params": 0.3, "heads": 0.5})


# --- recovery -----------------------------------------------------------------------------------------

def test_distill_recovers_toward_teacher():
    model = randomized_dit()
    pruned = compress.apply_recipe(model, recipe({"pass": "prune_depth", "depth": 2, "method": "uniform"}),
                                   show_progress=False)
    rec = compress.apply_recipe(model, recipe({"pass": "prune_depth", "depth": 2, "method": "uniform"},
                                              {"pass": "distill", "steps": 60, "batch_size": 16, "lr": 1e-3, "loss": {"diffusion": 0},
                                               "warmup": 5}), show_progress=False)
    ref = outputs(model)
    err_before = (outputs(pruned) - ref).pow(2).mean()
    err_after = (outputs(rec) - ref).pow(2).mean()
    assert err_after < 0.6 * err_before


def test_real_data_file_is_checked(tmp_path):
    from compress.passes import CalibrationConfig, PassContext
    from compress.training import TrainingBatches, TrainingData

    bad = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(4, 3, 8, 8), "y": torch.zeros(4, dtype=torch.long)}, str(bad))
    with pytest.raises(DitCompressError, match=r"latents have shape \(3, 8, 8\); the model expects \(1, 8, 8\)"):
        compress.apply_recipe(randomized_dit(), recipe({"pass": "distill", **FAST_TRAIN, "data": {"real": str(bad)}}),
                              show_progress=False)
    good, other = tmp_path / "good.safetensors", tmp_path / "other.safetensors"
    latents = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    save_file({"latents": latents, "y": torch.arange(8)}, str(good))
    save_file({"latents": -latents, "y": torch.arange(8)}, str(other))
    # the file is what the denoising loss trains on: its latents and labels, as given
    ctx = PassContext.for_model(randomized_dit(), CalibrationConfig(**CAL), show_progress=False)
    data = TrainingBatches(ctx.calibration, TrainingData(real=str(good)), get_adapter(ctx.calibration.model).contract())
    assert torch.equal(data.x0, latents) and torch.equal(data.cond0["y"], torch.arange(8))
    # and end to end: a different real-data file trains a different student from the same seed
    trained = {p.name: compress.apply_recipe(randomized_dit(), recipe({"pass": "distill", **FAST_TRAIN,
                                                                       "data": {"real": str(p)}}), show_progress=False)
               for p in (good, other)}
    a, b = (outputs(m) for m in trained.values())
    assert not torch.allclose(a, b, atol=1e-6)
    again = compress.apply_recipe(randomized_dit(), recipe({"pass": "distill", **FAST_TRAIN, "data": {"real": str(good)}}),
                                  show_progress=False)
    assert torch.equal(outputs(again), a)  # same file, same student: the difference is the data


# --- recipes on every family ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["prune-depth-half", "prune-depth-half-learned", "prune-width-30"])
@pytest.mark.parametrize("family", ["reference", *FAMILIES])
def test_pruning_recipes_apply_reload_and_shrink(name, family, tmp_path):
    model = compress.load_model("reference") if family == "reference" else tiny_diffusers_model(family)
    out = compress.apply_recipe(model, parse_recipe(fast(name)), show_progress=False)
    before, after = get_adapter(model).summary(), get_adapter(out).summary()
    if name.startswith("prune-depth-half"):
        assert after["depth"] < before["depth"]
    else:
        assert after["params"] < 0.75 * before["params"]
    compress.save(out, tmp_path / "a")
    assert torch.equal(outputs(compress.load(tmp_path / "a")), outputs(out))


def test_pruned_reference_exports_to_onnx(tmp_path):
    from exporters.onnx import export_onnx

    model = compress.load_model("reference")
    out = compress.apply_recipe(model, recipe({"pass": "prune_depth", "depth": 6, "method": "uniform"},
                                              {"pass": "prune_width", "params": 0.2, "importance": "magnitude"}),
                                show_progress=False)
    compress.save(out, tmp_path / "a")
    d = export_onnx(compress.load(tmp_path / "a"), tmp_path / "onnx")
    assert json.loads((d / "export.json").read_text())["validation"]["passed"]
    import onnx

    g = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    shapes = {tuple(i.dims) for i in g.initializer}
    assert any(96 in s and 3 * 4 * 16 in s for s in shapes)  # qkv of 4 heads (of 6) left


# --- checkpoints, SIGKILL and resume; torchrun ------------------------------------------------------------

def _train_cmd(src: Path, recipe_path: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compress.cli", "apply", str(recipe_path), "--model", str(src), "--out", str(out),
            "--workdir", str(work), *extra]


def test_killed_recovery_resumes_and_matches_uninterrupted_run(tmp_path):
    src = tmp_path / "tiny.safetensors"
    m = randomized_dit()
    save_file(m.state_dict(), src, metadata={"dit_config": json.dumps(m.config.to_dict())})
    rp = tmp_path / "r.yaml"
    rp.write_text(json.dumps({"name": "r", "description": "resume test", "defaults": {"calibration": CAL}, "passes": [
        {"pass": "prune_depth", "depth": 2, "method": "uniform"},
        {"pass": "distill", "steps": 400, "batch_size": 8, "checkpoint_every": 25}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / "w" / "pass2-distill.pt"
    proc = subprocess.Popen(_train_cmd(src, rp, tmp_path / "a", tmp_path / "w"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "a").exists()  # killed mid-training: no artifact
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 25 <= step < 400
    r = subprocess.run(_train_cmd(src, rp, tmp_path / "a", tmp_path / "w", "--resume"), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    notes = json.loads((tmp_path / "a" / "manifest.json").read_text())["passes"][1]["notes"]
    resumed = int(notes[0].split("at step ")[1])
    assert resumed >= step and resumed % 25 == 0  # lost at most one interval
    r = subprocess.run(_train_cmd(src, rp, tmp_path / "b", tmp_path / "w2"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = compress.load(tmp_path / "a"), compress.load(tmp_path / "b")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    assert not (tmp_path / "w").exists()  # the work directory goes once the artifact is written


DDP_PRELUDE = """
import sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
import compress
from compress.io import WorkDir
from compress.passes import CalibrationConfig, PassContext
from tests.conftest import randomized_dit, run_torchrun
teacher = randomized_dit()
ctx = PassContext.for_model(teacher, CalibrationConfig(samples=4, steps=3), show_progress=False)
ctx.run.workdir = WorkDir(sys.argv[1])
"""
DDP_CHECK = """
w = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
all_w = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(all_w, w)
assert all(torch.equal(all_w[0], x) for x in all_w), "replicas diverged"
# one write per line: both ranks share torchrun's stdout pipe, and print() of several pieces can interleave
sys.stdout.write(f"rank {dist.get_rank()} ok {ctx.run.notes[-1]}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


def torchrun(body: str, tmp_path: Path, port: int) -> str:
    """Run ``body`` on two gloo ranks after ``DDP_PRELUDE`` (``teacher``, ``ctx`` with a work directory); it sets
    ``student``, whose replicas must then be equal. Returns the ranks' output."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_PRELUDE + body + DDP_CHECK)
    r = run_torchrun([str(script), str(tmp_path / "w")], port, timeout=300)
    assert r.stdout.count(" ok ") == 2 and "x 2 rank(s)" in r.stdout
    return r.stdout


def test_distill_runs_under_torchrun_ddp(tmp_path):
    torchrun("""
from compress.training import Trainer, TrainingConfig
student = compress.apply_recipe(teacher, {"name": "d", "description": "d", "passes": [
    {"pass": "prune_depth", "depth": 2, "method": "uniform"}]}, show_progress=False)
Trainer(student, teacher, TrainingConfig(steps=6, batch_size=4, checkpoint_every=3), ctx.run, ctx.calibration,
        tag="ddp").run()
""", tmp_path, 29517)
    assert (tmp_path / "w" / "ddp.pt").exists()


def test_pruning_recipes_on_dit_xl2_preset():
    """Both recipes' pruning passes on DiT-XL/2's structure (28 blocks, width 1152, 16 heads) in one run, on an 8x8
    latent (16 tokens, not 256: the passes see every layer; the token count only scales the time). Recovery
    training at that size is a GPU job."""
    passes = [p for name in ("prune-depth-half", "prune-width-30") for p in fast(name)["passes"]
              if p["pass"] != "distill"]
    for p in passes:
        p["max_rows"] = 8
    data = {"name": "xl", "description": "xl", "passes": passes,
            "defaults": {"calibration": {"samples": 1, "steps": 2, "batch_size": 1}}}
    model = stamp_source(DiT(dataclasses.replace(DIT_CONFIGS["DiT-XL/2"], input_size=8)).eval(), "DiT-XL/2-8", None)
    assert sum(p.numel() for p in model.parameters()) > 670e6
    out = compress.apply_recipe(model, parse_recipe(data), show_progress=False)
    assert get_adapter(out).summary()["depth"] == 14
    width = provenance(out)["passes"][1]
    assert abs(width["params_after"] / width["params_before"] - 0.7) < 0.01
