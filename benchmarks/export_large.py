"""Export a large DiT (random weights) to ONNX on this machine and record time, peak memory and validation.

    python -m benchmarks.export_large --model DiT-XL/2 --out benchmarks/results/export

Presets come with DiT's own initialisation, whose adaLN-Zero and zero final layer make every output 0 (a
validation against PyTorch would pass trivially), so every weight is re-drawn from N(0, 0.02^2) first.
The model is over the 2 GB protobuf limit; weights go to external data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def randomize_weights(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Re-draw every weight but the fixed position table from N(0, std^2) (DiT's zero init outputs 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n != "pos_embed":
                prm.copy_(torch.randn(prm.shape, generator=g) * std)


def speed_model(name: str) -> torch.nn.Module:
    """A model to time: the bundled reference as trained, any other preset with random weights (speed does not
    depend on them, and a preset's zero init would make every block an identity)."""
    from compress import load_model

    model = load_model(name).eval()
    if name != "reference":
        randomize_weights(model)
    return model


def main() -> None:
    from compress import load_model
    from compress.io import atomic_write_text
    from compress.machine import machine_info, peak_rss_mb
    from compress.models.size import param_count
    from exporters.onnx import export_onnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export"))
    a = p.parse_args()
    model = load_model(a.model)
    randomize_weights(model)
    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    d = export_onnx(model, work / "onnx")
    seconds = time.perf_counter() - t0
    meta = json.loads((d / "export.json").read_text())
    report = {
        "model": a.model, "params": param_count(model),
        "onnx_bytes": (d / "model.onnx").stat().st_size, "external_data_bytes": (d / "model.onnx.data").stat().st_size,
        "export_and_validate_seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "validation": meta["validation"], "exporter_log": meta["log"],
        "command": f"python -m benchmarks.export_large --model {a.model}",
        "machine": machine_info(),
    }
    shutil.rmtree(work, ignore_errors=True)
    out = a.out / f"onnx_{a.model.replace('/', '-')}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
