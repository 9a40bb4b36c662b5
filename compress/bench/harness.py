"""The benchmark harness: variants of one source model, compared on identical seeds, labels and noise.

    from compress.bench import BenchConfig, Variant, run_bench, variant_from_source
    base = variant_from_source("reference")
    report = run_bench(base, [variant_from_source("out/w8a8")], BenchConfig(samples=500), Path("out/bench"))

Every variant is a runner (PyTorch, ONNX Runtime, TensorRT, ...) with a sampling contract: each samples
``config.samples`` images the way its contract says (its steps, its guidance), from the same seeded noise
and balanced labels. FD and class accuracy come from the bundled digits evaluator when the model is of
the reference family; PSNR / SSIM compare each variant's samples with the baseline's. Speed: one
transformer call at a fixed batch, timed interleaved across variants (``compress.bench.speed``).
Outputs in ``out_dir``: ``report.json``, ``report.md``, ``pareto.png`` and ``grid_<name>.png`` per variant.

Under torchrun (a torch.distributed process group of N > 1 ranks) the quality samples of every variant are
split over the ranks by index and gathered (``compress.evaluation.generate_across_ranks``): the report is the
one a single process writes. Speed is timed on rank 0 alone, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.bench import report as rep
from compress.bench import speed as spd
from compress.errors import DitCompressError
from compress.machine import machine_info
from compress.models.contract import SamplingContract
from exporters.runtime import Runner, TorchRunner


class BenchConfig(BaseModel):
    """How variants are compared. ``steps`` / ``cfg_scale`` / ``sampler`` left at None follow each variant's
    sampling contract (a distilled student keeps its own schedule)."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(200, ge=1, le=1_000_000, description="Images per variant for the quality metrics.")
    steps: int | None = Field(None, ge=1, le=10_000, description="Sampling steps for every variant (None: each "
                                                                 "variant's contract).")
    cfg_scale: float | None = Field(None, ge=0, le=100, description="Guidance scale for every variant (None: each "
                                                                    "variant's contract).")
    seed: int = Field(0, ge=0, description="Seed of noise and labels (the same for every variant).")
    sampler: str | None = Field(None, description="Scheduler for every variant (None: each variant's contract).")
    speed_batch: int = Field(8, ge=1, le=4096, description="Batch of the timed transformer calls.")
    warmup: int = Field(3, ge=0, description="Untimed calls per variant before timing.")
    repeats: int = Field(10, ge=1, description="Timed calls per variant (interleaved across variants).")
    quality: bool = Field(True, description="Sample and score quality.")
    speed: bool = Field(True, description="Time transformer calls.")
    timing: Literal["auto", "call", "sampling"] = Field(
        "auto", description="'call': one transformer call at speed_batch (ms/image = ms/call x NFE / batch); "
                            "'sampling': whole sampling runs of speed_batch images; 'auto': sampling when any variant "
                            "has a step-cache policy (its calls cost differently step by step), else call.")
    grid: bool = Field(True, description="Write a sample grid per variant (image-shaped latents).")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str | None) -> str | None:
        from compress.diffusion.schedules import SAMPLERS

        if v is not None and v != "default" and v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; choose default, {', '.join(SAMPLERS)}")
        return v


@dataclass
class Variant:
    """One model to compare: a runner (a PyTorch module is wrapped in ``TorchRunner``) and how to report it.

    ``steps`` overrides the runner's contract for this variant only; ``info`` is reported as given (e.g.
    training time, a quantization plan): the way scripts add columns.
    """

    name: str
    runner: Runner | nn.Module
    recipe: str | None = None
    steps: int | None = None
    size_bytes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.runner, nn.Module):
            self.runner = TorchRunner(self.runner)
        if self.recipe is None:
            self.recipe = self.runner.recipe
        if self.size_bytes is None:
            self.size_bytes = self.runner.size_bytes

    @property
    def model(self) -> nn.Module | None:
        return self.runner.module


REFERENCE_FAMILY = (10, (1, 8, 8))  # num_classes, latent_shape of the bundled digits models


def safe_name(name: str) -> str:
    """A file-name-safe form of a variant name (``DiT-B/2 w8`` -> ``DiT-B_2_w8``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "variant"


def is_reference_family(contract: SamplingContract) -> bool:
    return (contract.num_classes, tuple(contract.latent_shape)) == REFERENCE_FAMILY


def _finite(x: float | None, nd: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _quality_of(contract: SamplingContract, s, base_images: torch.Tensor | None) -> dict:
    """FD / class accuracy (digits family) and PSNR / SSIM against the baseline's samples."""
    q = {"fd": None, "class_acc": None, "psnr_db": None, "ssim": None, "fd_to_source": None, "finite": True}
    images = s.images.detach().float().cpu()
    if not torch.isfinite(images).all():  # a broken variant scores nothing, and says so
        q["finite"] = False
        return q
    pixels = is_reference_family(contract)
    if pixels and s.labels is not None and len(images) >= 2:
        from compress.metrics import reference_quality

        r = reference_quality(images, s.labels)
        q["fd"], q["class_acc"] = _finite(r["fd"], 5), _finite(r["class_acc"], 5)
    if base_images is not None and base_images.shape == images.shape:
        from compress.metrics import psnr, ssim

        if pixels:  # images in [-1, 1], compared as they are saved and scored
            a, b, data_range = images.clamp(-1, 1), base_images.clamp(-1, 1), 2.0
        else:  # latents: unclamped, peak-to-peak range of the baseline's latents
            a, b = images, base_images
            data_range = float(b.max() - b.min()) or 1.0
        q["psnr_db"] = _finite(psnr(a, b, data_range), 3)
        if a.dim() == 4 and min(a.shape[-2:]) >= 3:  # image-shaped latents only
            q["ssim"] = _finite(ssim(a, b, data_range), 5)
        if pixels and len(a) >= 2:  # distribution-level fidelity: FD between variant and source samples
            from compress.metrics import evaluator_features, frechet_distance

            q["fd_to_source"] = _finite(frechet_distance(evaluator_features(a), evaluator_features(b)), 5)
    return q


def variant_contract(v: Variant, config: BenchConfig) -> SamplingContract:
    """How ``v`` is sampled in this benchmark: its contract with the config's (and its own) overrides."""
    return v.runner.contract.with_overrides(steps=v.steps or config.steps, guidance_scale=config.cfg_scale,
                                            sampler=config.sampler, strict=False)


def run_bench(baseline: Variant, variants: list[Variant], config: BenchConfig, out_dir: Path,
              console=None, extra: dict[str, Any] | None = None) -> dict:
    """Benchmark ``baseline`` (the source, speed-up 1.0) and ``variants``; write and return the report.

    ``extra`` is stored at the top level of the report (a script's command line, its calibration
    settings...). Every file in ``out_dir`` is written atomically. Metrics that do not apply or were not
    run are None; a variant whose samples are not finite gets no quality figures and a note.

    In a torch.distributed group of N > 1 ranks every rank must call this with the same arguments: each
    samples its share of every variant, rank 0 scores, times (the others wait, so they neither load the
    machine nor the GPUs being timed) and writes; every rank returns rank 0's report.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from compress.context import world
    from compress.evaluation import generate_across_ranks, rank_rows
    from compress.viz import save_grid

    rank, size = world()
    if size > 1 and config.quality and config.samples < size:
        raise DitCompressError(f"benchmark: {config.samples} quality sample(s) cannot be split over {size} ranks "
                               f"(each rank samples at least one); ask for at least {size} samples or start fewer "
                               f"ranks.")
    if rank != 0:  # rank 0 speaks for the group
        console = None
    out_dir = Path(out_dir)
    allv = [baseline, *variants]
    names = [v.name for v in allv]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DitCompressError(f"benchmark variants must have distinct names; {', '.join(map(repr, dupes))} "
                               f"appear more than once (give each a 'name').")
    contracts = {v.name: variant_contract(v, config) for v in allv}
    base_c = contracts[baseline.name]
    def inputs(c: SamplingContract) -> list[str]:
        return [x.name for x in c.conditions if x.name != c.guidance_input]

    for v in variants:
        c = contracts[v.name]
        if tuple(c.latent_shape) != tuple(base_c.latent_shape) or inputs(c) != inputs(base_c):
            raise DitCompressError(f"benchmark: variant '{v.name}' takes latents {c.latent_shape} and conditions "
                                   f"{inputs(c)}, its baseline '{baseline.name}' {base_c.latent_shape} and "
                                   f"{inputs(base_c)}; compare variants of the same source model.")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    nfe = {v.name: contracts[v.name].nfe for v in allv}
    quality: dict[str, dict] = {v.name: {"fd": None, "class_acc": None, "psnr_db": None, "ssim": None,
                                         "fd_to_source": None, "finite": True} for v in allv}
    speed: dict[str, dict] = {v.name: {"ms_per_call": None, "p90_ms_per_call": None, "ms_per_image": None,
                                       "images_per_s": None, "speedup": None, "peak_mem_mb": None,
                                       "skipped_block_fraction": None} for v in allv}
    grids: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    if config.quality:
        base_images = None
        with Progress(*columns, console=console, transient=True, disable=console is None) as bar:
            # this rank's share of each variant (the bar counts what this process samples)
            tasks = {v.name: bar.add_task(f"sampling {v.name} ({contracts[v.name].steps} steps)",
                                          total=len(rank_rows(config.samples, contracts[v.name]))) for v in allv}
            for v in allv:
                task = tasks[v.name]
                c = contracts[v.name]
                s = generate_across_ranks(v.runner, config.samples, contract=c, seed=config.seed,
                                          progress=lambda k, task=task: bar.advance(task, k))
                nfe[v.name] = s.nfe
                if v is baseline and not torch.isfinite(s.images).all():  # every rank holds all samples: all fail
                    raise DitCompressError(f"benchmark: the baseline '{v.name}' produced non-finite samples "
                                           f"(NaN/Inf); nothing can be compared against it.")
                if rank != 0:
                    continue
                quality[v.name] = _quality_of(c, s, base_images if v is not baseline else None)
                if v is baseline:
                    base_images = s.images.detach().float().cpu()
                if config.grid and len(c.latent_shape) == 3 and quality[v.name]["finite"]:
                    fname = f"grid_{safe_name(v.name)}.png"
                    save_grid(s.images[:100].detach().cpu(), out_dir / fname, nrow=10)
                    grids[v.name] = fname
                del s

    if rank != 0:  # wait for rank 0's timing and files; return its report
        return _report_from_rank0(None)
    macs: dict[str, int | None] = {v.name: None for v in allv}
    timing = config.timing
    if timing == "auto":
        timing = "sampling" if any(contracts[v.name].cache is not None for v in allv) else "call"
    if config.speed:
        if timing == "sampling":
            entries = [spd.sampling_entry(v.name, v.runner, contracts[v.name], config.speed_batch, config.seed)
                       for v in allv]
        else:
            entries = [spd.SpeedEntry(v.name, v.runner, spd.speed_inputs(contracts[v.name], config.speed_batch,
                                                                          config.seed), v.runner.device) for v in allv]
        total = (config.warmup + config.repeats) * len(entries)
        with Progress(*columns, console=console, transient=True, disable=console is None) as bar:
            task = bar.add_task(f"timing {len(entries)} variants, interleaved", total=total)
            stats = spd.time_interleaved(entries, config.warmup, config.repeats, on_call=lambda: bar.advance(task))
        base_ms = stats[baseline.name].median_ms
        runs = timing == "sampling"  # a run's time per image (per step for the per-call columns)
        for v, e in zip(allv, entries):
            st, per = stats[v.name], contracts[v.name].steps if runs else 1
            ms_img = st.median_ms / config.speed_batch * (1 if runs else nfe[v.name])
            base_img = base_ms / config.speed_batch * (1 if runs else nfe[baseline.name])
            cache = e.info.get("cache")
            speed[v.name] = {
                "ms_per_call": _finite(st.median_ms / per, 4), "p90_ms_per_call": _finite(st.p90_ms / per, 4),
                "ms_per_image": _finite(ms_img, 4), "images_per_s": _finite(1000.0 / ms_img, 3),
                "speedup": _finite(base_img / ms_img if runs else base_ms / st.median_ms, 3),
                "peak_mem_mb": _finite(st.peak_mem_mb, 1),
                "skipped_block_fraction": _finite(cache["skipped_block_fraction"], 4) if cache else None,
            }
        for v in allv:
            if v.model is not None:
                macs[v.name] = spd.macs_per_call(v.model, config.seed)

    cuda = any(v.runner.device.type == "cuda" for v in allv)
    report: dict[str, Any] = {
        "config": config.model_dump(),
        "machine": machine_info(),
        "baseline": baseline.name,
        "variants": [
            {
                "name": v.name, "recipe": v.recipe, "runtime": v.runner.description,
                "steps": contracts[v.name].steps, "cfg_scale": contracts[v.name].guidance_scale,
                "nfe": nfe[v.name], "quality": quality[v.name], "speed": speed[v.name], "params": v.runner.params,
                "size_mb": round(v.size_bytes / 2**20, 4) if v.size_bytes is not None else None,
                "macs_per_call": macs[v.name], "info": v.info,
            }
            for v in allv
        ],
        "notes": {
            "speed": ((rep.SPEED_NOTE_SAMPLING if timing == "sampling" else rep.SPEED_NOTE)
                      .format(**config.model_dump()) if config.speed else "speed not measured"),
            "timing": timing if config.speed else None,
            "peak_mem": rep.PEAK_MEM_NOTE_CUDA if cuda else rep.PEAK_MEM_NOTE_CPU,
            "peak_mem_kind": "CUDA max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
            "size_mb": "MB = 2^20 bytes; the weights file's size on disk when the variant has one, else "
                       "parameters + buffers.",
            "macs_per_call": "analytic MACs (FLOPs / 2, torch FlopCounterMode) of one PyTorch call at batch 1; "
                             "null for exported variants.",
            "fd_to_source": "FD in the evaluator's feature space between the variant's samples and the "
                            "baseline's (same seeds): distribution-level fidelity; null for the baseline.",
            "psnr_ssim": f"against {baseline.name}'s samples (same seeds, labels, noise); null for the baseline. "
                         f"Digits-family images are clamped to [-1, 1] (data range 2); other models' latents are "
                         f"compared unclamped with the baseline's peak-to-peak range as data range.",
            "non_finite": [v.name for v in allv if not quality[v.name]["finite"]],
        },
        "files": {"report_json": "report.json", "report_md": "report.md", "pareto": None, "grids": grids},
        "world_size": size,
        **(extra or {}),
    }
    report["notes"]["distributed"] = (
        f"quality samples split over {size} torch.distributed ranks by index (contiguous shares, the same "
        f"seeds, labels and noise as one process: the same samples up to the float rounding a runtime's kernels "
        f"may give a smaller batch) and gathered on rank 0, which computed every metric; speed was timed on rank "
        f"0 alone while the other ranks waited." if size > 1 else None)
    if rep.plot_pareto(report, out_dir / "pareto.png") is not None:
        report["files"]["pareto"] = "pareto.png"
    rep.write_json(report, out_dir / "report.json")
    rep.write_markdown(report, out_dir / "report.md")
    if console is not None:
        rep.print_table(report, console)
        if report["notes"]["non_finite"]:
            console.print(f"[bold red]non-finite samples[/] (no quality figures): "
                          f"{', '.join(report['notes']['non_finite'])}")
        console.print(f"wrote {out_dir / 'report.json'}, report.md"
                      + (", pareto.png" if report["files"]["pareto"] else "")
                      + (f" and {len(grids)} sample grids" if grids else ""))
    return _report_from_rank0(report) if size > 1 else report


def _report_from_rank0(report: dict | None) -> dict:
    """Rank 0's ``report``, on every rank: the other ranks block here while rank 0 times and writes (a
    broadcast, not a barrier, so they also return what was written)."""
    import torch.distributed as dist

    box = [report]
    dist.broadcast_object_list(box, src=0)
    return box[0]
