"""Calibration data: transformer inputs recorded along a model's own sampling trajectories.

Quantization calibrates on these rows, pruning scores blocks and channels on them, and every training
pass trains on them (what the student will actually see when it samples). Both CFG branches are
recorded. Trajectories follow the source's sampling contract, so a distilled few-step student is
calibrated along its own schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.context import RunContext
from compress.diffusion.sampling import make_noise, sample, slice_cond
from compress.models.adapters import Cond, get_adapter


class CalibrationConfig(BaseModel):
    """How calibration inputs are gathered: along the source's own sampling trajectory, both CFG branches."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(64, ge=1, le=100_000, description="Images whose trajectories are recorded.")
    steps: int = Field(25, ge=1, le=1000, description="Sampling steps of the recorded trajectories.")
    cfg_scale: float = Field(2.0, ge=1.0, le=50.0, description="Guidance used while recording (1 = no uncond branch).")
    timesteps: str = Field("uniform", pattern="^(uniform|middle)$",
                           description="'uniform': keep every step equally; 'middle': weight steps toward the middle "
                                       "of the schedule (PTQ4DM), where quantization error hurts most.")
    keep_steps: int | None = Field(None, ge=1, description="Keep only this many of the steps (None: all).")
    batch_size: int = Field(64, ge=1, le=65536, description="Images sampled at once while recording.")


@dataclass
class CalibrationSet:
    """One row per recorded transformer input: latent, timestep, condition and which step it came from."""

    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    step: torch.Tensor
    # The trajectories' end points: the source's samples and their (conditional) conditions, one per image.
    final: torch.Tensor | None = None
    final_cond: Cond | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def spread(self, n: int) -> "CalibrationSet":
        """At most ``n`` rows evenly spaced over the recording (every step and both branches represented)."""
        pick = torch.linspace(0, len(self) - 1, min(n, len(self))).long()
        return CalibrationSet(self.x[pick], self.t[pick], slice_cond(self.cond, pick), self.step[pick])

    def batches(self, size: int):
        for i in range(0, len(self), size):
            sl = slice(i, i + size)
            yield self.x[sl], self.t[sl], slice_cond(self.cond, sl)


def chosen_steps(steps: int, how: str, keep: int | None, seed: int) -> list[int]:
    """The sampling-step indices a recording keeps: all, evenly spaced, or weighted toward the middle."""
    if keep is None or keep >= steps:
        return list(range(steps))
    if how == "uniform":
        return sorted({round(i * (steps - 1) / max(keep - 1, 1)) for i in range(keep)})
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(-0.5 * ((torch.arange(steps) - (steps - 1) / 2) / (steps / 4)) ** 2)
    return sorted(torch.multinomial(w, keep, replacement=False, generator=g).tolist())


@torch.no_grad()
def record_trajectories(model: nn.Module, cfg: CalibrationConfig, run: RunContext) -> CalibrationSet:
    """Sample ``cfg.samples`` images with ``model`` and keep every transformer input of the chosen steps, plus
    the final samples. A source model samples with ``cfg``'s steps and guidance; a distilled student (fixed
    timesteps or guidance as an input) with its own contract: what it will see when it is deployed."""
    adapter = get_adapter(model)
    contract = adapter.contract()
    if not contract.fixed:  # a few-step student records its own schedule; a guidance student its own scale
        contract = contract.with_overrides(steps=cfg.steps, guidance_scale=None if contract.guidance_input
                                           else cfg.cfg_scale)
    gen = torch.Generator().manual_seed(run.seed + 1)
    labels = None
    if contract.num_classes:
        labels = torch.randint(0, contract.num_classes, (cfg.samples,), generator=gen)
    cond = contract.example_cond(cfg.samples, gen, labels=labels)
    noise = make_noise(cfg.samples, tuple(contract.latent_shape), run.seed)
    keep = set(chosen_steps(contract.steps, cfg.timesteps, cfg.keep_steps, run.seed))
    rows: dict[str, list] = {"x": [], "t": [], "step": [], "cond": []}
    finals = []

    def on_step(i, x, t, c):
        if i in keep:
            rows["x"].append(x.cpu())
            rows["t"].append(t.cpu())
            rows["step"].append(torch.full((x.shape[0],), i))
            rows["cond"].append({k: v.cpu() for k, v in c.items()})

    with run.progress(f"recording calibration trajectories ({cfg.samples} x {contract.steps} steps)",
                      cfg.samples) as advance:
        for s in range(0, cfg.samples, cfg.batch_size):
            sl = slice(s, s + cfg.batch_size)
            r = sample(adapter, slice_cond(cond, sl), noise[sl].to(run.device), contract=contract, seed=run.seed,
                       on_step=on_step)
            finals.append(r.samples.cpu())
            advance(noise[sl].shape[0])
    conds = rows["cond"]
    merged = {k: torch.cat([c[k] for c in conds]) if conds[0][k].dim() else conds[0][k] for k in conds[0]}
    return CalibrationSet(torch.cat(rows["x"]), torch.cat(rows["t"]), merged, torch.cat(rows["step"]),
                          final=torch.cat(finals), final_cond={k: v.cpu() for k, v in cond.items()})


@dataclass
class CalibrationSource:
    """Whose trajectories calibration data comes from, recorded once per configuration and reused.

    The recipe's source model by default; after a pass that changes how the model is sampled (a few-step
    student) the recipe runner points it at that pass's result, so later passes calibrate along the
    trajectories the deployed model will actually follow.
    """

    model: nn.Module
    config: CalibrationConfig
    run: RunContext
    cache: dict = field(default_factory=dict)

    def rows(self, config: CalibrationConfig | None = None) -> CalibrationSet:
        """Transformer inputs recorded along the source's sampling trajectories (cached per config)."""
        cfg = config or self.config
        key = cfg.model_dump_json()
        if key not in self.cache:
            self.cache[key] = record_trajectories(self.model, cfg, self.run)
        return self.cache[key]
