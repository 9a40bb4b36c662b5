"""Quantization side by side on the reference model: dit-compress formats vs NNCF and ModelOpt, and ablations.

    python -m benchmarks.quantization --part main --samples 1000 --out benchmarks/results/quantization
    python -m benchmarks.quantization --part ablation --samples 300 --out benchmarks/results/quantization

Every variant is calibrated on the *same* recorded trajectories (one PassContext) and sampled from the
same noise and labels as the source, so PSNR/SSIM measure fidelity to the source and FD / class
accuracy measure quality against the real digits. Speed is not measured here: on this CPU the formats
run as fake quantization (speed lives in the export benchmarks and the GPU runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from compress import apply_recipe, load_model, load_recipe
from compress.bench import BenchConfig, Variant, run_bench
from compress.models.reference import REFERENCE_CFG
from compress.passes import CalibrationConfig, PassContext
from compress.recipe import parse_recipe, with_defaults

DEFAULT_OUT = Path("benchmarks/results/quantization")
MAIN = ["w8a8-int8", "w8a8-int8-nncf", "modelopt-int8-smoothquant", "fp8", "w4a8-svd", "mixed-w4a8-w8a8",
        "int4-weights-g32"]
# dit-compress vs NNCF vs ModelOpt, and a sensitivity plan vs the uniform plan of the same size
SIDE_BY_SIDE = ["w8a8-int8", "w8a8-int8-nncf", "modelopt-int8-smoothquant", "w4a8-svd", "mixed-at-w4a8-svd-size"]
OTHERS = ["w8a8-int8-dynamic", "fp8-per-tensor-dynamic", "w4a8", "int8-weights"]

W8A8 = {"pass": "quantize", "weights": {"dtype": "int8"}, "activations": {"dtype": "int8"}}
W4A8 = {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 32}, "activations": {"dtype": "int8"}}
ABLATION = {
    "w8a8 RTN (no smoothing, no bias corr.)": {**W8A8, "bias_correction": False},
    "w8a8 + smoothing": {**W8A8, "smoothing": {}, "bias_correction": False},
    "w8a8 + smoothing + bias corr. (= w8a8-int8)": {**W8A8, "smoothing": {}},
    "w8a8 + timestep-aware smoothing": {**W8A8, "smoothing": {"timestep_aware": True}},
    "w8a8 + timestep-aware + 4 timestep groups": {**W8A8, "activations": {"dtype": "int8", "timestep_groups": 4},
                                                  "smoothing": {"timestep_aware": True}},
    "w4a8 RTN": {**W4A8, "bias_correction": False},
    "w4a8 + smoothing": {**W4A8, "smoothing": {}},
    "w4a8 + smoothing + low-rank r16": {**W4A8, "smoothing": {}, "low_rank": {"rank": 16}},
    "w4a8 + ts-aware + 4 groups + low-rank (= w4a8-svd)": {
        **W4A8, "activations": {"dtype": "int8", "timestep_groups": 4}, "smoothing": {"timestep_aware": True},
        "low_rank": {"rank": 16}},
}


# sensitivity plans: name -> (candidate formats, uniform format whose size is the budget)
SENSITIVITY_PLANS = {
    "mixed-w4a8-w8a8": (["w4a8", "w8a8-int8"], "w8a8-int8"),
    "mixed-at-w4a8-svd-size": (["w4a8", "w4a8-svd", "w8a8-int8"], "w4a8-svd"),
}


def _recipe_variant(name: str, model, ctx) -> Variant:
    return Variant(name, apply_recipe(model, load_recipe(name), ctx=ctx, show_progress=False), recipe=name)


def _sensitivity_variant(name: str, model, ctx, formats: list[str], budget_format: str) -> Variant:
    """A ``dit-compress sensitivity`` plan under the size of ``budget_format`` applied uniformly."""
    from compress.sensitivity import measure_sensitivity

    sens = measure_sensitivity(model, formats, calibration=ctx.calibration.config)
    plan = sens.plan(sens.plan_size(sens.uniform(budget_format)))
    data = sens.recipe(plan, name, f"sensitivity plan at the size of uniform {budget_format}")
    data["defaults"] = {"calibration": ctx.calibration.config.model_dump()}
    q = apply_recipe(model, parse_recipe(data), ctx=ctx, show_progress=False)
    return Variant(name, q, recipe=f"sensitivity plan (budget: uniform {budget_format} size)",
                   info={"plan": {f: sum(x == f for x in plan.values()) for f in sens.formats}})


def _variant(name: str, model, ctx, console) -> Variant | None:
    t0 = time.perf_counter()
    if name == "modelopt-int8-smoothquant":
        try:
            from benchmarks.competitors import modelopt_int8_smoothquant

            v = Variant(name, modelopt_int8_smoothquant(model, ctx), recipe="ModelOpt INT8_SMOOTHQUANT_CFG")
        except ImportError:
            console.print("[yellow]nvidia-modelopt not installed: ModelOpt row skipped[/]")
            return None
    elif name == "w8a8-int8-nncf":
        try:
            from benchmarks.competitors import nncf_int8

            v = Variant(name, nncf_int8(model, ctx), recipe="NNCF nncf.quantize (TRANSFORMER), same layers")
        except ImportError:
            console.print("[yellow]nncf not installed: NNCF row skipped[/]")
            return None
    elif name in SENSITIVITY_PLANS:
        formats, budget = SENSITIVITY_PLANS[name]
        v = _sensitivity_variant(name, model, ctx, formats, budget)
    else:
        v = _recipe_variant(name, model, ctx)
    v.info["apply_seconds"] = round(time.perf_counter() - t0, 1)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["main", "side-by-side", "others", "ablation", "calibration-size"],
                   default="main")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=REFERENCE_CFG)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--variants", default="", help="main / side-by-side / others: only these of the part's "
                                                  "variants (comma list; recipe names outside it are allowed)")
    a = p.parse_args()
    console = Console(width=180)
    model = load_model("reference")
    cal = CalibrationConfig(samples=a.calib_samples, steps=a.calib_steps)
    ctx = PassContext.for_model(model, cal, show_progress=False)
    variants: list[Variant] = []
    if a.part in ("main", "side-by-side", "others"):
        names = {"main": MAIN, "side-by-side": SIDE_BY_SIDE, "others": OTHERS}[a.part]
        for name in ([n for n in a.variants.split(",") if n] or names):
            v = _variant(name, model, ctx, console)
            if v is not None:
                variants.append(v)
                console.print(f"prepared {name} in {v.info['apply_seconds']} s")
    elif a.part == "ablation":
        for name, spec in ABLATION.items():
            r = parse_recipe({"name": "ablation", "description": name, "passes": [spec],
                              "defaults": {"calibration": cal.model_dump()}})
            variants.append(Variant(name, apply_recipe(model, r, ctx=ctx, show_progress=False), recipe=json.dumps(spec)))
    else:  # calibration-size
        for n in (16, 64, 256):
            c = cal.model_copy(update={"samples": n})
            r = with_defaults(load_recipe("w8a8-int8"), calibration=c)
            own = PassContext.for_model(model, c, show_progress=False)  # its own trajectories
            variants.append(Variant(f"w8a8-int8, {n} calibration images", apply_recipe(model, r, ctx=own,
                                                                                        show_progress=False),
                                    recipe="w8a8-int8"))
    cfg = BenchConfig(samples=a.samples, steps=a.steps, cfg_scale=a.cfg, speed=False, grid=a.part == "main")
    out = a.out / a.part
    command = (f"python -m benchmarks.quantization --part {a.part} --samples {a.samples} --steps {a.steps} "
               f"--cfg {a.cfg} --calib-samples {a.calib_samples} --calib-steps {a.calib_steps}"
               + (f" --variants {a.variants}" if a.variants else "") + (f" --out {a.out}" if a.out != DEFAULT_OUT else ""))
    run_bench(Variant("source", model), variants, cfg, out, console=console,
              extra={"calibration": cal.model_dump(), "command": command})


if __name__ == "__main__":
    main()
