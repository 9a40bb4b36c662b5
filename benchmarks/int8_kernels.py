"""W8A8 INT8 in PyTorch eager on CPU: integer kernels (oneDNN / ``torch._int_mm``) against fake quantization and fp32.

    python -m benchmarks.int8_kernels --model DiT-B/2 --batch 4 --threads 2   # the issue's shape
    python -m benchmarks.int8_kernels --model reference --batch 16 --threads 1 --also-recipes all

One process, one model quantized once with the bundled ``w8a8-int8`` and ``w8a8-int8-dynamic`` recipes; each
quantized model is timed twice, with its layers' ``kernel`` set to ``"auto"`` (integer matmuls) and to
``"reference"`` (the fake-quant arithmetic the integer path is tested against; integer kernels:
``compress.nn.quant.int8_linear``, oneDNN's fused INT8 linear on x86 above ``ONEDNN_MIN_MACS`` per call,
``torch._int_mm`` below it), interleaved with the fp32
source (``compress.bench.speed.time_interleaved``: round-robin, median of repeats). Output error of the
integer path against the fake-quant one (they compute the same integers) and against fp32 is reported
beside the times. ``--also-recipes`` adds every other bundled quantization recipe (or a comma list), each
timed as PyTorch runs it by default (integer kernels where they exist, weight-only layers on their
dequantized-once weights): "is any quantized variant slower than its source in PyTorch". DiT-B/2 gets random weights (its zero init would make every block an identity; speed
does not depend on the values). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import compress
from benchmarks.export_large import speed_model
from compress.bench.speed import SpeedEntry, speed_inputs, time_interleaved
from compress.calibration import CalibrationConfig
from compress.io import atomic_write_text
from compress.machine import machine_info
from compress.models.adapters import get_adapter
from compress.nn.quant import QuantLinear
from compress.passes import PassContext

# every bundled recipe made of quantize passes only (what PyTorch runs as quantized layers)
QUANT_RECIPES = ["int8-weights", "int4-weights-g32", "int4-weights-g32-asym", "w8a8-int8-ort-cpu", "fp8",
                 "fp8-per-tensor-dynamic", "w4a8", "w4a8-svd", "w8a8-cpu"]


DEFAULT_OUT = Path("benchmarks/results/quantization/int8-kernels")


def set_kernel(model: torch.nn.Module, kernel: str) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return model


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--also-recipes", default="", help="'all' bundled quantization recipes, or a comma list")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    also = [r for r in (QUANT_RECIPES if a.also_recipes == "all" else a.also_recipes.split(",")) if r]
    also = [r for r in also if r not in ("w8a8-int8", "w8a8-int8-dynamic")]
    torch.set_num_threads(a.threads)
    model = speed_model(a.model)
    cal = CalibrationConfig() if a.model == "reference" else CalibrationConfig(samples=4, steps=8, batch_size=4)
    ctx = PassContext.for_model(model, cal, show_progress=False)
    contract = get_adapter(model).contract()
    inputs = speed_inputs(contract, a.batch, seed=0)
    entries = [SpeedEntry("fp32", get_adapter(model).denoise, inputs, torch.device("cpu"))]
    errors = {}
    with torch.no_grad():
        ref_out = get_adapter(model).denoise(*inputs)
        for recipe in ("w8a8-int8", "w8a8-int8-dynamic"):
            q = compress.apply_recipe(model, recipe, ctx=ctx, show_progress=False).eval()
            fake = set_kernel(copy.deepcopy(q), "reference")
            fast = set_kernel(q, "auto")
            out_fast, out_fake = get_adapter(fast).denoise(*inputs), get_adapter(fake).denoise(*inputs)
            errors[recipe] = {"int_vs_fake_quant_rel_mse": rel_mse(out_fast, out_fake),
                              "int_vs_fp32_rel_mse": rel_mse(out_fast, ref_out)}
            entries.append(SpeedEntry(f"{recipe} (integer kernels)", get_adapter(fast).denoise, inputs,
                                      torch.device("cpu")))
            entries.append(SpeedEntry(f"{recipe} (fake quant)", get_adapter(fake).denoise, inputs,
                                      torch.device("cpu")))
        for recipe in also:
            q = compress.apply_recipe(model, recipe, ctx=ctx, show_progress=False).eval()
            errors[recipe] = {"vs_fp32_rel_mse": rel_mse(get_adapter(q).denoise(*inputs), ref_out)}
            entries.append(SpeedEntry(recipe, get_adapter(q).denoise, inputs, torch.device("cpu")))
    stats = time_interleaved(entries, warmup=3, repeats=a.repeats)
    fp32 = stats["fp32"].median_ms
    rows = {name: {"median_ms": round(s.median_ms, 2), "p90_ms": round(s.p90_ms, 2),
                   "speedup_vs_fp32": round(fp32 / s.median_ms, 3)} for name, s in stats.items()}
    report = {"command": f"python -m benchmarks.int8_kernels --model {a.model} --batch {a.batch} "
                         f"--threads {a.threads} --repeats {a.repeats}"
                         + (f" --also-recipes {a.also_recipes}" if a.also_recipes else "")
                         + (f" --out {a.out}" if a.out != DEFAULT_OUT else ""),
              "what": "ms per transformer call (one conditional batch), PyTorch eager, median of interleaved repeats",
              "model": a.model, "batch": a.batch, "threads": a.threads, "rows": rows, "errors": errors,
              "machine": machine_info()}
    name = f"int8_kernels_{a.model.replace('/', '-')}_b{a.batch}_t{a.threads}.json"
    atomic_write_text(a.out / name, json.dumps(report, indent=2) + "\n")
    print(json.dumps({"rows": rows, "errors": errors}, indent=2))


if __name__ == "__main__":
    main()
