"""The one sampler loop: any family, any runtime, sampled the way its contract says.

``sample(denoiser, cond, noise)`` takes a PyTorch model (or its adapter) or any runner with a
``contract`` and ``__call__(x, t, cond)`` (ONNX Runtime, TensorRT, OpenVINO...), and follows the sampling
contract: scheduler, steps, classifier-free guidance. Callers that want other settings pass a modified
contract (``contract.with_overrides(steps=...)``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from compress.cache import step_cache
from compress.diffusion.schedules import STOCHASTIC, make_scheduler, set_schedule
from compress.models.adapters import Cond, ModelAdapter, get_adapter
from compress.models.contract import SamplingContract


class Denoiser(Protocol):
    """What the sampler calls: a prediction for (latent, timestep, conditions), and how to sample it."""

    contract: SamplingContract

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


@dataclass
class SampleResult:
    samples: torch.Tensor  # final latents / images
    nfe: int  # transformer evaluations per image (a CFG step counts two)
    calls: int  # batched transformer calls made
    cache: dict | None = None  # what the contract's step-cache policy skipped (None: no policy)


def make_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise for ``n`` images: identical for every variant given the same seed."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def cat_cond(a: Cond, b: Cond) -> Cond:
    return {k: torch.cat([a[k], b[k]]) if a[k].dim() else a[k] for k in a}


def slice_cond(cond: Cond, sl: slice | torch.Tensor) -> Cond:
    return {k: v[sl] if v.dim() else v for k, v in cond.items()}


def resolve(denoiser: nn.Module | ModelAdapter | Denoiser) -> tuple[Callable, SamplingContract]:
    """(call, contract) of a model, an adapter or a runner."""
    if isinstance(denoiser, nn.Module):
        denoiser = get_adapter(denoiser)
    if isinstance(denoiser, ModelAdapter):
        return denoiser.forward, denoiser.contract()
    return denoiser, denoiser.contract


@contextlib.contextmanager
def step_noise_rows(sched, offset: int, full: int) -> Iterator[None]:
    """While active, ``sched.step`` draws its fresh noise for a batch of ``full`` rows and keeps rows
    ``offset:offset + n`` (``n``: the batch it is given).

    Why: a stochastic scheduler draws ``randn(batch shape)`` from the run's generator at every step, so the
    noise a row gets depends on the batch it is sampled in. Sampling rows ``[offset, offset + n)`` of a batch
    under this context gives them exactly the noise they get in the whole batch (how a shard of the samples
    on one rank reproduces a one-process run). diffusers' stochastic schedulers draw through the
    ``randn_tensor`` their module imports; it is swapped for the duration only (sampling is single-threaded).
    """
    module = sys.modules[type(sched).step.__module__]
    draw = getattr(module, "randn_tensor", None)
    if draw is None:
        from compress.errors import DitCompressError

        raise DitCompressError(f"{type(sched).__name__} (module {module.__name__}) does not draw its step noise "
                               f"through diffusers' randn_tensor in this diffusers version, so a part of a batch "
                               f"cannot be sampled with the whole batch's noise; sample in one process.")

    def rows_of_whole(shape, *args, **kwargs) -> torch.Tensor:
        return draw((full, *shape[1:]), *args, **kwargs)[offset:offset + shape[0]]

    module.randn_tensor = rows_of_whole
    try:
        yield
    finally:
        module.randn_tensor = draw


@torch.no_grad()
def sample(
    denoiser: nn.Module | ModelAdapter | Denoiser,
    cond: Cond,
    noise: torch.Tensor,
    *,
    contract: SamplingContract | None = None,
    seed: int = 0,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, Cond], None] | None = None,
    rows: tuple[int, int] | None = None,
) -> SampleResult:
    """Run the reverse process from ``noise`` as ``contract`` (default: the denoiser's own) says.

    ``on_step(i, x, t, cond)`` sees each transformer input, which is how calibration data is gathered
    along a model's own trajectory. ``rows=(offset, full)``: this batch is rows ``offset:offset + n`` of a
    batch of ``full``; a stochastic sampler then gives them the step noise they get in that whole batch
    (``step_noise_rows``), so a batch can be split across processes without changing a sample.
    """
    call, own = resolve(denoiser)
    c = contract or own
    call = step_cache(denoiser, call, c)  # the contract's cache policy, fresh state for this run
    sched = make_scheduler(c.sampler, c.prediction)
    set_schedule(sched, c.sampler, c.prediction, c.steps, c.timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start at unit noise
    guided = c.guided
    if c.guidance_input is not None:  # guidance baked in: the scale is an input, one call per step
        cond = {**cond, c.guidance_input: torch.full((noise.shape[0],), float(c.guidance_scale))}
    full_cond = cat_cond(cond, c.null_cond(cond)) if guided else cond
    calls = 0
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        if hasattr(sched, "scale_model_input"):  # flow-matching schedulers take the latent as is
            x_in = sched.scale_model_input(x_in, t)
        t_in = t.expand(x_in.shape[0]).to(x_in.device)
        if on_step is not None:
            on_step(i, x_in, t_in, full_cond)
        out = call(x_in, t_in, full_cond)
        calls += 1
        if guided:
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + c.guidance_scale * (cond_out - uncond_out)
        kwargs = {"generator": gen} if c.sampler in STOCHASTIC else {}
        if c.sampler == "tcd":
            kwargs["eta"] = c.eta
        with (step_noise_rows(sched, *rows) if rows is not None and c.sampler in STOCHASTIC
              else contextlib.nullcontext()):
            x = sched.step(out, t, x, **kwargs).prev_sample
    return SampleResult(samples=x, nfe=c.nfe, calls=calls, cache=getattr(call, "stats", None))


def sample_batched(
    denoiser: nn.Module | ModelAdapter | Denoiser,
    cond: Cond,
    noise: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    rows: range | None = None,
    **kwargs,
) -> SampleResult:
    """``sample`` in chunks of ``batch_size`` (noise is fixed up front); only ``rows`` (default: all) of
    ``noise`` / ``cond`` when given, sampled exactly as in the run over all of them.

    Why ``rows`` and not a sliced ``noise``: chunks are cut at the same indices as in the whole run (a
    stochastic sampler restarts its generator per chunk, a batch-wide step-cache decision is taken per
    chunk), and a chunk that ``rows`` cuts short draws its step noise for the whole chunk
    (``sample(rows=...)``). The result holds ``len(rows)`` samples (an empty range gives none).
    """
    n = noise.shape[0]
    rows = range(n) if rows is None else rows
    if rows.step != 1:
        raise ValueError(f"rows must be a contiguous range, not {rows}")
    outs, calls, nfe = [], 0, 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        a, b = max(start, rows.start), min(stop, rows.stop)
        if a >= b:
            continue
        part = None if (a, b) == (start, stop) else (a - start, stop - start)
        r = sample(denoiser, slice_cond(cond, slice(a, b)), noise[a:b], rows=part, **kwargs)
        outs.append(r.samples)
        calls, nfe = calls + r.calls, r.nfe
        if progress:
            progress(b - a)
    return SampleResult(torch.cat(outs) if outs else noise[:0].clone(), nfe, calls)
