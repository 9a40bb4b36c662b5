"""Calibrating a step-cache policy to a target speed-up (or a quality floor) on recorded trajectories.

The model the pass is applied to (a quantized model, a few-step student: whatever it is by then) samples a
few seeded images along its own sampling contract; that recording is the reference. Each candidate
policy then samples the same noise and conditions, and is scored by its speed-up in block evaluations
(depth x steps / blocks evaluated: the part of the work a cache can remove) and its PSNR against the
reference samples. The search keeps every field the recipe set and searches the others:

- schedules (fora, delta_dit, taylorseer): for each combination of warm-up, cool-down and the method's
  structural choices (Taylor order and target, Δ-DiT range and boundary), the largest full-step fraction
  that still reaches the target (found by counting, no sampling), then one sampling run to score it; with a
  quality floor, a bisection on the interval;
- first_block: a bisection on the threshold (log scale) for each warm-up / cool-down / cap combination;
  with ``metric: modulated_input`` TeaCache's rescaling polynomial is first fitted on the recording (the
  modulated input's step-to-step change against the output's).

The best candidate is the most accurate one that reaches the target (or the fastest above the floor); the
whole curve that was searched is returned for the manifest and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compress.cache import CacheEngine, SkipCount, TorchStepCache
from compress.diffusion.sampling import make_noise, sample, sample_batched, slice_cond
from compress.errors import DitCompressError
from compress.metrics import psnr
from compress.models.adapters import get_adapter
from compress.models.cache_policy import METHOD_DEFAULTS, METHOD_FIELDS, CachePolicy, CacheSettings
from compress.models.contract import SamplingContract


class CalibrateConfig(BaseModel):
    """What the calibration search aims at, and on how much data."""

    model_config = ConfigDict(extra="forbid")

    target_speedup: float | None = Field(
        None, gt=1.0, le=10_000, description="Reach at least this speed-up in block evaluations, at the least error.")
    min_psnr: float | None = Field(
        None, gt=0.0, le=100.0, description="Or: the fastest policy whose samples stay at least this close (dB) to "
                                            "the uncached model's.")
    samples: int = Field(
        32, ge=2, le=4096, description="Calibration images (seeded; both guidance branches run).")
    batch_size: int = Field(
        64, ge=1, le=4096, description="Images sampled at once.")

    @model_validator(mode="after")
    def _one_goal(self):
        if (self.target_speedup is None) == (self.min_psnr is None):
            raise ValueError("target_speedup: give exactly one of target_speedup and min_psnr")
        return self


@dataclass
class Candidate:
    policy: CachePolicy
    speedup: float
    psnr_db: float | None = None
    skipped: float = 0.0

    def row(self) -> dict:
        fields = {k: v for k, v in self.policy.model_dump(exclude={"calibration"}).items()
                  if v is not None and k != "method"}
        return {**fields, "speedup": round(self.speedup, 4), "skipped_block_fraction": round(self.skipped, 4),
                "psnr_db": None if self.psnr_db is None else round(self.psnr_db, 3)}


def ceiling(settings: CacheSettings, steps: int, depth: int) -> float:
    """The largest block-evaluation speed-up the method can reach on ``steps`` steps (the first step and the
    fixed warm-up / cool-down always run in full)."""
    full = max(settings.warmup, 1) + settings.cooldown
    rest = max(steps - full, 0)
    if settings.method == "first_block":
        p = settings.probe_blocks or METHOD_DEFAULTS["probe_blocks"]
        return steps * depth / (full * depth + rest * p)
    if settings.method == "delta_dit":
        k = settings.delta_blocks or max(depth // 2, 1)
        return steps * depth / (full * depth + rest * (depth - min(k, depth)))
    return steps / min(full, steps)


def schedule_speedup(policy: CachePolicy, steps: int, depth: int) -> float:
    """Block-evaluation speed-up of a schedule policy, by running its decisions without a model."""
    eng = CacheEngine(policy, steps, depth, 1)
    dummy = (torch.zeros(1), None)
    for _ in range(steps):
        eng.begin()
        if eng.decide():
            eng.store(dummy, dummy)
    return 1.0 / max(1e-9, 1.0 - eng.stats()["skipped_block_fraction"])


class Recording:
    """The model's own samples on seeded noise and conditions: what every candidate is compared with."""

    def __init__(self, model: nn.Module, contract: SamplingContract, samples: int, batch_size: int, seed: int):
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.contract = contract.model_copy(update={"cache": None})
        gen = torch.Generator().manual_seed(seed + 1)
        labels = (torch.randint(0, contract.num_classes, (samples,), generator=gen) if contract.num_classes
                  else None)
        self.cond = contract.example_cond(samples, gen, labels=labels)
        self.noise = make_noise(samples, tuple(contract.latent_shape), seed)
        self.reference = self._sample(self.contract)
        self.data_range = float(self.reference.max() - self.reference.min()) or 1.0
        self.runs = 0

    def _sample(self, contract: SamplingContract) -> torch.Tensor:
        return sample_batched(self.model, self.cond, self.noise, contract=contract, seed=self.seed,
                              batch_size=self.batch_size).samples

    def score(self, policy: CachePolicy) -> Candidate:
        """Sample with ``policy``; its measured block speed-up and PSNR against the reference."""
        c = self.contract.model_copy(update={"cache": policy})
        count = SkipCount()
        depth = len(get_adapter(self.model).blocks())
        outs = []
        for s in range(0, self.noise.shape[0], self.batch_size):
            sl = slice(s, s + self.batch_size)
            r = sample(self.model, slice_cond(self.cond, sl), self.noise[sl], contract=c, seed=self.seed)
            outs.append(r.samples)
            count.add(r.cache, depth)
        self.runs += 1
        out = torch.cat(outs)
        q = psnr(out, self.reference, self.data_range) if torch.isfinite(out).all() else 0.0
        return Candidate(policy, 1.0 / max(1e-9, 1.0 - count.fraction), q, count.fraction)


def _grid(steps: int) -> tuple[list[int], list[int]]:
    warm = sorted({w for w in (1, 2, 4, 8) if w < steps})
    cool = sorted({c for c in (0, 2) if c < steps - 1}) or [0]
    return warm, cool


def _combos(settings: CacheSettings, steps: int, depth: int) -> list[dict]:
    """Structural choices to try: fields the recipe left out, over small grids; fixed fields as given."""
    warm, cool = _grid(steps)
    given = settings.model_dump(exclude_unset=True)
    axes: dict[str, list] = {"warmup": warm, "cooldown": cool}
    m = settings.method
    if m == "taylorseer":
        axes |= {"order": [1, 2], "forecast": ["output", "residual"]}
    elif m == "delta_dit":
        axes |= {"delta_blocks": sorted({max(1, depth * k // 6) for k in (2, 3, 4)}),
                 "delta_boundary": sorted({steps * k // 4 for k in (1, 2, 3)})}
    elif m == "first_block":
        axes |= {"max_cached": [None, 4]}
    combos = [{}]
    for name, values in axes.items():
        values = [given[name]] if name in given else values
        combos = [{**c, name: v} for c in combos for v in values]
    base = {k: v for k, v in given.items() if k in (*METHOD_FIELDS[m], "warmup", "cooldown", "max_cached")}
    return [{**base, **c, "method": m} for c in combos if c["warmup"] + c["cooldown"] < steps]


def _policy(fields: dict) -> CachePolicy | None:
    try:
        return CachePolicy(**fields)
    except ValueError:
        return None


def fit_rescale(rec: Recording, probe_fields: dict) -> list[float]:
    """TeaCache's rescaling: a degree-4 polynomial from the modulated input's step-to-step relative L1 to the
    output's, fitted on the reference run (every step computed, the probe read through the cache hooks)."""
    import numpy as np

    n = min(rec.batch_size, rec.noise.shape[0])
    contract = rec.contract.model_copy(update={"cache": CachePolicy(**{**probe_fields, "threshold": 0.0})})
    logged: list[tuple[float, float]] = []

    class Observed:  # a denoiser whose cached call logs (probe change, output change) per step
        def __init__(self, model):
            self.adapter, self.contract = get_adapter(model), contract

        def cached_call(self, c):
            inner, last = TorchStepCache(self.adapter, self.adapter.forward, c), {}

            def call(x, t, cond):
                out = inner(x, t, cond)
                if last:
                    logged.append((_rel(inner.last_probe, last["probe"]), _rel(out, last["out"])))
                last.update(probe=inner.last_probe, out=out)
                return out
            return call

        def __call__(self, x, t, cond):
            return self.adapter.forward(x, t, cond)

    sample(Observed(rec.model), slice_cond(rec.cond, slice(0, n)), rec.noise[:n], contract=contract, seed=rec.seed)
    x, y = np.array(logged).T
    return [float(c) for c in np.polyfit(x, y, deg=min(4, len(x) - 1))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def search(model: nn.Module, contract: SamplingContract, settings: CacheSettings, goal: CalibrateConfig,
           seed: int = 0, progress=None) -> tuple[CachePolicy, list[dict]]:
    """The calibrated policy and the curve searched (one row per scored candidate, with speed-up and PSNR)."""
    depth, steps = len(get_adapter(model).blocks()), contract.steps
    top = ceiling(settings, steps, depth)
    if goal.target_speedup is not None and goal.target_speedup > top + 1e-9:
        raise DitCompressError(
            f"pass 'cache', field 'calibrate.target_speedup': {goal.target_speedup:g}x is above the {top:.3g}x that "
            f"method '{settings.method}' can reach on {steps} sampling steps and {depth} blocks (the first "
            f"{max(settings.warmup, 1) + settings.cooldown} steps run in full); lower the target or sample more steps.")
    rec = Recording(model, contract, goal.samples, goal.batch_size, seed)
    combos = _combos(settings, steps, depth)
    if settings.method == "first_block" and (settings.metric or "residual") == "modulated_input" \
            and settings.rescale is None:
        coeffs = fit_rescale(rec, {k: v for k, v in combos[0].items() if k in ("method", "probe_blocks", "metric")})
        combos = [{**c, "rescale": coeffs} for c in combos]
    scored: list[Candidate] = []

    def score(fields: dict) -> Candidate | None:
        p = _policy(fields)
        if p is None:
            return None
        c = rec.score(p)
        scored.append(c)
        if progress:
            progress()
        return c

    for combo in combos:
        if settings.method == "first_block":
            _search_threshold(combo, goal, score, settings.threshold)
        else:
            _search_interval(combo, goal, score, steps, depth, settings.interval)
    ok = [c for c in scored if (c.speedup >= goal.target_speedup - 1e-9 if goal.target_speedup is not None
                                else c.psnr_db >= goal.min_psnr and c.skipped > 0)]  # skipping nothing never pays
    curve = sorted((c.row() for c in scored), key=lambda r: r["speedup"])
    if not ok:
        best = max(scored, key=lambda c: c.speedup if goal.target_speedup is not None else c.psnr_db, default=None)
        what = (f"target_speedup': no candidate reached {goal.target_speedup:g}x (the fastest: "
                f"{best.speedup:.3g}x)" if goal.target_speedup is not None else
                f"min_psnr': no candidate stayed above {goal.min_psnr:g} dB (the best: {best.psnr_db:.3g} dB at "
                f"{best.speedup:.3g}x)") if best else "': nothing to search"
        raise _NoPolicy(f"pass 'cache', field 'calibrate.{what} with method '{settings.method}' on {steps} steps",
                        curve)
    if goal.target_speedup is not None:
        best = max(ok, key=lambda c: (c.psnr_db, c.speedup))
    else:
        best = max(ok, key=lambda c: (c.speedup, c.psnr_db))
    info = {"target_speedup": goal.target_speedup, "min_psnr": goal.min_psnr, "samples": goal.samples,
            "steps": steps, "guidance_scale": contract.guidance_scale, "speedup": round(best.speedup, 4),
            "skipped_block_fraction": round(best.skipped, 4), "psnr_db": round(best.psnr_db, 3),
            "candidates": len(scored)}
    return best.policy.model_copy(update={"calibration": info}), curve


class _NoPolicy(DitCompressError):
    """No candidate met the goal; carries the searched curve (the pass may leave caching off)."""

    def __init__(self, message: str, curve: list[dict]):
        super().__init__(message)
        self.curve = curve


def _search_interval(combo: dict, goal: CalibrateConfig, score, steps: int, depth: int, fixed: int | None) -> None:
    if fixed is not None:
        score({**combo, "interval": fixed})
        return
    intervals = [i for i in range(2, steps + 1) if _policy({**combo, "interval": i}) is not None]
    if goal.target_speedup is not None:  # the smallest interval that reaches the target: counted, then scored
        for i in intervals:
            p = _policy({**combo, "interval": i})
            if schedule_speedup(p, steps, depth) >= goal.target_speedup - 1e-9:
                score({**combo, "interval": i})
                return
        return
    lo, hi = 0, len(intervals) - 1  # the largest interval above the floor (quality falls as it grows)
    while lo <= hi:
        mid = (lo + hi) // 2
        c = score({**combo, "interval": intervals[mid]})
        if c is not None and c.psnr_db >= goal.min_psnr:
            lo = mid + 1
        else:
            hi = mid - 1


def _search_threshold(combo: dict, goal: CalibrateConfig, score, fixed: float | None, rounds: int = 9) -> None:
    if fixed is not None:
        score({**combo, "threshold": fixed})
        return
    lo, hi = math.log(1e-3), math.log(20.0)  # log threshold; more skipping as it grows
    for _ in range(rounds):
        mid = (lo + hi) / 2
        c = score({**combo, "threshold": round(math.exp(mid), 6)})
        good = (c.speedup >= goal.target_speedup - 1e-9) if goal.target_speedup is not None else \
            (c.psnr_db >= goal.min_psnr)
        # target: the smallest threshold that reaches it; floor: the largest that stays above it
        if (goal.target_speedup is not None) == good:
            hi = mid
        else:
            lo = mid


