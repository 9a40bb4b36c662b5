"""ONNX Runtime: exported models sampled end to end, and INT8 QDQ speed against the FP32 export.

    python -m benchmarks.onnx_runtime --part reference   # FP32 and W8A8 QDQ exports of the reference model, sampled
    python -m benchmarks.onnx_runtime --part speed       # DiT-B/2 256 px, batch 4: W8A8 QDQ vs FP32 ONNX on ORT CPU

``reference``: the FP32 export sampled through ONNX Runtime (50 DDIM steps, CFG) against PyTorch samples
from the same noise (PSNR), and the W8A8 QDQ export against the PyTorch fake-quant model it came from.
``speed``: DiT-B/2 with random weights (speed does not depend on them; the preset's zero init is
re-drawn so calibration sees real activations), quantized with ``w8a8-int8-ort-cpu``, both exports timed
in one process, interleaved, median of repeats; plus the QDQ model's samples against the fake-quant
model's (PSNR, same noise). ``--threads`` sets ORT's intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.diffusion.sampling import make_noise, sample
from compress.io import atomic_write_text
from compress.machine import machine_info
from compress.metrics import psnr
from compress.models.adapters import get_adapter
from compress.models.reference import REFERENCE_CFG, REFERENCE_STEPS
from compress.passes import CalibrationConfig, PassContext
from benchmarks.export_large import randomize_weights
from exporters.onnx import OnnxRunner, export_onnx


def _samples(model, runner, n: int, steps: int, cfg: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch model's and the runner's samples from the same noise and conditions."""
    contract = get_adapter(model).contract().with_overrides(steps=steps, guidance_scale=cfg)
    cond = contract.example_cond(n, torch.Generator().manual_seed(seed),
                                 labels=torch.arange(n) % contract.num_classes if contract.num_classes else None)
    noise = make_noise(n, tuple(contract.latent_shape), seed)
    a = sample(model, cond, noise, contract=contract).samples
    b = sample(runner, cond, noise, contract=contract).samples
    return a, b


def reference_part(a, work: Path) -> dict:
    model = compress.load_model("reference")
    ctx = PassContext.for_model(model, CalibrationConfig(), show_progress=False)
    q = compress.apply_recipe(model, "w8a8-int8-ort-cpu", ctx=ctx, show_progress=False)
    rows = {}
    for name, m in (("fp32", model), ("w8a8-int8-ort-cpu (QDQ)", q)):
        d = export_onnx(m, work / name.split()[0], force=True)
        meta = json.loads((d / "export.json").read_text())
        t0 = time.perf_counter()
        ref, got = _samples(m, OnnxRunner(d, threads=a.threads), a.samples, REFERENCE_STEPS, REFERENCE_CFG)
        rows[name] = {"psnr_db_vs_pytorch": round(float(psnr(got.clamp(-1, 1), ref.clamp(-1, 1), 2.0)), 2),
                      "max_abs_diff": float((got - ref).abs().max()), "qdq_layers": meta["qdq_layers"],
                      "validation_max_rel_err": meta["validation"]["max_rel_err"],
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(name, rows[name], flush=True)
    return {"what": f"{a.samples} reference samples, {REFERENCE_STEPS} DDIM steps, CFG {REFERENCE_CFG}: ONNX Runtime "
                    f"vs the PyTorch model it was exported from (same noise); pixels in [-1, 1]", "rows": rows}


def _op_profile(path: Path, feeds: dict, threads: int, runs: int = 2) -> dict[str, float]:
    """Share of kernel time per ONNX op type (ORT's profiler), top 10: where the time goes."""
    import collections

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "ort_profile")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    agg: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"]
    total = sum(agg.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in agg.most_common(10)}


def speed_part(a, work: Path) -> dict:
    model = compress.load_model(a.model)
    randomize_weights(model)
    ctx = PassContext.for_model(model, CalibrationConfig(samples=4, steps=8, batch_size=4), show_progress=False)
    t0 = time.perf_counter()
    q = compress.apply_recipe(model, "w8a8-int8-ort-cpu", ctx=ctx, show_progress=False)
    quant_s = time.perf_counter() - t0
    dirs = {"fp32": export_onnx(model, work / "fp32", force=True), "w8a8": export_onnx(q, work / "w8a8", force=True)}
    runners = {k: OnnxRunner(d, threads=a.threads) for k, d in dirs.items()}
    sessions = {k: r.session for k, r in runners.items()}
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((a.batch, *ad.latent_shape), generator=g).numpy()
    feeds = {"latent": x, "timestep": torch.full((a.batch,), 500.0).numpy(),
             "y": torch.randint(0, ad.num_classes, (a.batch,), generator=g).numpy()}
    times = {k: [] for k in sessions}
    for i in range(a.warmup + a.repeats):
        for k, s in sessions.items():  # interleaved, so drift in machine load hits both alike
            t1 = time.perf_counter()
            s.run(None, feeds)
            if i >= a.warmup:
                times[k].append(time.perf_counter() - t1)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    profile = {k: _op_profile(d / "model.onnx", feeds, a.threads) for k, d in dirs.items()}
    ref, got = _samples(q, runners["w8a8"], a.batch, a.sample_steps, 1.0)
    sizes = {k: sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx")) for k, d in dirs.items()}
    return {
        "model": a.model, "batch": a.batch, "resolution_px": ad.latent_shape[-1] * 8, "threads": a.threads,
        "ms_per_call": {k: round(v, 1) for k, v in med.items()},
        "speedup_w8a8_vs_fp32": round(med["fp32"] / med["w8a8"], 3),
        "onnx_bytes": sizes, "qdq_layers": json.loads((dirs["w8a8"] / "export.json").read_text())["qdq_layers"],
        "quality": {"what": f"{a.batch} latents sampled {a.sample_steps} DDIM steps (no CFG) through the QDQ export on "
                            f"ORT vs the PyTorch fake-quant model, same noise",
                    "psnr_db": round(float(psnr(got, ref, float(ref.max() - ref.min()))), 2)},
        "op_time_share_pct": profile,
        "quantize_seconds": round(quant_s, 1), "repeats": a.repeats, "warmup": a.warmup,
        "all_ms": {k: [round(t * 1000, 1) for t in v] for k, v in times.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["reference", "speed"], default="speed")
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=100, help="reference: images sampled")
    p.add_argument("--sample-steps", type=int, default=10, help="speed: steps of the quality check")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    report = reference_part(a, work) if a.part == "reference" else speed_part(a, work)
    report["command"] = (f"python -m benchmarks.onnx_runtime --part {a.part}" +
                         (f" --samples {a.samples}" if a.part == "reference" else
                          f" --model {a.model} --batch {a.batch} --threads {a.threads}"))
    report["machine"] = {**machine_info(), "ort_threads": a.threads,
                         "onnxruntime": __import__("onnxruntime").__version__}
    name = "ort_reference.json" if a.part == "reference" else f"ort_speed_{a.model.replace('/', '-')}.json"
    atomic_write_text(a.out / name, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "all_ms"}, indent=2))


if __name__ == "__main__":
    main()
