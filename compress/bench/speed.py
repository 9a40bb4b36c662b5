"""Speed, memory and cost measurements for the benchmark harness.

Timing is interleaved across variants (round-robin: repeat 1 of every variant, then repeat 2, ...)
so that slow drifts of a noisy machine (other jobs, thermal state, frequency scaling) hit every
variant alike instead of whichever happened to be measured last.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.diffusion.schedules import make_scheduler
from compress.machine import peak_rss_mb, reset_peak_rss
from compress.models.adapters import Cond, get_adapter
from compress.models.contract import SamplingContract


def speed_inputs(contract: SamplingContract, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Fixed, seeded transformer inputs: seeded conditions + randn latents + a mid-schedule timestep (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    cond = contract.example_cond(batch, gen)
    x = torch.randn((batch, *contract.latent_shape), generator=gen)
    sched = make_scheduler(contract.sampler, contract.prediction)
    sched.set_timesteps(max(contract.steps, 2))
    t = sched.timesteps[len(sched.timesteps) // 2].expand(batch)
    return x, t, cond


def sampling_entry(name: str, runner, contract: SamplingContract, batch: int, seed: int) -> SpeedEntry:
    """A whole sampling run of ``batch`` images as the timed call: with a step-cache policy the cost of a call
    depends on the step, so only a run measures ms per image (and the policy's skipped work) honestly."""
    from compress.diffusion.sampling import sample

    gen = torch.Generator().manual_seed(seed)
    cond = contract.example_cond(batch, gen)
    noise = torch.randn((batch, *contract.latent_shape), generator=gen)

    def run(x, _t, c):
        entry.info["cache"] = sample(runner, c, x, contract=contract, seed=seed).cache

    entry = SpeedEntry(name, run, (noise, torch.zeros(batch), cond), runner.device)
    return entry


@torch.no_grad()
def macs_per_call(model: nn.Module, seed: int = 0) -> int | None:
    """Analytic multiply-accumulates of one PyTorch transformer call at batch 1 (FLOPs / 2).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention); None
    when the model cannot be traced by it (custom kernels that raise).
    """
    from torch.utils.flop_counter import FlopCounterMode

    adapter = get_adapter(model)
    x, t, cond = speed_inputs(adapter.contract(), 1, seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with FlopCounterMode(display=False) as counter:
            adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
    except Exception:  # noqa: BLE001 - an op the counter cannot run through: report "unknown", not a crash
        return None
    return int(counter.get_total_flops() // 2)


# ---- peak memory ----------------------------------------------------------------------------------
class PeakMemory:
    """Per-call peak memory: CUDA ``max_memory_allocated``, else the process peak RSS (``VmHWM``).

    On CPU the kernel's high-water mark is reset to the current RSS before each call (writing 5 to
    ``/proc/self/clear_refs``) and read afterwards, so the figure is the peak *process* RSS while that
    variant ran: it includes the interpreter, torch and every other model loaded in the process.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.available = self.cuda or (reset_peak_rss() and peak_rss_mb() is not None)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            self.available = reset_peak_rss()

    def read_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb() if self.available else None


# ---- interleaved timing ---------------------------------------------------------------------------
@dataclass
class SpeedEntry:
    """One variant to time: its call and fixed inputs."""

    name: str
    call: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
    inputs: tuple[torch.Tensor, torch.Tensor, Cond]
    device: torch.device
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    info: dict = field(default_factory=dict)  # what the last call reported (a sampling run's cache stats)


@dataclass
class SpeedStats:
    median_ms: float
    p90_ms: float
    times_ms: list[float]
    peak_mem_mb: float | None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _one_call(e: SpeedEntry, mem: PeakMemory, timed: bool) -> None:
    x, t, cond = e.inputs
    mem.reset()
    _sync(e.device)
    t0 = time.perf_counter()
    e.call(x, t, cond)
    _sync(e.device)
    dt = (time.perf_counter() - t0) * 1000
    peak = mem.read_mb()
    if timed:
        e.times_ms.append(dt)
    if peak is not None:
        e.peak_mb = peak if e.peak_mb is None else max(e.peak_mb, peak)


def time_interleaved(entries: list[SpeedEntry], warmup: int, repeats: int,
                     on_call: Callable[[], None] | None = None) -> dict[str, SpeedStats]:
    """``warmup`` untimed then ``repeats`` timed calls per entry, round-robin across entries.

    Each round starts one entry later than the previous one, so no variant is always measured right
    after the same neighbour. Returns median / p90 milliseconds per call and peak memory by name.
    """
    mems = {e.name: PeakMemory(e.device) for e in entries}
    n = len(entries)
    for rnd in range(warmup + repeats):
        for k in range(n):
            e = entries[(rnd + k) % n]
            _one_call(e, mems[e.name], timed=rnd >= warmup)
            if on_call is not None:
                on_call()
    return {
        e.name: SpeedStats(statistics.median(e.times_ms), percentile(e.times_ms, 90), list(e.times_ms), e.peak_mb)
        for e in entries
    }
