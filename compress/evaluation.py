"""Sampling a model on fixed seeds and labels, and scoring it: shared by the CLI and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.context import world
from compress.diffusion.sampling import Denoiser, make_noise, resolve, sample_batched
from compress.models.contract import SamplingContract


SAMPLE_BATCH = 250  # images per sampler call in generate: also the unit a batch-wide contract is sharded by


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


def generate(denoiser: nn.Module | Denoiser, n: int, *, contract: SamplingContract | None = None, seed: int = 0,
             classes: list[int] | None = None, batch_size: int = SAMPLE_BATCH,
             progress: Callable[[int], None] | None = None, shard: range | None = None) -> SampleSet:
    """``n`` samples from seeded noise, sampled as ``contract`` (default: the denoiser's own) says.

    Class models get balanced labels, text models seeded embeddings: the same for every variant of a model.
    ``shard``: only this contiguous range of the ``n`` indices (images and labels), each from the noise,
    conditions and step noise it gets in the whole set. Why the full noise and conditions are still drawn:
    one generator draws them for all ``n`` at once, and a draw of fewer values is not a prefix of it;
    drawing all and slicing costs little beside sampling. A smaller batch may still round differently in a
    runtime's kernels (matmul blocking): bit-identical for the bundled reference on CPU, ~1e-6 otherwise.
    """
    import time

    contract = contract or resolve(denoiser)[1]
    gen = torch.Generator().manual_seed(seed + 1)
    labels = balanced_labels(n, contract.num_classes, classes) if contract.num_classes else None
    cond = contract.example_cond(n, gen, labels=labels)
    noise = make_noise(n, tuple(contract.latent_shape), seed)
    t0 = time.perf_counter()
    r = sample_batched(denoiser, cond, noise, contract=contract, seed=seed, batch_size=batch_size, progress=progress,
                       rows=shard)
    if shard is not None:
        labels = labels[shard.start:shard.stop] if labels is not None else None
    nfe = r.nfe if len(r.samples) else contract.nfe  # an empty shard made no call
    return SampleSet(r.samples, labels, nfe, time.perf_counter() - t0)


def batch_wide(contract: SamplingContract) -> bool:
    """True when a sample depends on the others in its sampler batch: a ``first_block`` step cache decides
    to skip from a metric over the whole batch. Such a contract is sharded by whole sampler batches."""
    return contract.cache is not None and contract.cache.method == "first_block"


def shard_rows(n: int, rank: int, world: int, unit: int = 1) -> range:
    """Rank ``rank``'s contiguous share of indices ``0..n-1`` among ``world`` ranks, cut at multiples of
    ``unit`` (whole sampler batches for a batch-wide contract); earlier ranks take the remainder, so rank 0
    is never empty and the ranks' shares, in rank order, are ``range(n)``."""
    units = -(-n // unit)
    base, extra = divmod(units, world)
    u0 = rank * base + min(rank, extra)
    u1 = u0 + base + (rank < extra)
    return range(min(u0 * unit, n), min(u1 * unit, n))


def rank_rows(n: int, contract: SamplingContract, batch_size: int = SAMPLE_BATCH) -> range:
    """The indices of ``n`` samples of ``contract`` this process samples in ``generate_across_ranks``."""
    rank, size = world()
    return shard_rows(n, rank, size, batch_size if batch_wide(contract) else 1)


def generate_across_ranks(denoiser: nn.Module | Denoiser, n: int, *, contract: SamplingContract | None = None,
                          seed: int = 0, batch_size: int = SAMPLE_BATCH,
                          progress: Callable[[int], None] | None = None) -> SampleSet:
    """``generate`` with the ``n`` samples split over the torch.distributed ranks; returns, on every rank, the
    set one process would (same images in index order, up to ``generate(shard=...)``'s batch rounding;
    ``seconds``: the slowest rank's).

    Each rank samples its contiguous ``shard_rows`` with ``generate(shard=...)``; the shards are exchanged
    with ``all_gather_object`` (CPU tensors), so every rank can take the same decisions afterwards (a
    non-finite baseline fails everywhere, not on rank 0 alone). ``progress`` counts this rank's samples.
    Without a process group (or with one rank) it is plain ``generate``.
    """
    rank, size = world()
    if size == 1:
        return generate(denoiser, n, contract=contract, seed=seed, batch_size=batch_size, progress=progress)
    import torch.distributed as dist

    contract = contract or resolve(denoiser)[1]
    rows = rank_rows(n, contract, batch_size)
    s = generate(denoiser, n, contract=contract, seed=seed, batch_size=batch_size, progress=progress, shard=rows)
    parts: list = [None] * size
    dist.all_gather_object(parts, (s.images.detach().cpu(), s.labels, s.seconds))
    labels = [p[1] for p in parts]
    return SampleSet(torch.cat([p[0] for p in parts]),
                     torch.cat(labels) if labels[0] is not None else None, s.nfe, max(p[2] for p in parts))


def reference_quality_report(n: int, steps: int, out_dir, console=None, model: nn.Module | None = None,
                             cfg_scale: float | None = None, seed: int = 0, name: str = "reference") -> dict:
    """Sample a bundled reference model (``name``, or ``model``) and score it against the real digits.

    Writes ``quality.json`` and ``grid.png`` (one row per class) into ``out_dir``; returns the figures.
    """
    import json
    from pathlib import Path

    from rich.progress import Progress

    from compress.machine import machine_info
    from compress.metrics import real_halves_fd, reference_quality
    from compress.models.adapters import get_adapter
    from compress.sources import load_model
    from compress.viz import save_grid

    model = model if model is not None else load_model(name)
    contract = get_adapter(model).contract().with_overrides(steps=steps, guidance_scale=cfg_scale)
    cfg_scale = contract.guidance_scale
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"sampling {n} digits x {steps} steps", total=n)
        s = generate(model, n, contract=contract, seed=seed, progress=lambda k: bar.advance(task, k))
    q = reference_quality(s.images, s.labels)
    floor = real_halves_fd()
    report = {
        "model": name, "samples": n, "steps": steps, "cfg_scale": cfg_scale, "sampler": "ddim", "seed": seed,
        "fd": round(q["fd"], 4), "class_acc": round(q["class_acc"], 4),
        "real_halves_fd": round(floor, 4), "fd_over_real_halves": round(q["fd"] / floor, 3),
        "nfe_per_image": s.nfe, "sampling_seconds": round(s.seconds, 1),
        "machine": machine_info()["summary"],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = torch.argsort(s.labels[:100], stable=True)
    save_grid(s.images[:100][order], out / "grid.png", nrow=10)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if console is not None:
        from rich.table import Table

        t = Table(title=f"{name} DiT, {n} samples, {steps} DDIM steps, CFG {cfg_scale}")
        for col in ("FD", "real-halves FD", "FD / floor", "class acc", "NFE/img", "seconds"):
            t.add_column(col, justify="right")
        t.add_row(f"{q['fd']:.3f}", f"{floor:.3f}", f"{q['fd'] / floor:.2f}x", f"{q['class_acc']:.2%}",
                  str(s.nfe), f"{s.seconds:.1f}")
        console.print(t)
        console.print(f"wrote {out / 'grid.png'} and {out / 'quality.json'}")
    return report
