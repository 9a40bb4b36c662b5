"""Sampling a model on fixed seeds and labels, and scoring it: shared by the CLI and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.diffusion.sampling import make_noise, sample_batched
from compress.models.adapters import get_adapter


@dataclass
class SampleSet:
    images: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    seconds: float


def balanced_labels(n: int, num_classes: int, classes: list[int] | None = None) -> torch.Tensor:
    """Labels cycling through ``classes`` (default: all) so every class is equally represented."""
    classes = classes if classes is not None else list(range(num_classes))
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


def generate(model: nn.Module, n: int, *, steps: int, cfg_scale: float, seed: int = 0, sampler: str = "default",
             classes: list[int] | None = None, batch_size: int = 250, denoiser=None,
             progress: Callable[[int], None] | None = None) -> SampleSet:
    """``n`` samples from seeded noise; class models get balanced labels, text models seeded embeddings."""
    import time

    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = balanced_labels(n, adapter.num_classes, classes) if adapter.num_classes else None
    cond = adapter.example_cond(n, gen, labels=labels)
    noise = make_noise(n, adapter.latent_shape, seed)
    t0 = time.perf_counter()
    r = sample_batched(adapter, cond, noise, steps=steps, cfg_scale=cfg_scale, sampler=sampler, seed=seed,
                       batch_size=batch_size, denoiser=denoiser, progress=progress)
    return SampleSet(r.samples, labels, r.nfe, time.perf_counter() - t0)


def reference_quality_report(n: int, steps: int, out_dir, console=None, model: nn.Module | None = None,
                             cfg_scale: float | None = None, seed: int = 0) -> dict:
    """Sample the reference model (or ``model``) and score it against the real digits.

    Writes ``quality.json`` and ``grid.png`` (one row per class) into ``out_dir``; returns the figures.
    """
    import json
    import os
    import platform
    from pathlib import Path

    from rich.progress import Progress

    from compress.metrics import real_halves_fd, reference_quality
    from compress.models.loading import load_model
    from compress.models.reference import REFERENCE_CFG
    from compress.viz import save_grid

    model = model if model is not None else load_model("reference")
    cfg_scale = REFERENCE_CFG if cfg_scale is None else cfg_scale
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"sampling {n} digits x {steps} steps", total=n)
        s = generate(model, n, steps=steps, cfg_scale=cfg_scale, seed=seed,
                     progress=lambda k: bar.advance(task, k))
    q = reference_quality(s.images, s.labels)
    floor = real_halves_fd()
    report = {
        "samples": n, "steps": steps, "cfg_scale": cfg_scale, "sampler": "ddim", "seed": seed,
        "fd": round(q["fd"], 4), "class_acc": round(q["class_acc"], 4),
        "real_halves_fd": round(floor, 4), "fd_over_real_halves": round(q["fd"] / floor, 3),
        "nfe_per_image": s.nfe, "sampling_seconds": round(s.seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = torch.argsort(s.labels[:100], stable=True)
    save_grid(s.images[:100][order], out / "grid.png", nrow=10)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if console is not None:
        from rich.table import Table

        t = Table(title=f"reference DiT, {n} samples, {steps} DDIM steps, CFG {cfg_scale}")
        for col in ("FD", "real-halves FD", "FD / floor", "class acc", "NFE/img", "seconds"):
            t.add_column(col, justify="right")
        t.add_row(f"{q['fd']:.3f}", f"{floor:.3f}", f"{q['fd'] / floor:.2f}x", f"{q['class_acc']:.2%}",
                  str(s.nfe), f"{s.seconds:.1f}")
        console.print(t)
        console.print(f"wrote {out / 'grid.png'} and {out / 'quality.json'}")
    return report
