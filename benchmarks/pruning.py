"""Depth and width pruning with recovery distillation on the reference model, plus DiT-B/2 speed.

    python -m benchmarks.pruning --part depth --samples 1000      # 12 -> 6 blocks, every selection method
    python -m benchmarks.pruning --part width --samples 1000      # 30% fewer parameters
    python -m benchmarks.pruning --part speed                     # DiT-B/2 256 px per-call latency

Every depth variant gets the same recovery budget (the ``distill`` pass of ``prune-depth-half.yaml``, which
``prune-depth-half-learned.yaml`` repeats); only the selection method differs. Trained variants are saved under ``runs/pruning/<name>`` and their
training checkpoints under ``runs/pruning/<name>.work``: re-running the command resumes a killed run
and reuses finished artifacts. The recovery trains on the teacher's trajectories and, for the
diffusion loss, on the real digits (the reference model's training data, shipped in scikit-learn; the
recipes' ``data.real: auto``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

import compress
from compress.bench import BenchConfig, Variant, run_bench
from compress.io import WorkDir
from compress.models.provenance import provenance
from compress.models.reference import REFERENCE_CFG, REFERENCE_STEPS
from compress.passes import CalibrationConfig, PassContext
from compress.recipe import load_recipe, parse_recipe

RUNS = Path("runs/pruning")  # --runs
# name -> (recipe, selection method swapped in): the same recovery budget for every one
DEPTH_METHODS = {"every-other": ("prune-depth-half", "uniform"), "drop-last": ("prune-depth-half", "last"),
                 "influence": ("prune-depth-half", "influence"), "remove-one": ("prune-depth-half", "remove_one"),
                 "learned": ("prune-depth-half-learned", "learned")}


def recipe_with(name: str, steps: int | None, first_pass: dict | None = None) -> dict:
    """A bundled recipe as a dict, as shipped (its recovery uses the digits through ``data.real: auto``), with
    optionally another selection method or recovery length."""
    data = load_recipe(name).model_dump(mode="json", by_alias=True)
    if first_pass:
        data["passes"][0].update(first_pass)
    for p in data["passes"]:
        if p["pass"] == "distill" and steps is not None:
            p["steps"] = steps
    return data


def trained(name: str, recipe: dict, model, ctx: PassContext, console: Console, runs: Path | None = None) -> Variant:
    """Apply (or resume, or reload) one variant's recipe under ``runs`` (default ``RUNS``); report its pass log."""
    runs = runs or RUNS
    out = runs / name
    if not out.exists():
        ctx.run.workdir, ctx.run.resume = WorkDir(runs / f"{name}.work"), True
        t0 = time.perf_counter()
        student = compress.apply_recipe(model, parse_recipe(recipe, name), ctx=ctx, console=console,
                                        show_progress=False)
        compress.save(student, out)
        console.print(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
    model = compress.load(out)
    passes = [{k: p[k] for k in ("pass", "params_after", "seconds", "notes")} for p in provenance(model)["passes"]]
    return Variant(name, model, recipe=recipe["name"], info={"passes": passes})


def speed_part(console: Console, out: Path) -> dict:
    """Per-call latency of DiT-B/2 at 256 px: source vs depth-halved vs 30%-width (weights do not matter)."""
    src = compress.load_model("DiT-B/2")
    ctx = PassContext.for_model(src, CalibrationConfig(samples=2, steps=2), show_progress=False)
    depth = compress.apply_recipe(src, {"name": "depth", "description": "every other block", "passes": [
        {"pass": "prune_depth", "depth": 0.5, "method": "uniform"}]}, ctx=ctx, show_progress=False)
    width = compress.apply_recipe(src, {"name": "width", "description": "30% fewer parameters", "passes": [
        {"pass": "prune_width", "params": 0.3, "importance": "magnitude"}]}, ctx=ctx, show_progress=False)
    cfg = BenchConfig(samples=1, steps=REFERENCE_STEPS, quality=False, grid=False, speed_batch=4, warmup=2,
                      repeats=10)
    return run_bench(Variant("DiT-B/2", src), [Variant("depth 12->6", depth, recipe="prune_depth uniform 0.5"),
                                                Variant("width -30% params", width, recipe="prune_width params 0.3")],
                     cfg, out, console=console, extra={"command": "python -m benchmarks.pruning --part speed"})


def main() -> None:
    global RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["depth", "width", "speed"], default="depth")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--recovery-steps", type=int, default=None, help="override the recipes' distill steps")
    p.add_argument("--methods", default=",".join(DEPTH_METHODS), help="depth: which selection methods")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pruning"))
    p.add_argument("--runs", type=Path, default=Path("runs/pruning"), help="where trained variants and checkpoints are kept")
    a = p.parse_args()
    RUNS = a.runs
    torch.set_num_threads(1)
    console = Console(width=180)
    out = a.out / a.part
    command = f"python -m benchmarks.pruning --part {a.part} --samples {a.samples}"
    if a.recovery_steps:
        command += f" --recovery-steps {a.recovery_steps}"
    if a.part == "speed":
        speed_part(console, out)
    else:
        model = compress.load_model("reference")
        recipe = load_recipe("prune-depth-half" if a.part == "depth" else "prune-width-30")
        ctx = PassContext.for_model(model, recipe.defaults.calibration, show_progress=False)
        variants = []
        if a.part == "depth":
            if a.methods != ",".join(DEPTH_METHODS):
                command += f" --methods {a.methods}"
            for name in a.methods.split(","):
                recipe_name, method = DEPTH_METHODS[name]
                data = recipe_with(recipe_name, a.recovery_steps, {"method": method})
                data["name"] = f"{recipe_name}-{name}"
                variants.append(trained(f"depth-{name}", data, model, ctx, console))
            nr = recipe_with("prune-depth-half", None, {"method": "uniform"})
            nr["passes"] = nr["passes"][:1]
            nr["name"] = "every-other-no-recovery"
            variants.append(Variant("every-other, no recovery", compress.apply_recipe(model, parse_recipe(nr), ctx=ctx,
                                                                                      show_progress=False)))
        else:
            variants.append(trained("width-30", recipe_with("prune-width-30", a.recovery_steps), model, ctx, console))
        cfg = BenchConfig(samples=a.samples, steps=REFERENCE_STEPS, cfg_scale=REFERENCE_CFG, speed_batch=64)
        run_bench(Variant("source", model), variants, cfg, out, console=console, extra={"command": command})


if __name__ == "__main__":
    main()
