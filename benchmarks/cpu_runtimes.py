"""CPU runtimes side by side: this project's INT8 exports on ONNX Runtime and OpenVINO against the peers.

    python -m benchmarks.cpu_runtimes --model DiT-B/2 --batch 4 --threads 2   # the quantization issue's shape

One process, one model (random weights: speed does not depend on them; DiT's zero init would make every
block an identity), calibrated once on seeded trajectories. Rows, all timed interleaved
(``compress.bench.speed.time_interleaved``: round-robin, median of repeats) at the same batch and threads:

* PyTorch eager fp32 and ``w8a8-int8`` (integer kernels: oneDNN or ``torch._int_mm``, ``compress.nn.quant.int8_linear``);
* ONNX Runtime: the fp32 export, this project's QDQ export of ``w8a8-int8-ort-cpu``, and ORT's own
  ``quantize_dynamic`` (QInt8) of the fp32 export (a peer);
* OpenVINO (explicit f32 precision hint): the fp32 export, this project's QDQ exports (int8 activations)
  of ``w8a8-int8`` and of the CPU-tuned ``w8a8-cpu`` (INT8 attention matmuls, INT8 adaLN weights), and
  **NNCF** ``nncf.quantize`` (ModelType.TRANSFORMER) of the fp32 IR on the same calibration trajectories
  (``export_openvino(..., quantizer="nncf")``: the peer the issue names).

Quality: each row's output on the timed input against the fp32 PyTorch output (PSNR over the output's
range: what a single call loses). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import compress
from benchmarks.export_large import speed_model
from compress.bench.speed import SpeedEntry, speed_inputs, time_interleaved
from compress.calibration import CalibrationConfig
from compress.io import atomic_write_text
from compress.machine import machine_info
from compress.models.adapters import get_adapter
from compress.passes import PassContext
from exporters.onnx import OnnxRunner, export_onnx, session_call
from exporters.openvino import OpenVinoRunner, export_openvino


def out_psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((out.float() - ref.float()).pow(2).mean())
    rng = float(ref.max() - ref.min())
    return round(10 * torch.log10(torch.tensor(rng**2 / max(mse, 1e-30))).item(), 2)


def ort_dynamic(fp32_dir: Path, work: Path, threads: int):
    """ONNX Runtime's ``quantize_dynamic`` (QInt8 weights, dynamic uint8 activations) of the fp32 export."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = work / "ort-dynamic.onnx"
    quantize_dynamic(str(fp32_dir / "model.onnx"), str(path), weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization/cpu-runtimes"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="cpu-runtimes-"))
    model = speed_model(a.model)
    cal = CalibrationConfig(samples=a.calib_samples, steps=8, batch_size=4)
    ctx = PassContext.for_model(model, cal, show_progress=False)
    contract = get_adapter(model).contract()
    inputs = speed_inputs(contract, a.batch, seed=0)
    cpu = torch.device("cpu")
    w8 = compress.apply_recipe(model, "w8a8-int8", ctx=ctx, show_progress=False).eval()
    w8_ort = compress.apply_recipe(model, "w8a8-int8-ort-cpu", ctx=ctx, show_progress=False).eval()
    fp32_onnx = export_onnx(model, work / "fp32")
    fp32_ov = export_openvino(fp32_onnx, work / "fp32-ov")
    entries = [
        SpeedEntry("PyTorch eager fp32", get_adapter(model).denoise, inputs, cpu),
        SpeedEntry("PyTorch eager w8a8-int8 (integer kernels)", get_adapter(w8).denoise, inputs, cpu),
        SpeedEntry("ORT fp32", OnnxRunner(fp32_onnx, threads=a.threads), inputs, cpu),
        SpeedEntry("ORT w8a8-int8-ort-cpu QDQ (ours)",
                   OnnxRunner(export_onnx(w8_ort, work / "qdq-ort"), threads=a.threads), inputs, cpu),
        SpeedEntry("ORT quantize_dynamic QInt8 (peer)",
                   session_call(ort_dynamic(fp32_onnx, work, a.threads), ["y"]), inputs, cpu),
        SpeedEntry("OpenVINO fp32", OpenVinoRunner(fp32_ov, threads=a.threads), inputs, cpu),
    ]
    w8_cpu = compress.apply_recipe(model, "w8a8-cpu", ctx=ctx, show_progress=False).eval()
    for name, m in (("w8a8-int8", w8), ("w8a8-cpu", w8_cpu)):
        d = export_openvino(m, work / f"{name}-ov", qdq_activations="int8")
        entries.append(SpeedEntry(f"OpenVINO {name} QDQ (ours)", OpenVinoRunner(d, threads=a.threads), inputs, cpu))
    nncf_ov = export_openvino(model, work / "nncf-ov", quantizer="nncf", calibration=cal)
    entries.append(SpeedEntry("OpenVINO + NNCF INT8 TRANSFORMER (peer)", OpenVinoRunner(nncf_ov, threads=a.threads),
                              inputs, cpu))
    with torch.no_grad():
        ref = get_adapter(model).denoise(*inputs)
        quality = {e.name: out_psnr(e.call(*inputs), ref) for e in entries}
    stats = time_interleaved(entries, warmup=3, repeats=a.repeats)
    ort = stats["ORT fp32"].median_ms
    eager = stats["PyTorch eager fp32"].median_ms
    rows = {n: {"median_ms": round(s.median_ms, 1), "p90_ms": round(s.p90_ms, 1),
                "speedup_vs_ort_fp32": round(ort / s.median_ms, 3), "speedup_vs_torch_fp32": round(eager / s.median_ms, 3),
                "output_psnr_db_vs_fp32": quality[n]} for n, s in stats.items()}
    cmd = f"python -m benchmarks.cpu_runtimes --model {a.model} --batch {a.batch} --threads {a.threads} " \
          f"--repeats {a.repeats}"
    report = {"command": cmd, "what": "ms per transformer call (one conditional batch), median of interleaved repeats; "
                                      "output PSNR of that call against fp32 PyTorch (random weights)",
              "model": a.model, "batch": a.batch, "threads": a.threads, "rows": rows,
              "machine": {**machine_info(), "onnxruntime": __import__("onnxruntime").__version__,
                          "openvino": __import__("openvino").__version__.split("-")[0],
                          "nncf": __import__("nncf").__version__}}
    name = f"cpu_runtimes_{a.model.replace('/', '-')}_b{a.batch}_t{a.threads}"
    atomic_write_text(a.out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    lines = [f"`{cmd}` — {report['machine'].get('cpu', '')}", "",
             "| runtime / quantizer | ms per call | vs ORT fp32 | vs PyTorch fp32 | output PSNR vs fp32 |",
             "|---|---:|---:|---:|---:|"]
    for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["median_ms"]):
        lines.append(f"| {n} | {r['median_ms']} | {r['speedup_vs_ort_fp32']:.2f}x | {r['speedup_vs_torch_fp32']:.2f}x | "
                     f"{r['output_psnr_db_vs_fp32']} dB |")
    atomic_write_text(a.out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
