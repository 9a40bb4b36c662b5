"""Few-step students of the reference model: quality against the source and against training-free solvers.

    python -m benchmarks.few_step --part train --only few-step-4   # train (or resume) students only, in parallel
    python -m benchmarks.few_step --part students --samples 1000   # bundled recipes applied, one bench run
    python -m benchmarks.few_step --part solvers --samples 1000    # the source with DPM-Solver++ / UniPC at 1-4 calls
    python -m benchmarks.few_step --part seeds --samples 1000      # few-step-4 trained with three seeds
    python -m benchmarks.few_step --part memory                    # one training step per objective on DiT-B/2

Every student is the bundled recipe as shipped, applied with ``compress.apply_recipe`` exactly as
``dit-compress apply RECIPE --model reference`` does; trained artifacts are kept under ``runs/few-step/``
(re-running resumes or reuses them). Quality: 1,000 samples, the same labels and noise as the source (50
DDIM steps, CFG 1.5 = 100 calls), each student sampled by its own contract. The ``students`` part also times
every variant in the same bench run (ms per image): run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import compress
from compress.bench import BenchConfig, Variant, run_bench
from compress.io import WorkDir, atomic_write_text
from compress.machine import machine_info
from compress.models.provenance import provenance

RUNS = Path("runs/few-step")
DEFAULT_OUT = Path("benchmarks/results/few-step")
# table rows: name -> (bundled recipe, overrides of its last distill pass)
STUDENTS = {
    "guidance-distill": ("guidance-distill", {}),
    "few-step-4": ("few-step-4", {}),
    # one-step's schedule stopped one round earlier (its last round's timestep label is for one step only)
    "two-step": ("one-step", {"student": {"steps": 2}, "progressive": {"start_steps": 32}}),
    "one-step": ("one-step", {}),
    "prune-few-step-4": ("prune-few-step-4", {}),
}


def recipe_data(name: str, overrides: dict, seed: int | None = None) -> dict:
    data = compress.load_recipe(name).model_dump(mode="json", by_alias=True, exclude_none=True)
    last = [p for p in data["passes"] if p["pass"] == "distill"][-1]
    last.update(overrides)
    if seed is not None:
        data["defaults"]["seed"] = seed
        for p in data["passes"]:
            if p["pass"] == "distill":
                p["seed"] = seed
    return data


# two-step is one-step's schedule stopped a round earlier: its four rounds are exactly one-step's first four
# (same settings and teacher grids; the checkpoints' keys check it), so it resumes them instead of retraining.
SHARED_ROUNDS = {"two-step": ("one-step", 4)}


def _share_rounds(label: str, console: Console) -> None:
    other, rounds = SHARED_ROUNDS[label]
    src, dst = RUNS / f"{other}.work", RUNS / f"{label}.work"
    if dst.exists() or not src.exists():
        return
    WorkDir(dst)
    for r in range(1, rounds + 1):
        name = "pass1-distill.pt" if r == 1 else f"pass1-distill-round{r}.pt"
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    console.print(f"{label}: resuming {other}'s first {rounds} rounds from {src}")


def trained(label: str, data: dict, console: Console) -> Variant:
    """Apply (or resume, or reuse) a recipe on the reference; the variant carries its training cost."""
    out = RUNS / label
    if not out.exists() and label in SHARED_ROUNDS:
        _share_rounds(label, console)
    if not out.exists():
        t0 = time.perf_counter()
        student = compress.apply_recipe(compress.load_model("reference"), data, console=console, show_progress=False,
                                        workdir=WorkDir(RUNS / f"{label}.work"), resume=True)
        compress.save(student, out)
        console.print(f"{label}: trained in {time.perf_counter() - t0:.0f} s")
    model = compress.load(out)
    passes = provenance(model)["passes"]
    cost = [{"pass": p["pass"], "objective": p["config"].get("objective"), "steps": p["config"].get("steps"),
             "batch_size": p["config"].get("batch_size"), "cpu_minutes": round(p["seconds"] / 60, 1),
             "notes": p["notes"]} for p in passes]
    return Variant(label, model, recipe=data["name"], info={"training": cost})


def train_part(a, console: Console) -> None:
    """Train (or resume) the students only, e.g. several in parallel processes before one ``students`` run."""
    for label, (r, o) in STUDENTS.items():
        if a.only is None or label in a.only.split(","):
            trained(label, recipe_data(r, o), console)


def students_part(a, console: Console) -> None:
    variants = [trained(label, recipe_data(r, o), console) for label, (r, o) in STUDENTS.items()
                if a.only is None or label in a.only.split(",")]
    base = Variant("reference (50 steps, CFG 1.5)", compress.load_model("reference"))
    cfg = BenchConfig(samples=a.samples, speed_batch=a.speed_batch, repeats=a.repeats)
    command = (f"python -m benchmarks.few_step --part students --samples {a.samples}"
               + (f" --only {a.only}" if a.only else "") + (f" --out {a.out}" if a.out != DEFAULT_OUT else ""))
    run_bench(base, variants, cfg, a.out / "students", console=console, extra={"command": command})


SOLVERS = [("dpm", 1, 1.0), ("unipc", 1, 1.0), ("dpm", 2, 1.0), ("unipc", 2, 1.0), ("dpm", 1, 1.5),
           ("unipc", 1, 1.5), ("dpm", 4, 1.0), ("unipc", 4, 1.0), ("dpm", 2, 1.5), ("unipc", 2, 1.5)]


def solvers_part(a, console: Console) -> None:
    """The source itself with the best training-free solvers diffusers offers, at 1, 2 and 4 calls per image."""
    model = compress.load_model("reference")
    variants = []
    for sampler, steps, cfg in SOLVERS:
        v = Variant(f"{sampler} {steps} step{'s' * (steps > 1)}, CFG {cfg}", model, recipe="training-free solver")
        v.runner = _Resampled(v.runner, sampler, steps, cfg)
        variants.append(v)
    base = Variant("reference (50 steps, CFG 1.5)", model)
    command = f"python -m benchmarks.few_step --part solvers --samples {a.samples}"
    run_bench(base, variants, BenchConfig(samples=a.samples, speed=False), a.out / "solvers", console=console,
              extra={"command": command})


class _Resampled:
    """A runner sampled with another solver / step count / guidance (the contract overridden, nothing else)."""

    def __init__(self, inner, sampler: str, steps: int, cfg: float):
        self.inner = inner
        self.contract = inner.contract.with_overrides(sampler=sampler, steps=steps, guidance_scale=cfg)
        for k in ("device", "module", "params", "size_bytes", "recipe"):
            setattr(self, k, getattr(inner, k))
        self.description = f"{inner.description}, {sampler}"

    def __call__(self, x, t, cond):
        return self.inner(x, t, cond)


def seeds_part(a, console: Console) -> None:
    variants = [trained(f"few-step-4-seed{s}", recipe_data("few-step-4", {}, seed=s), console) for s in (0, 1, 2)]
    base = Variant("reference (50 steps, CFG 1.5)", compress.load_model("reference"))
    command = f"python -m benchmarks.few_step --part seeds --samples {a.samples}"
    rep = run_bench(base, variants, BenchConfig(samples=a.samples, speed=False), a.out / "seeds", console=console,
                    extra={"command": command})
    fds = [v["quality"]["fd"] for v in rep["variants"][1:]]
    console.print(f"FD over seeds: {fds}; spread (max - min) / min = {(max(fds) - min(fds)) / min(fds):.1%}")


MEMORY_STEP = {"steps": 1, "batch_size": 2, "warmup": 0, "checkpoint_every": 1}
MEMORY_OBJECTIVES = {
    "recovery": {"objective": "recovery"},
    "guidance": {"objective": "guidance"},
    "progressive": {"objective": "progressive", "student": {"steps": 4}, "progressive": {"start_steps": 8}},
    "consistency": {"objective": "consistency", "student": {"steps": 4}},
    "dmd": {"objective": "dmd", "student": {"steps": 4}, "dmd": {"fake_lr_ratio": 1.0, "fake_updates": 1}},
}
MEMORY_SCRIPT = """
import json, sys, torch
import compress
from compress.io import WorkDir
from compress.machine import peak_rss_mb
recipe, work = json.loads(sys.argv[1]), sys.argv[2]
import torch.distributed as dist
if "RANK" in __import__("os").environ:
    dist.init_process_group("gloo")
model = compress.load_model("DiT-B/2")
for n, p in model.named_parameters():  # DiT's zero init makes every block an identity: draw real weights
    if n != "pos_embed":
        torch.nn.init.normal_(p, std=0.02)
before = peak_rss_mb()
compress.apply_recipe(model, recipe, show_progress=False, workdir=WorkDir(work))
print(json.dumps({"rank": dist.get_rank() if dist.is_initialized() else 0, "peak_rss_mb": peak_rss_mb(),
                  "after_load_mb": before}), flush=True)
"""


def memory_part(a, console: Console) -> None:
    """One training step per objective on DiT-B/2 (random weights), each in a fresh process: peak RSS; and DMD
    under FSDP2 with two ranks (per-rank peak). Calibration is tiny: memory is the models and the step."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="fewstep-mem-"))
    script = tmp / "step.py"
    script.write_text(MEMORY_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(Path.cwd())}
    rows = {}
    runs = [(k, v, 1) for k, v in MEMORY_OBJECTIVES.items()] + [("dmd", MEMORY_OBJECTIVES["dmd"], 2),
                                                                ("guidance", MEMORY_OBJECTIVES["guidance"], 2)]
    for name, obj, ranks in runs:
        recipe = {"name": name, "description": name, "defaults": {"calibration": {"samples": 1, "steps": 2,
                                                                                  "batch_size": 1}},
                  "passes": [{"pass": "distill", **obj, **MEMORY_STEP, **({"parallel": "fsdp"} if ranks > 1 else {}),
                              **({"dmd": {**obj["dmd"], "regression_pairs": 1}} if "dmd" in obj else {})}]}
        work = tmp / f"{name}-{ranks}"
        cmd = [sys.executable, str(script), json.dumps(recipe), str(work)]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   "29561", *cmd[1:]]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} x{ranks} failed:\n{r.stderr[-3000:]}")
        per_rank = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        key = f"{name}" + (f" FSDP2 x{ranks}" if ranks > 1 else "")
        rows[key] = {"peak_rss_mb_per_rank": [round(x["peak_rss_mb"]) for x in sorted(per_rank, key=lambda x: x["rank"])],
                     "after_load_mb": round(per_rank[0]["after_load_mb"]), "seconds": round(time.perf_counter() - t0)}
        console.print(key, rows[key])
    report = {"what": "one training step (batch 2) per objective on DiT-B/2 (130M parameters, 256 px), fresh process "
                      "each; peak RSS includes Python, torch, the frozen teacher, the student (and DMD's fake score), "
                      "gradients and AdamW state", "rows": rows, "machine": machine_info(),
              "command": "python -m benchmarks.few_step --part memory"}
    atomic_write_text(a.out / "memory_DiT-B-2.json", json.dumps(report, indent=2) + "\n")


def main() -> None:
    global RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["students", "train", "solvers", "seeds", "memory"], default="students")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--only", default=None, help="students: comma-separated subset of the rows")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="memory: torch threads per process")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    RUNS = a.runs
    torch.set_num_threads(1)
    console = Console(width=180)
    {"students": students_part, "train": train_part, "solvers": solvers_part, "seeds": seeds_part, "memory": memory_part}[a.part](a, console)


if __name__ == "__main__":
    main()
