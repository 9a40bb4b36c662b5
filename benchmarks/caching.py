"""Step caching on the reference model (quality) and on DiT-B/2 (speed).

    python -m benchmarks.caching --part quality --samples 1000   # fixed methods vs calibrated, PSNR / FD, plot
    python -m benchmarks.caching --part policies --samples 1000  # the same without the searches (their choices)
    python -m benchmarks.caching --part speed                    # measured ms/image (needs an idle machine)

quality: the reference model at its contract (50 DDIM steps, CFG 1.5). Each fixed method at its usual
setting (FORA interval 3; Δ-DiT interval 2 on half the blocks, boundary mid-way; FirstBlockCache at
diffusers' default threshold 0.05; TaylorSeer at diffusers' defaults: interval 5, 3 warm-up steps, order 1),
then the calibrated policy (the ``cache`` pass's search, TaylorSeer with every field searched) at each fixed
method's speed-up in block evaluations, the bundled ``cache-2x`` / ``cache-4x`` recipes, and the
quantization composite (``w8a8-int8-cache-2x``: calibrated on the quantized model) next to the naive stack
(the fp32-calibrated cache-2x policy put on the w8a8-int8 model). One ``run_bench`` run on the same
seeds; speed-ups here are the policies' block-evaluation speed-ups (1 / (1 - skipped fraction), counted on
the 1,000 samples' runs), not timings.

speed: whole sampling runs timed interleaved in one ``run_bench`` (``timing: sampling``): the reference model
with cache-2x / cache-4x at the bench defaults, and DiT-B/2 (random weights) with fixed-schedule policies,
whose measured speed-up is compared with 1 / (1 - skipped block fraction).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

import compress
from compress.bench import BenchConfig, Variant, run_bench
from compress.cache import SkipCount
from compress.diffusion.sampling import make_noise, sample
from compress.io import atomic_write_text
from compress.machine import machine_info
from compress.models.adapters import get_adapter
from compress.models.provenance import provenance

OUT = Path("benchmarks/results/caching")
FIXED = {  # name -> cache pass fields (the method's usual setting)
    "FORA (interval 3)": {"method": "fora", "interval": 3},
    "Δ-DiT (interval 2, 6 of 12 blocks)": {"method": "delta_dit", "interval": 2, "delta_blocks": 6,
                                          "delta_boundary": 25},
    "FirstBlockCache (threshold 0.05)": {"method": "first_block", "threshold": 0.05},
    "TaylorSeer (interval 5, warm-up 3, order 1)": {"method": "taylorseer", "interval": 5, "warmup": 3, "phase": 1,
                                                    "order": 1},
}


# Policies the cache pass's search chose on the reference (32 calibration samples, seed 0; the search is
# deterministic, so `dit-compress apply cache-2x` records the same one): evaluated without re-searching by
# --part policies, for machines where the searches themselves take too long.
CHOSEN = {
    "cache-2x's choice (taylorseer, target 3x)": {"method": "taylorseer", "interval": 4, "warmup": 2, "cooldown": 2,
                                                  "order": 2, "forecast": "output"},
    "search at 2.5x (taylorseer)": {"method": "taylorseer", "interval": 3, "warmup": 2, "cooldown": 2, "order": 2,
                                    "forecast": "output"},
    "search at 2.5x (fora)": {"method": "fora", "interval": 3, "warmup": 2, "cooldown": 2},
    "search at 6x (taylorseer)": {"method": "taylorseer", "interval": 10, "warmup": 1, "cooldown": 2, "order": 2,
                                  "forecast": "residual"},
}


def cached(model, fields: dict, name: str):
    return compress.apply_recipe(model, {"name": name, "description": "benchmark policy",
                                         "passes": [{"pass": "cache", **fields}]}, show_progress=False)


def skipped(model, samples: int, seed: int = 0) -> float:
    """The policy's skipped block fraction over the first ``samples`` of the benchmark's own (same noise and
    labels; schedule policies skip the same on any data)."""
    c = get_adapter(model).contract()
    labels = torch.tensor([i % 10 for i in range(samples)])
    cond = c.example_cond(samples, torch.Generator().manual_seed(seed + 1), labels=labels)
    noise = make_noise(samples, tuple(c.latent_shape), seed)
    count = SkipCount()
    depth = len(get_adapter(model).blocks())
    for s in range(0, min(samples, 250), 250):  # the first 250 of the benchmark's samples
        r = sample(model, {k: v[s:s + 250] for k, v in cond.items()}, noise[s:s + 250], contract=c, seed=seed)
        count.add(r.cache, depth)
    return count.fraction


def quality_part(samples: int, console: Console) -> dict:
    src = compress.load_model("reference")
    rows: list[dict] = []
    variants: list[Variant] = []

    def add(name: str, model, kind: str, recipe: str | None = None):
        frac = skipped(model, min(samples, 250))
        policy = get_adapter(model).contract().cache
        rows.append({"name": name, "kind": kind, "skipped_block_fraction": round(frac, 4),
                     "block_speedup": round(1 / (1 - frac), 3),
                     "policy": policy.model_dump(mode="json", exclude_none=True) if policy else None,
                     "search": provenance(model).get("cache_search")})
        variants.append(Variant(name, model, recipe=recipe))

    for name, fields in FIXED.items():
        add(name, cached(src, fields, "fixed"), "fixed", fields["method"])
    for fixed in list(rows):  # the calibrated policy at each fixed method's speed-up
        target = max(fixed["block_speedup"], 1.01)
        cal = cached(src, {"method": "taylorseer", "calibrate": {"target_speedup": target, "samples": 32}}, "cal")
        add(f"calibrated @ {target:.2f}x (vs {fixed['name'].split(' (')[0]})", cal, "calibrated",
            "cache taylorseer calibrate")
    for recipe in ("cache-2x", "cache-4x", "w8a8-int8-cache-2x"):
        add(recipe, compress.apply_recipe(src, recipe, show_progress=False), "recipe", recipe)
    w8 = compress.apply_recipe(src, "w8a8-int8", show_progress=False)
    naive_policy = get_adapter(variants[-3].model).contract().cache  # cache-2x, calibrated on the fp32 model
    naive = get_adapter(w8)
    naive.set_contract(naive.contract().model_copy(update={"cache": naive_policy}))
    add("w8a8-int8 + fp32-calibrated cache-2x (naive stack)", w8, "naive", "w8a8-int8 + cache-2x policy")
    add("w8a8-int8 (no cache)", compress.apply_recipe(src, "w8a8-int8", show_progress=False), "quantized",
        "w8a8-int8")
    report = run_bench(Variant("reference", src), variants, BenchConfig(samples=samples, speed=False),
                       OUT / "quality", console=console,
                       extra={"command": f"python -m benchmarks.caching --part quality --samples {samples}"})
    return write_rows(rows, report, f"python -m benchmarks.caching --part quality --samples {samples}", samples,
                      "quality", "psnr_vs_speedup.png", console)


def write_rows(rows: list[dict], report: dict, cmd: str, samples: int, name: str, plot_name: str,
               console: Console) -> dict:
    """Join a bench report's quality onto the policy rows; write NAME.json, NAME.md and the plot."""
    q = {v["name"]: v["quality"] for v in report["variants"]}
    base_fd = q["reference"]["fd"]
    for r in rows:
        r |= {k: q[r["name"]][k] for k in ("psnr_db", "fd", "class_acc", "fd_to_source")}
        r["fd_over_source"] = round(r["fd"] / base_fd, 4) if r["fd"] is not None else None
    result = {"command": cmd, "machine": machine_info(), "samples": samples, "source_fd": base_fd,
              "source_class_acc": q["reference"]["class_acc"], "rows": rows}
    atomic_write_text(OUT / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(OUT / f"{name}.md", table(result))
    plot(result, OUT / plot_name)
    console.print(table(result))
    return result


def policies_part(samples: int, console: Console) -> dict:
    """The fixed methods and the searches' recorded choices (no search): PSNR / FD on ``samples`` images."""
    src = compress.load_model("reference")
    rows, variants = [], []
    for kind, table_ in (("fixed", FIXED), ("calibrated", CHOSEN)):
        for name, fields in table_.items():
            m = cached(src, fields, "policy")
            frac = skipped(m, min(samples, 64))
            rows.append({"name": name, "kind": kind, "skipped_block_fraction": round(frac, 4),
                         "block_speedup": round(1 / (1 - frac), 3), "policy": fields, "search": None})
            variants.append(Variant(name, m, recipe=fields["method"]))
    cmd = f"python -m benchmarks.caching --part policies --samples {samples}"
    report = run_bench(Variant("reference", src), variants, BenchConfig(samples=samples, speed=False),
                       OUT / "policies", console=console, extra={"command": cmd})
    return write_rows(rows, report, cmd, samples, "policies", "psnr_vs_speedup_policies.png", console)


def table(result: dict) -> str:
    lines = [f"Reference model, 50 DDIM steps, CFG 1.5, {result['samples']} samples, seed 0; source FD "
             f"{result['source_fd']:.3f}. Speed-up = block evaluations (1 / (1 - skipped fraction)).", "",
             "| variant | kind | skipped blocks | block speed-up | PSNR vs source | FD (x source) | class acc |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fd = f"{r['fd']:.3f} ({r['fd_over_source']:.3f}x)" if r["fd"] is not None else "–"
        lines.append(f"| {r['name']} | {r['kind']} | {r['skipped_block_fraction']:.1%} | {r['block_speedup']:.2f}x | "
                     f"{r['psnr_db']:.2f} dB | {fd} | {r['class_acc']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    marks = {"fixed": "s", "calibrated": "o", "recipe": "*", "naive": "x", "quantized": "^"}
    for r in result["rows"]:
        ax.scatter(r["block_speedup"], r["psnr_db"], marker=marks[r["kind"]], s=60, label=r["name"])
    search = next((r["search"] for r in result["rows"] if r["name"] == "cache-2x" and r["search"]), None)
    if search:  # the curve the cache-2x search scored (32 calibration samples, against the uncached model)
        pts = sorted((c["speedup"], c["psnr_db"]) for c in search)
        ax.plot(*zip(*pts), ".", color="grey", alpha=0.4, label="cache-2x search (calibration set)")
    ax.set_xlabel("speed-up in block evaluations")
    ax.set_ylabel("PSNR vs source (dB)")
    ax.set_title(f"Step caching on the reference DiT ({result['samples']} samples, 50 steps, CFG 1.5)")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def speed_part(console: Console, steps: int, batch: int, repeats: int, out: Path, models: str) -> dict:
    results = {}
    if models in ("both", "reference"):
        results["reference"] = _speed_reference(console, repeats, out)
    if models in ("both", "dit"):
        results["DiT-B/2"] = _speed_dit(console, steps, batch, repeats, out)
    return results


def _speed_reference(console: Console, repeats: int, out: Path) -> dict:
    src = compress.load_model("reference")
    variants = [Variant(r, compress.apply_recipe(src, r, show_progress=False), recipe=r)
                for r in ("cache-2x", "cache-4x")]
    config = BenchConfig(samples=1, quality=False, grid=False, timing="sampling", warmup=min(3, repeats),
                         repeats=repeats)
    return run_bench(Variant("reference", src), variants, config, out / "speed_reference", console=console,
                     extra={"command": "python -m benchmarks.caching --part speed"})


def _speed_dit(console: Console, steps: int, batch: int, repeats: int, out: Path) -> dict:
    big = compress.load_model("DiT-B/2")
    policies = {"fora interval 2": {"method": "fora", "interval": 2},
                "fora interval 4": {"method": "fora", "interval": 4},
                "taylorseer interval 4, order 2": {"method": "taylorseer", "interval": 4, "warmup": 2, "order": 2}}
    dit = run_bench(Variant("DiT-B/2", big), [Variant(n, cached(big, f, "speed"), recipe=f["method"])
                                              for n, f in policies.items()],
                    BenchConfig(samples=1, steps=steps, quality=False, grid=False, timing="sampling",
                                speed_batch=batch, warmup=1, repeats=repeats),
                    out / "speed_DiT-B-2", console=console,
                    extra={"command": "python -m benchmarks.caching --part speed"})
    for v in dit["variants"][1:]:
        s = v["speed"]
        expect = 1 / (1 - s["skipped_block_fraction"])
        console.print(f"{v['name']}: measured {s['speedup']:.2f}x, skipped-block bound {expect:.2f}x "
                      f"({s['speedup'] / expect:.0%})")
    return dit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["quality", "policies", "speed"], required=True)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20, help="speed part: DiT-B/2 sampling steps")
    ap.add_argument("--batch", type=int, default=2, help="speed part: DiT-B/2 images per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="speed part: timed runs per variant")
    ap.add_argument("--out", type=Path, default=OUT, help="speed part: where the reports go")
    ap.add_argument("--models", choices=["both", "reference", "dit"], default="both", help="speed part: which")
    args = ap.parse_args()
    console = Console()
    if args.part == "quality":
        quality_part(args.samples, console)
    elif args.part == "policies":
        policies_part(args.samples, console)
    else:
        speed_part(console, args.steps, args.batch, args.repeats, args.out, args.models)


if __name__ == "__main__":
    main()
