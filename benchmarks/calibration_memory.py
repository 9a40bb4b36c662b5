"""Peak memory and time of W8A8 calibration on a large DiT (random weights; memory does not depend on values).

    python -m benchmarks.calibration_memory --model DiT-XL/2 --samples 2 --steps 8 --out benchmarks/results/quantization

Applies the bundled ``w8a8-int8`` recipe (trajectory recording, per-layer statistics, smoothing and clipping
search) and reports the process's peak resident memory (VmHWM), the model's own size and the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from compress import apply_recipe, load_model, load_recipe
    from compress.io import atomic_write_text
    from compress.machine import machine_info, peak_rss_mb
    from compress.models.size import state_bytes
    from compress.recipe import with_defaults

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--recipe", default="w8a8-int8")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization"))
    a = p.parse_args()
    t0 = time.perf_counter()
    model = load_model(a.model)
    model_bytes = state_bytes(model)
    after_load = peak_rss_mb()
    r = load_recipe(a.recipe)
    cal = r.defaults.calibration.model_copy(update={"samples": a.samples, "steps": a.steps, "batch_size": a.samples})
    r = with_defaults(r, calibration=cal)
    t1 = time.perf_counter()
    apply_recipe(model, r, show_progress=False)
    t2 = time.perf_counter()
    report = {
        "model": a.model, "recipe": a.recipe, "calibration": cal.model_dump(),
        "calibration_rows": a.samples * a.steps * 2,
        "model_fp32_gb": round(model_bytes / 2**30, 3),
        "peak_rss_after_load_gb": round(after_load / 1024, 3),
        "peak_rss_gb": round(peak_rss_mb() / 1024, 3),
        "apply_seconds": round(t2 - t1, 1), "total_seconds": round(t2 - t0, 1),
        "command": f"python -m benchmarks.calibration_memory --model {a.model} --samples {a.samples} --steps {a.steps}",
        "machine": machine_info(),
    }
    out = a.out / f"calibration_memory_{a.model.replace('/', '-')}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
