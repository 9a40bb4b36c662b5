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
from compress.models.adapters import Cond, get_adapter



def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (what an uncompressed weights file would hold)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _to(cond: Cond, device: torch.device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def speed_inputs(model: nn.Module, batch: int, seed: int, sampler: str = "default",
                 steps: int = 50) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Fixed, seeded transformer inputs: ``example_cond`` + randn latents + a mid-schedule timestep."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    cond = adapter.example_cond(batch, gen)
    x = torch.randn((batch, *adapter.latent_shape), generator=gen)
    sched = make_scheduler(sampler, adapter.prediction)
    sched.set_timesteps(max(steps, 2))
    t = sched.timesteps[len(sched.timesteps) // 2].expand(batch)
    device = model_device(model)
    return x.to(device), t.to(device), _to(cond, device)


@torch.no_grad()
def macs_per_call(model: nn.Module, seed: int = 0, sampler: str = "default") -> int | None:
    """Analytic multiply-accumulates of one PyTorch transformer call at batch 1 (FLOPs / 2).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention); None
    when the model cannot be traced by it (custom kernels that raise).
    """
    from torch.utils.flop_counter import FlopCounterMode

    adapter = get_adapter(model)
    x, t, cond = speed_inputs(model, 1, seed, sampler)
    try:
        with FlopCounterMode(display=False) as counter:
            adapter.forward(x, t, cond)
    except Exception:  # an op the counter cannot run through: report "unknown", not a crash
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
        self.available = self.cuda or self._rss_supported()

    @staticmethod
    def _rss_supported() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _vm_hwm_kb() is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.available = False

    def read_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.available:
            return None
        kb = _vm_hwm_kb()
        return None if kb is None else kb / 1024


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


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
