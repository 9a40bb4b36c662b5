"""Dense-to-MoE: quality on the reference model, expert utilisation, and DiT-B/2 speed (PyTorch and ONNX Runtime).

    python -m benchmarks.moe --part quality --samples 1000   # moe-top2 vs the source (+ the w8a8 composite)
    python -m benchmarks.moe --part quality --recipe moe-top1 --samples 1000 --out benchmarks/results/moe/top1
    python -m benchmarks.moe --part ablation --samples 0 --calib-samples 16   # settings, no recovery
    python -m benchmarks.moe --part speed                    # DiT-B/2 256 px, batch 4: dense vs MoE, torch + ORT

``quality`` trains ``moe-top2`` (``--recipe moe-top1`` for the other bundled layout, in ``quality`` and ``speed``)
or reuses ``runs/moe/moe-top2``, e.g. written by ``dit-compress apply moe-top2 --model reference --out
runs/moe/moe-top2`` (a killed run resumes from ``runs/moe/moe-top2.work``),
applies the composite's quantization pass to it (``moe-top2-w8a8`` is exactly ``moe-top2`` followed by that
pass, on the same calibration trajectories), and benchmarks both against the source on the same seeds.
It then routes the calibration trajectories (and held-out ones, another seed) through the artifact and
writes the tokens per expert per block and timestep range (``utilisation.json``, ``utilisation.png``).

``speed`` converts the preset (random weights: speed does not depend on them; the balance bias is set on
calibration tokens, so experts get realistic, even loads) without training, exports dense and MoE to
ONNX (validated), and times all four in one interleaved ``bench`` run. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

import compress
from benchmarks.pruning import recipe_with, trained
from compress.bench import BenchConfig, Variant, run_bench, variant_from_source
from compress.bench.report import write_json
from compress.machine import machine_info
from compress.models.reference import REFERENCE_CFG, REFERENCE_STEPS
from compress.passes import CalibrationConfig, PassContext
from compress.passes.moe import activated_fraction, load_ratio, mlp_params, moe_layers, routing_statistics
from compress.models.adapters import get_adapter
from compress.recipe import load_recipe

T_EDGES = [250.0, 500.0, 750.0]  # timestep ranges of the utilisation report: [0,250) [250,500) [500,750) [750,1000]
RANGES = ["t 0-250", "t 250-500", "t 500-750", "t 750-1000"]


def dense_mlp_params(model) -> int:
    return sum(mlp_params(m) for b in get_adapter(model).blocks() for m in b.mlps)


def utilisation(model, rows) -> dict:
    """Per MoE layer: tokens per expert per timestep range, and the busiest expert over the mean."""
    counts = routing_statistics(model, rows, T_EDGES)
    out = {}
    for name, c in counts.items():
        mean = c.sum(1, keepdim=True).clamp_min(1) / c.shape[1]
        out[name] = {"tokens": c.tolist(), "busiest_over_mean": round(load_ratio(c), 3),
                     "busiest_over_mean_per_range": [round(float(x), 3) for x in (c / mean).amax(1)]}
    return out


def held_out_rows(model, samples: int = 64):
    """Trajectories the passes never saw (seed 1): ``samples`` images x 50 steps at the reference's guidance."""
    return PassContext.for_model(model, CalibrationConfig(samples=samples, steps=50, cfg_scale=REFERENCE_CFG), seed=1,
                                 show_progress=False).calibration.rows()


@torch.no_grad()
def output_error(model, source, rows, n: int = 2048) -> float:
    """Relative MSE of ``model``'s prediction to ``source``'s on ``rows`` (how far a conversion starts from dense)."""
    a, b = get_adapter(model), get_adapter(source)
    err = power = 0.0
    for x, t, c in rows.spread(n).batches(128):
        ref = b.forward(x, t, c)
        err += float((a.forward(x, t, c) - ref).pow(2).sum())
        power += float(ref.pow(2).sum())
    return err / power


def heatmap(util: dict, path: Path, title: str) -> None:
    """Load relative to the mean (1 = perfectly even), blocks x experts, one panel per timestep range + all."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(util)
    per_range = torch.tensor([util[n]["tokens"] for n in names])  # (layers, ranges, experts)
    panels = [("all timesteps", per_range.sum(1))] + [(r, per_range[:, i]) for i, r in enumerate(RANGES)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.32 * len(names) + 1.8), sharey=True)
    for ax, (label, c) in zip(axes, panels):
        rel = c / (c.sum(1, keepdim=True).clamp_min(1) / c.shape[1])
        im = ax.imshow(rel.numpy(), cmap="viridis", vmin=0, vmax=2, aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(c.shape[1]))
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels([n.replace(".mlp", "") for n in names], fontsize=7)
    fig.colorbar(im, ax=axes, label="tokens / mean tokens per expert", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


DEFAULT_OUT = Path("benchmarks/results/moe")


def recipe_and_out_flags(a) -> str:
    """The ``--recipe`` / ``--out`` flags of this invocation that differ from their defaults (for ``command``)."""
    recipe = f" --recipe {a.recipe}" if a.recipe != "moe-top2" else ""
    return recipe + (f" --out {a.out}" if a.out != DEFAULT_OUT else "")


def quality_part(a, console: Console) -> None:
    model = compress.load_model("reference")
    recipe = load_recipe(a.recipe)
    ctx = PassContext.for_model(model, recipe.defaults.calibration, show_progress=False)
    data = recipe_with(a.recipe, None)
    # another expert layout than the recipe's gets its own name and artifact
    layout = {k: v for k, v in (("experts", a.experts), ("top_k", a.top_k), ("shared", a.shared)) if v is not None}
    for p in data["passes"]:
        if p["pass"] == "moe":
            if a.recovery_steps:
                p["training"]["steps"] = a.recovery_steps
            if a.loss_diffusion is not None:
                p["training"]["loss"]["diffusion"] = a.loss_diffusion
            if a.lr is not None:
                p["training"]["lr"] = a.lr
            p.update(layout)
    overrides = {**({"recovery_steps": a.recovery_steps} if a.recovery_steps else {}), **layout,
                 **({"loss_diffusion": a.loss_diffusion} if a.loss_diffusion is not None else {}),
                 **({"lr": a.lr} if a.lr is not None else {})}
    moe_pass = next(p for p in recipe.passes if p.pass_ == "moe")
    name = a.recipe if not layout else (
        f"moe-e{a.experts or moe_pass.experts}-top{a.top_k or moe_pass.top_k}"
        + (f"-shared{a.shared:g}" if a.shared is not None else ""))
    if a.loss_diffusion is not None:  # another recovery objective: its own artifact too
        name += f"-diffusion{a.loss_diffusion:g}"
    if a.lr is not None:
        name += f"-lr{a.lr:g}"
    moe = trained(name, data, model, ctx, console, runs=a.runs)
    cfg = BenchConfig(samples=a.samples, steps=REFERENCE_STEPS, cfg_scale=REFERENCE_CFG, speed_batch=64)
    command = (f"python -m benchmarks.moe --part quality --samples {a.samples} --composite-samples "
               f"{a.composite_samples}" + recipe_and_out_flags(a)
               + "".join(f" --{f.replace('_', '-')} {v}" for f, v in overrides.items()))
    frac = activated_fraction(moe.model, dense_mlp_params(model))
    report = run_bench(Variant("source", model), [variant_from_source(str(a.runs / name), name)], cfg,
                       a.out / "quality", console=console,
                       extra={"command": command, "activated_mlp_params": round(frac, 4)})
    calib = ctx.calibration.rows().spread(a.util_rows)
    held = held_out_rows(model)
    util = {"calibration": utilisation(moe.model, calib), "held_out": utilisation(moe.model, held)}
    summary = {
        "command": command, "machine": machine_info(), "activated_mlp_params_per_token": round(frac, 4),
        "calibration_rows": len(calib), "held_out_rows": len(held), "timestep_ranges": RANGES,
        "worst_block_busiest_over_mean": {k: max(v["busiest_over_mean"] for v in u.values()) for k, u in util.items()},
        "quality": {v["name"]: v["quality"] for v in report["variants"]}, "utilisation": util,
    }
    write_json(summary, a.out / "utilisation.json")
    heatmap(util["calibration"], a.out / "utilisation.png",
            f"{name} on the reference DiT: tokens per expert / mean ({len(calib)} calibration rows)")
    console.print(f"activated MLP params per token {frac:.1%}; busiest / mean: "
                  f"{summary['worst_block_busiest_over_mean']}")
    if a.composite_samples:
        composite = load_recipe(f"{a.recipe}-w8a8").model_dump(mode="json", by_alias=True)
        quant = {**composite, "name": f"{a.recipe}-w8a8", "passes": composite["passes"][1:]}
        q = compress.apply_recipe(moe.model, quant, ctx=ctx, show_progress=False)
        cfg = cfg.model_copy(update={"samples": a.composite_samples})
        run_bench(Variant("source", model), [moe, Variant(f"{a.recipe}-w8a8", q, recipe=f"{a.recipe}-w8a8 (its "
                                                          f"quantize pass on the {a.recipe} artifact)")],
                  cfg, a.out / "quality-w8a8", console=console, extra={"command": command})


def ablation_part(a, console: Console) -> None:
    """Partition methods and E/k/shared settings at conversion (no recovery): how far from dense they start."""
    model = compress.load_model("reference")
    calib = load_recipe("moe-top2").defaults.calibration.model_copy(update={"samples": a.calib_samples})
    ctx = PassContext.for_model(model, calib, show_progress=False)
    settings = {"E8 k2 shared1/8 cluster": {}, "E8 k2 shared1/8 importance": {"partition": "importance"},
                "E8 k2 no shared cluster": {"shared": 0.0}, "E16 k4 shared1/8 cluster": {"experts": 16, "top_k": 4},
                "E8 k2 shared1/8 cluster, taylor": {"importance": "taylor"},
                "E8 k2 shared1/8 cluster, no timestep router": {"timestep_router": False}}
    held = held_out_rows(model, a.calib_samples)
    variants = []
    for name, change in settings.items():
        data = recipe_with("moe-top2", None)
        data["passes"][0].pop("training")
        data["passes"][0].update({"shared": 0.125, **change})  # the settings of ablation/conversion.json
        data["name"] = "moe-" + name.replace(" ", "-").replace("/", "_").replace(",", "")
        m = compress.apply_recipe(model, data, ctx=ctx, show_progress=False)
        frac = activated_fraction(m, dense_mlp_params(model))
        variants.append(Variant(name, m, recipe=data["name"], info={
            "activated_mlp_params": round(frac, 4), "output_rel_mse_vs_source": round(output_error(m, model, held), 5)}))
    command = f"python -m benchmarks.moe --part ablation --samples {a.samples} --calib-samples {a.calib_samples}"
    first = variants[0]  # moe-top2's structure, converted only: what balancing alone achieves per timestep range
    util = {"calibration": utilisation(first.model, ctx.calibration.rows()), "held_out": utilisation(first.model, held)}
    first.info["worst_block_busiest_over_mean"] = {k: max(v["busiest_over_mean"] for v in u.values())
                                                   for k, u in util.items()}
    heatmap(util["calibration"], a.out / "ablation" / "utilisation-conversion.png",
            f"{first.name}, no recovery: tokens per expert / mean (calibration rows)")
    rows = {v.name: v.info for v in variants}
    write_json({"command": command, "machine": machine_info(), "calibration": calib.model_dump(),
                "held_out_rows": len(held), "variants": rows}, a.out / "ablation" / "conversion.json")
    for name, info in rows.items():
        console.print(f"{name}: output rel MSE {info['output_rel_mse_vs_source']:.4f}, activated MLP params "
                      f"{info['activated_mlp_params']:.1%}")
    if a.samples:
        cfg = BenchConfig(samples=a.samples, steps=REFERENCE_STEPS, cfg_scale=REFERENCE_CFG, speed=False)
        run_bench(Variant("source", model), variants, cfg, a.out / "ablation", console=console,
                  extra={"command": command, "calibration": calib.model_dump(), "held_out_rows": len(held)})


def speed_part(a, console: Console) -> None:
    from exporters.onnx import OnnxRunner, export_onnx

    src = compress.load_model(a.model)
    ctx = PassContext.for_model(src, CalibrationConfig(samples=2, steps=2, batch_size=2), show_progress=False)
    data = recipe_with(a.recipe, None)
    data["passes"][0].pop("training")
    data["passes"][0].update({"max_rows": 8, "max_tokens": 2048})
    moe = compress.apply_recipe(src, data, ctx=ctx, show_progress=False)
    frac = activated_fraction(moe, dense_mlp_params(src))
    work = a.runs / "speed-onnx"
    dense_dir = export_onnx(src, work / "dense", force=True)
    moe_dir = export_onnx(moe, work / "moe", force=True)
    cfg = BenchConfig(samples=1, quality=False, grid=False, speed_batch=a.batch, warmup=a.warmup, repeats=a.repeats)
    command = (f"python -m benchmarks.moe --part speed --model {a.model} --batch {a.batch} --threads {a.threads} "
               f"--repeats {a.repeats}" + recipe_and_out_flags(a))
    report = run_bench(Variant(f"{a.model} dense (PyTorch)", src),
                       [Variant(f"{a.recipe} (PyTorch)", moe, recipe=f"{a.recipe} structure, untrained"),
                        Variant("dense (ONNX Runtime)", OnnxRunner(dense_dir, threads=a.threads)),
                        Variant(f"{a.recipe} (ONNX Runtime)", OnnxRunner(moe_dir, threads=a.threads))],
                       cfg, a.out / f"speed-{a.model.replace('/', '-')}", console=console,
                       extra={"command": command, "activated_mlp_params": round(frac, 4), "threads": a.threads})
    ms = {v["name"]: v["speed"]["ms_per_call"] for v in report["variants"]}
    names = list(ms)
    ratios = {"pytorch_moe_speedup": round(ms[names[0]] / ms[names[1]], 3),
              "onnxruntime_moe_speedup": round(ms[names[2]] / ms[names[3]], 3), "ms_per_call": ms}
    write_json({"command": command, "machine": machine_info(), "activated_mlp_params": round(frac, 4), **ratios},
               a.out / f"speed-{a.model.replace('/', '-')}" / "ratios.json")
    console.print(f"MoE vs dense per call: PyTorch {ratios['pytorch_moe_speedup']}x, ONNX Runtime "
                  f"{ratios['onnxruntime_moe_speedup']}x (activated MLP params {frac:.1%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["quality", "ablation", "speed"], default="quality")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--recovery-steps", type=int, default=None, help="override the recipe's training steps")
    p.add_argument("--experts", type=int, default=None, help="quality: override the recipe's routed experts")
    p.add_argument("--top-k", type=int, default=None, help="quality: override the recipe's experts per token")
    p.add_argument("--shared", type=lambda v: int(v) if float(v) >= 1 else float(v), default=None,
                   help="quality: override the recipe's shared expert (a fraction < 1, or a channel count)")
    p.add_argument("--loss-diffusion", type=float, default=None,
                   help="quality: override the recipe's diffusion-loss weight (output KD stays 1.0)")
    p.add_argument("--lr", type=float, default=None, help="quality: override the recipe's recovery learning rate")
    p.add_argument("--composite-samples", type=int, default=300, help="quality: samples for moe-top2-w8a8 (0: skip)")
    p.add_argument("--calib-samples", type=int, default=256, help="ablation: calibration images (moe-top2: 256)")
    p.add_argument("--util-rows", type=int, default=4096, help="calibration rows routed for the utilisation map")
    p.add_argument("--model", default="DiT-B/2", help="speed: the preset")
    p.add_argument("--batch", type=int, default=4, help="speed: batch per call")
    p.add_argument("--threads", type=int, default=2, help="speed: torch and ONNX Runtime threads")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--recipe", choices=["moe-top2", "moe-top1"], default="moe-top2",
                   help="quality / speed: the bundled MoE recipe (its '-w8a8' composite for --composite-samples)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--runs", type=Path, default=Path("runs/moe"), help="trained artifacts, checkpoints and exports")
    a = p.parse_args()
    torch.set_num_threads(a.threads if a.part == "speed" else 1)
    console = Console(width=180)
    {"quality": quality_part, "ablation": ablation_part, "speed": speed_part}[a.part](a, console)


if __name__ == "__main__":
    main()
