"""The one sampler loop: any family (through its adapter), any diffusers scheduler, optional CFG."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.diffusion.schedules import make_scheduler
from compress.models.adapters import Cond, ModelAdapter, get_adapter

Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


@dataclass
class SampleResult:
    samples: torch.Tensor  # final latents / images
    nfe: int  # transformer evaluations per image (a CFG step counts two)
    calls: int  # batched transformer calls made


def make_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise for ``n`` images: identical for every variant given the same seed."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def cat_cond(a: Cond, b: Cond) -> Cond:
    return {k: torch.cat([a[k], b[k]]) if a[k].dim() else a[k] for k in a}


def slice_cond(cond: Cond, sl: slice) -> Cond:
    return {k: v[sl] if v.dim() else v for k, v in cond.items()}


@torch.no_grad()
def sample(
    model: nn.Module | ModelAdapter,
    cond: Cond,
    noise: torch.Tensor,
    *,
    steps: int = 50,
    sampler: str = "default",
    cfg_scale: float = 1.0,
    denoiser: Denoiser | None = None,
    seed: int = 0,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, Cond], None] | None = None,
) -> SampleResult:
    """Run the reverse process from ``noise``.

    ``denoiser`` overrides the PyTorch call (an ONNX Runtime or TensorRT runner with the same
    ``(x, t, cond)`` signature); ``on_step(i, x, t, cond)`` sees each transformer input, which is how
    calibration data is gathered along the source's own trajectory.
    """
    adapter = model if isinstance(model, ModelAdapter) else get_adapter(model)
    call = denoiser or adapter.forward
    sched = make_scheduler(sampler, adapter.prediction)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start at unit noise
    guided = cfg_scale != 1.0
    full_cond = cat_cond(cond, adapter.null_cond(cond)) if guided else cond
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
            out = uncond_out + cfg_scale * (cond_out - uncond_out)
        kwargs = {"generator": gen} if sampler == "ddpm" else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return SampleResult(samples=x, nfe=steps * (2 if guided else 1), calls=calls)


def sample_batched(
    model: nn.Module | ModelAdapter,
    cond: Cond,
    noise: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    **kwargs,
) -> SampleResult:
    """``sample`` in chunks of ``batch_size`` (same result as one big batch: noise is fixed up front)."""
    outs, calls, nfe = [], 0, 0
    for start in range(0, noise.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        r = sample(model, slice_cond(cond, sl), noise[sl], **kwargs)
        outs.append(r.samples)
        calls, nfe = calls + r.calls, r.nfe
        if progress:
            progress(min(batch_size, noise.shape[0] - start))
    return SampleResult(torch.cat(outs), nfe, calls)
