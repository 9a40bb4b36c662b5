"""Few-step and guidance distillation: every objective on every family, the student's sampling contract honoured
everywhere with no flags, exact resume after SIGKILL, FSDP2 sharding, composition, and config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import compress
from compress import DitCompressError
from compress.evaluation import generate
from compress.models.adapters import get_adapter
from compress.nn.guidance import GUIDANCE_INPUT, GuidanceEmbedding
from tests.conftest import randomized_dit, run_torchrun
from tests.tiny_models import tiny_diffusers_model

ROOT = Path(__file__).resolve().parent.parent
CAL = {"samples": 2, "steps": 2, "batch_size": 2}
ONE = {"steps": 1, "batch_size": 2, "warmup": 0}
OBJECTIVES = {
    "guidance": {"objective": "guidance"},
    "progressive": {"objective": "progressive", "student": {"steps": 2}, "progressive": {"start_steps": 4}},
    "consistency": {"objective": "consistency", "student": {"steps": 2}, "consistency": {"solver_steps": 8}},
    "dmd": {"objective": "dmd", "student": {"steps": 2},
            "dmd": {"fake_lr_ratio": 1.0, "fake_updates": 1, "regression": 0.25, "regression_pairs": 2, "gan": 0.1}},
}


def recipe(*passes, calibration=CAL):
    return {"name": "t", "description": "t", "defaults": {"calibration": calibration}, "passes": list(passes)}


def family_model(family: str):
    return randomized_dit() if family == "dit" else tiny_diffusers_model(family)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("family", ["dit", "diffusers-dit", "pixart", "sd3", "flux"])
def test_every_objective_trains_a_student_that_samples_as_its_contract_says(family, objective, tmp_path):
    src = family_model(family)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    s = compress.apply_recipe(src, recipe({"pass": "distill", **OBJECTIVES[objective], **ONE}), show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())  # the source is untouched
    c = get_adapter(s).contract()
    wraps = [m for m in s.modules() if isinstance(m, GuidanceEmbedding)]
    assert c.guidance_input == GUIDANCE_INPUT and len(wraps) == len(get_adapter(s).conditioning_embedders())
    if objective == "guidance":
        assert c.timesteps is None and c.steps == 50 and c.nfe == 50  # the source's steps, half the calls
    else:
        assert c.timesteps == [999.0, 499.0] and c.nfe == 2
        flow = family in ("sd3", "flux")
        assert c.sampler == {"progressive": "euler" if flow else "tcd", "consistency": "flow-lcm" if flow else "lcm",
                             "dmd": "flow-lcm" if flow else "lcm"}[objective]
    trained = [n for n, p in s.state_dict().items() if n in before and not torch.equal(p, before[n])]
    assert trained, "one optimiser step changed no weight"
    g = generate(s, 3, seed=0, contract=c.with_overrides(steps=3) if objective == "guidance" else None)
    assert torch.isfinite(g.images).all() and g.nfe == (3 if objective == "guidance" else 2)
    again = compress.load(compress.save(s, tmp_path / "a"))
    g2 = generate(again, 3, seed=0, contract=c.with_overrides(steps=3) if objective == "guidance" else None)
    assert torch.equal(g.images, g2.images)


def test_guidance_embedding_starts_as_the_source_and_changes_with_the_scale():
    from compress.distillation import add_guidance_input

    m = randomized_dit()
    ref = compress.apply_recipe(m, recipe({"pass": "distill", **OBJECTIVES["guidance"], **ONE, "lr": 1e-12}),
                                show_progress=False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 20.0]), torch.tensor([1, 2])
    with torch.no_grad():
        base = get_adapter(m).forward(x, t, {"y": y})
        for w in (1.0, 4.0):  # zero-initialised: the untrained student is the source at every scale
            out = get_adapter(ref).forward(x, t, {"y": y, GUIDANCE_INPUT: torch.full((2,), w)})
            assert (out - base).abs().max() < 1e-4
    student = randomized_dit()
    add_guidance_input(student, 16, 1.5)
    for e in student.modules():
        if isinstance(e, GuidanceEmbedding):
            torch.nn.init.normal_(e.mlp[2].weight, std=0.5)
    with torch.no_grad():
        a = get_adapter(student).forward(x, t, {"y": y, GUIDANCE_INPUT: torch.full((2,), 1.0)})
        b = get_adapter(student).forward(x, t, {"y": y, GUIDANCE_INPUT: torch.full((2,), 4.0)})
    assert (a - b).abs().max() > 1e-3


def test_guidance_student_matches_the_guided_source_better_after_training():
    from compress.distillation.core import guided_output
    from compress.passes import CalibrationConfig, PassContext

    m = compress.load_model("reference")
    ctx = PassContext.for_model(m, CalibrationConfig(samples=4, steps=4), show_progress=False)
    s = compress.apply_recipe(m, recipe({"pass": "distill", "objective": "guidance", "steps": 50, "batch_size": 32,
                                         "lr": 1e-4, "warmup": 0}), ctx=ctx, show_progress=False)
    rows = ctx.calibration.rows()
    keep = rows.cond["y"] != 10  # points of the source's guided trajectories, conditional branch
    x, t, y = rows.x[keep], rows.t[keep].float(), rows.cond["y"][keep]
    w = torch.full((len(x),), 2.0)
    with torch.no_grad():
        target = guided_output(get_adapter(m), get_adapter(m).contract(), x, t, {"y": y}, w)
        cond_only = get_adapter(m).forward(x, t, {"y": y})
        student = get_adapter(s).forward(x, t, {"y": y, GUIDANCE_INPUT: w})
    before, after = (cond_only - target).pow(2).mean(), (student - target).pow(2).mean()
    assert after < 0.8 * before, (float(before), float(after))  # measured: 0.55 x after 60 steps


def test_cli_samples_and_benches_a_student_by_its_contract(tmp_path):
    from typer.testing import CliRunner
    from safetensors.torch import save_file

    from compress.cli import app

    src = tmp_path / "tiny.safetensors"
    m = randomized_dit()
    save_file(m.state_dict(), src, metadata={"dit_config": json.dumps(m.config.to_dict())})
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps(recipe({"pass": "distill", **OBJECTIVES["consistency"], **ONE})))
    cli = CliRunner()
    res = cli.invoke(app, ["apply", str(r), "--model", str(src), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["sample", str(tmp_path / "s"), "--classes", "0-1", "--per-class", "2",
                           "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 0 and "2 transformer evaluations per image" in res.output, res.output
    res = cli.invoke(app, ["sample", str(tmp_path / "s"), "--steps", "10", "--out", str(tmp_path / "g.png")])
    assert res.exit_code != 0 and "distilled student" in str(res.exception)
    res = cli.invoke(app, ["bench", str(tmp_path / "s"), "--baseline", str(src), "--out", str(tmp_path / "b"),
                           "--samples", "4", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    base, student = rep["variants"]
    assert (base["steps"], base["nfe"]) == (50, 100) and (student["steps"], student["nfe"]) == (2, 2)


def test_onnx_export_of_a_guidance_student_takes_the_scale_as_an_input(tmp_path):
    pytest.importorskip("onnxruntime")
    from exporters.onnx import OnnxRunner, export_onnx

    s = compress.apply_recipe(randomized_dit(), recipe({"pass": "distill", "objective": "guidance", "steps": 3,
                                                        "batch_size": 4, "lr": 1e-2, "warmup": 0}),
                              show_progress=False)
    d = export_onnx(s, tmp_path / "onnx")
    meta = json.loads((d / "export.json").read_text())
    assert GUIDANCE_INPUT in meta["inputs"] and meta["validation"]["passed"]
    runner = OnnxRunner(d)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), torch.tensor([3, 3])
    a = runner(x, t, {"y": y, GUIDANCE_INPUT: torch.tensor([1.0, 1.0])})
    b = runner(x, t, {"y": y, GUIDANCE_INPUT: torch.tensor([4.0, 4.0])})
    with torch.no_grad():
        ref = get_adapter(s).forward(x, t, {"y": y, GUIDANCE_INPUT: torch.tensor([4.0, 4.0])})
    assert (a - b).abs().max() > 1e-4 and (b - ref).abs().max() < 1e-4


def test_quantization_after_a_few_step_pass_calibrates_along_the_students_schedule():
    from compress.passes import PassContext

    m = randomized_dit()
    ctx = PassContext.for_model(m, compress.passes.CalibrationConfig(**CAL), show_progress=False)
    s = compress.apply_recipe(m, recipe(
        {"pass": "prune_depth", "depth": 3, "method": "last"},
        {"pass": "distill", **OBJECTIVES["progressive"], **ONE},
        {"pass": "quantize", "weights": {"dtype": "int8"}, "activations": {"dtype": "int8"}}), ctx=ctx,
        show_progress=False)
    assert len(s.blocks) == 3 and get_adapter(s).contract().timesteps == [999.0, 499.0]
    rows = ctx.calibration.rows()
    assert sorted(set(rows.t.tolist())) == [499.0, 999.0]  # the student's own two timesteps, not the source's
    assert ctx.calibration.model is not m


@pytest.mark.parametrize("step, needle", [
    ({"objective": "dmd", "student": {"steps": 2}, "dmd": {}}, "dmd.fake_lr_ratio"),
    ({"objective": "dmd", "student": {"steps": 2}}, "field 'dmd'"),
    ({"objective": "guidance", "guidance": {"range": [0.5, 3.0]}}, "guidance.range"),
    ({"objective": "guidance", "guidance": {"scale": 0.5}}, "guidance.scale"),
    ({"objective": "progressive", "student": {"steps": 3}, "progressive": {"start_steps": 16}},
     "progressive.start_steps"),
    ({"objective": "progressive", "student": {"steps": 4}, "progressive": {"start_steps": 4}},
     "progressive.start_steps"),
    ({"objective": "consistency", "student": {"steps": 2, "timesteps": [999, 999]}}, "student.timesteps"),
    ({"objective": "consistency", "student": {"steps": 2, "timesteps": [500, 999]}}, "student.timesteps"),
    ({"objective": "consistency", "student": {"steps": 2, "timesteps": [999, 1200]}}, "student.timesteps"),
    ({"objective": "consistency"}, "field 'student'"),
    ({"objective": "guidance", "student": {"steps": 4}}, "field 'student'"),
    ({"objective": "guidance", "dmd": {"fake_lr_ratio": 1}}, "field 'dmd'"),
    ({"objective": "recovery", "guidance": {}}, "field 'guidance'"),
    ({"objective": "dmd", "student": {"steps": 2}, "dmd": {"fake_lr_ratio": 1, "t_range": [900, 100]}},
     "dmd.t_range"),
    ({"objective": "progressive", "student": {"steps": 2}, "progressive": {"start_steps": 4, "one_step_timestep": 399}},
     "progressive.one_step_timestep"),
    ({"objective": "progressive", "student": {"steps": 1}, "progressive": {"start_steps": 2, "one_step_timestep": 1000}},
     "progressive.one_step_timestep"),
])
def test_bad_distillation_configs_name_the_field(step, needle):
    with pytest.raises(DitCompressError) as e:
        compress.recipe.parse_recipe(recipe({"pass": "distill", **step, **ONE}), "r.yaml")
    assert needle in str(e.value), str(e.value)


def test_a_schedule_an_epsilon_source_cannot_produce_fails_before_training():
    t0 = time.perf_counter()
    with pytest.raises(DitCompressError, match=r"field 'student.timesteps'.*not integers"):
        compress.apply_recipe(randomized_dit(), recipe(
            {"pass": "distill", "objective": "consistency", "student": {"steps": 2, "timesteps": [999.5, 400.25]},
             "steps": 1000, "batch_size": 64}), show_progress=False)
    assert time.perf_counter() - t0 < 20  # refused before 1,000 training steps


KILL_SCRIPT = """
import sys, json, compress
from safetensors.torch import save_file
from compress.io import WorkDir
from tests.conftest import randomized_dit
out, recipe, work, resume = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
m = compress.apply_recipe(randomized_dit(), recipe, show_progress=False, workdir=WorkDir(work), resume=resume)
compress.save(m, out, force=True)
"""


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_student(objective, tmp_path):
    step = {"pass": "distill", **OBJECTIVES[objective], "steps": 60 if objective != "progressive" else 30,
            "batch_size": 4, "warmup": 2, "checkpoint_every": 5, "lr": 1e-3}
    data = recipe(step, calibration={"samples": 4, "steps": 3, "batch_size": 4})
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    work = tmp_path / "w"
    args = [sys.executable, str(script), str(tmp_path / "a"), json.dumps(data), str(work)]
    proc = subprocess.Popen([*args, "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = work / "pass1-distill.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # alive, mid-training, when killed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= done < step["steps"] and not (tmp_path / "a").exists()
    r = subprocess.run([*args, "1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    notes = json.loads((tmp_path / "a" / "manifest.json").read_text())["passes"][0]["notes"]
    assert any("resumed from" in n for n in notes)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), json.dumps(data), str(tmp_path / "w2"), "0"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = compress.load(tmp_path / "a"), compress.load(tmp_path / "b")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_resuming_from_another_objectives_checkpoint_is_refused(tmp_path):
    from compress.io import WorkDir

    work = tmp_path / "w"
    dmd = recipe({"pass": "distill", **OBJECTIVES["dmd"], "steps": 2, "batch_size": 2, "checkpoint_every": 1})
    compress.apply_recipe(randomized_dit(), dmd, show_progress=False, workdir=WorkDir(work))
    assert (work / "pass1-distill.pt").exists()
    other = recipe({"pass": "distill", **OBJECTIVES["consistency"], "steps": 2, "batch_size": 2})
    with pytest.raises(DitCompressError, match="another training run.*distill-dmd"):
        compress.apply_recipe(randomized_dit(), other, show_progress=False, workdir=WorkDir(work), resume=True)



def test_resuming_a_progressive_round_with_another_teacher_grid_is_refused(tmp_path):
    """Same pass, same objective, same training settings: only progressive.start_steps (the teacher's grid) differs."""
    from compress.io import WorkDir

    work = tmp_path / "w"
    step = {"pass": "distill", "objective": "progressive", "student": {"steps": 2}, "steps": 2, "batch_size": 2,
            "checkpoint_every": 1}
    compress.apply_recipe(randomized_dit(), recipe({**step, "progressive": {"start_steps": 4}}), show_progress=False,
                          workdir=WorkDir(work))
    with pytest.raises(DitCompressError, match="another training run.*distill-progressive"):
        compress.apply_recipe(randomized_dit(), recipe({**step, "progressive": {"start_steps": 8}}),
                              show_progress=False, workdir=WorkDir(work), resume=True)


FSDP_SCRIPT = """
import sys, json, torch, torch.distributed as dist
dist.init_process_group("gloo")
import compress
from compress.io import WorkDir
from tests.conftest import randomized_dit
recipe = json.loads(sys.argv[1])
sizes = []
import compress.training as tr
orig = tr.Trainer.wrap
def spy(self, module, blocks=()):
    out = orig(self, module, blocks)
    sizes.append([type(module).__name__, sum(p.to_local().numel() for p in module.parameters()),
                  sum(p.numel() for p in module.parameters())])
    return out
tr.Trainer.wrap = spy
m = compress.apply_recipe(randomized_dit(), recipe, show_progress=False, workdir=WorkDir(sys.argv[2]))
w = next(iter(m.state_dict().values()))
# one write per line: both ranks share torchrun's stdout pipe, and print() of several pieces can interleave
sys.stdout.write(f"rank {dist.get_rank()} {json.dumps(sizes)} {type(w).__name__} ok\\n")
sys.stdout.flush()
if dist.get_rank() == 0:
    compress.save(m, sys.argv[3])
dist.destroy_process_group()
"""


def run_fsdp(step: dict, tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    """``FSDP_SCRIPT`` on two gloo ranks with a one-pass recipe (work dir ``w``, artifact ``a``); must succeed."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    return run_torchrun([str(script), json.dumps(recipe(step)), str(tmp_path / "w"), str(tmp_path / "a")], port)


def test_fsdp2_shards_student_fake_score_and_optimiser_over_two_ranks(tmp_path):
    step = {"pass": "distill", **OBJECTIVES["dmd"], "steps": 3, "batch_size": 2, "checkpoint_every": 2,
            "parallel": "fsdp"}
    r = run_fsdp(step, tmp_path, 29533)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("rank")]
    assert len(lines) == 2 and all(ln.endswith("Tensor ok") for ln in lines)
    sizes = json.loads(lines[0].split(" ", 2)[2].rsplit(" ", 2)[0])
    assert [name for name, _, _ in sizes] == ["FSDPTrainee", "FSDP_Critic", "FSDPTrainee"]  # fake, critic, student
    for name, local, full in sizes:  # each rank holds about half of every network's parameters
        assert abs(local / full - 0.5) < 0.05, (name, local, full)
    s = compress.load(tmp_path / "a")  # the sharded student came back as a plain, saveable model
    assert get_adapter(s).contract().timesteps == [999.0, 499.0]
    ckpt = torch.load(tmp_path / "w" / "pass1-distill.pt", weights_only=True)
    assert ckpt["parallel"] and ckpt["step"] == 3 and "fake_opt" in ckpt["hooks"]


def test_fsdp2_dmd_without_a_gan_head_checkpoints_its_fake_score_optimiser(tmp_path):
    """No critic: the fake score's last forward is a no-grad one, after which FSDP2 leaves a root gathered; the
    checkpoint must still find the optimiser's parameters (it raised KeyError before)."""
    dmd = {**OBJECTIVES["dmd"]["dmd"], "gan": 0.0}
    step = {"pass": "distill", **OBJECTIVES["dmd"], "dmd": dmd, "steps": 2, "batch_size": 2, "checkpoint_every": 1,
            "parallel": "fsdp"}
    r = run_fsdp(step, tmp_path, 29534)
    ckpt = torch.load(tmp_path / "w" / "pass1-distill.pt", weights_only=True)
    assert ckpt["parallel"] and ckpt["step"] == 2 and ckpt["hooks"]["fake_opt"]["state"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dmd_on_a_flow_source_trains_stably(family):
    """Flow (velocity) sources: every DMD loss stays finite and the student's samples stay in the source's range
    (the failure of DMD ports that treat a velocity model's output as epsilon)."""
    from compress.models.provenance import provenance

    src = tiny_diffusers_model(family)
    step = {"pass": "distill", **OBJECTIVES["dmd"], "steps": 12, "batch_size": 4, "lr": 1e-3, "warmup": 2}
    s = compress.apply_recipe(src, recipe(step), show_progress=False)
    note = next(n for n in provenance(s)["passes"][-1]["notes"] if "mean losses" in n)
    values = [float(v.split()[-1].rstrip(",")) for v in note.split("mean losses ")[1].split(", ")]
    assert len(values) >= 4 and all(v == v and abs(v) < 1e3 for v in values), note
    student = generate(s, 4, seed=0).images
    source = generate(src, 4, seed=0, contract=get_adapter(src).contract().with_overrides(steps=8)).images
    assert torch.isfinite(student).all() and student.std() < 5 * source.std()


def test_a_one_step_student_trained_at_a_timestep_label_is_called_and_sampled_at_that_label(monkeypatch):
    from compress.distillation import progressive

    seen = []
    real = progressive.ProgressiveRound.student_call
    monkeypatch.setattr(progressive.ProgressiveRound, "student_call",
                        lambda self, module, x, t, *a: seen.append((tuple(self.teacher_grid), sorted(set(t.tolist()))))
                        or real(self, module, x, t, *a))
    step = {"objective": "progressive", "student": {"steps": 1}, "progressive": {"start_steps": 4, "one_step_timestep": 399}}
    s = compress.apply_recipe(randomized_dit(), recipe({"pass": "distill", **step, **ONE}), show_progress=False)
    # round 1 (4 -> 2 steps) at the grid's own points; round 2's single call at the label, on the grid's first input
    assert seen[0][0] == (999.0, 749.0, 499.0, 249.0) and set(seen[0][1]) <= {999.0, 499.0}
    assert seen[1] == ((999.0, 499.0), [399.0])
    c = get_adapter(s).contract()
    assert c.timesteps == [399.0] and c.nfe == 1 and c.sampler == "tcd"
    calls = []
    hook = s.register_forward_pre_hook(lambda mod, args: calls.append(args[1].reshape(-1)[0].item()))
    g = generate(s, 2, seed=0)
    hook.remove()
    assert torch.isfinite(g.images).all() and calls == [399.0]


def test_a_timestep_label_on_a_flow_source_is_refused_naming_the_field():
    step = {"objective": "progressive", "student": {"steps": 1}, "progressive": {"start_steps": 2, "one_step_timestep": 399}}
    with pytest.raises(DitCompressError, match="progressive.one_step_timestep"):
        compress.apply_recipe(tiny_diffusers_model("sd3"), recipe({"pass": "distill", **step, **ONE}), show_progress=False)
