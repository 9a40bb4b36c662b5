"""What a pass receives besides the model: teacher, calibration data, device, progress and a log."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from compress.diffusion.sampling import make_noise, sample, slice_cond
from compress.errors import DitCompressError
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
    batch_size: int = Field(64, ge=1, description="Images sampled at once while recording.")


@dataclass
class CalibrationSet:
    """One row per recorded transformer input: latent, timestep, condition and which step it came from."""

    x: torch.Tensor
    t: torch.Tensor
    cond: Cond
    step: torch.Tensor
    # The trajectories' end points: the teacher's samples and their (conditional) conditions, one per image.
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


def _chosen_steps(steps: int, how: str, keep: int | None, seed: int) -> list[int]:
    if keep is None or keep >= steps:
        return list(range(steps))
    if how == "uniform":
        return sorted({round(i * (steps - 1) / max(keep - 1, 1)) for i in range(keep)})
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(-0.5 * ((torch.arange(steps) - (steps - 1) / 2) / (steps / 4)) ** 2)
    return sorted(torch.multinomial(w, keep, replacement=False, generator=g).tolist())


@dataclass
class PassContext:
    """Shared by every pass of one recipe run; the calibration set is recorded once and reused."""

    teacher: nn.Module
    calibration_config: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = "cpu"
    seed: int = 0
    console: Console | None = None
    show_progress: bool = True
    notes: list[str] = field(default_factory=list)
    # Training passes checkpoint under ``workdir`` and, with ``resume``, continue from their last checkpoint.
    workdir: Path | None = None
    resume: bool = False
    pass_index: int = 0  # position of the running pass in its recipe (names its checkpoints)
    _calib_cache: dict = field(default_factory=dict)

    def note(self, message: str) -> None:
        """Recorded in the manifest under the current pass."""
        self.notes.append(message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None):
        """A progress bar; yields ``advance(n=1, **fields)``."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"), console=self.console, transient=True,
                       disable=not self.show_progress)
        with bar:
            task = bar.add_task(description, total=total, info="")
            yield lambda n=1, info="": bar.update(task, advance=n, info=info)

    def calibration(self, config: CalibrationConfig | None = None) -> CalibrationSet:
        """Transformer inputs recorded along the teacher's sampling trajectories (cached per config)."""
        cfg = config or self.calibration_config
        key = cfg.model_dump_json()
        if key not in self._calib_cache:
            self._calib_cache[key] = self._record(cfg)
        return self._calib_cache[key]

    @torch.no_grad()
    def _record(self, cfg: CalibrationConfig) -> CalibrationSet:
        adapter = get_adapter(self.teacher)
        gen = torch.Generator().manual_seed(self.seed + 1)
        labels = None
        if adapter.num_classes:
            labels = torch.randint(0, adapter.num_classes, (cfg.samples,), generator=gen)
        cond = adapter.example_cond(cfg.samples, gen, labels=labels)
        noise = make_noise(cfg.samples, adapter.latent_shape, self.seed)
        keep = set(_chosen_steps(cfg.steps, cfg.timesteps, cfg.keep_steps, self.seed))
        rows: dict[str, list] = {"x": [], "t": [], "step": [], "cond": []}
        finals = []

        def on_step(i, x, t, c):
            if i in keep:
                rows["x"].append(x.cpu())
                rows["t"].append(t.cpu())
                rows["step"].append(torch.full((x.shape[0],), i))
                rows["cond"].append({k: v.cpu() for k, v in c.items()})

        with self.progress(f"recording calibration trajectories ({cfg.samples} x {cfg.steps} steps)",
                           cfg.samples) as advance:
            for s in range(0, cfg.samples, cfg.batch_size):
                sl = slice(s, s + cfg.batch_size)
                r = sample(adapter, slice_cond(cond, sl), noise[sl].to(self.device), steps=cfg.steps,
                           cfg_scale=cfg.cfg_scale, seed=self.seed, on_step=on_step)
                finals.append(r.samples.cpu())
                advance(noise[sl].shape[0])
        conds = rows["cond"]
        merged = {k: torch.cat([c[k] for c in conds]) if conds[0][k].dim() else conds[0][k] for k in conds[0]}
        return CalibrationSet(torch.cat(rows["x"]), torch.cat(rows["t"]), merged, torch.cat(rows["step"]),
                              final=torch.cat(finals), final_cond={k: v.cpu() for k, v in cond.items()})

    @torch.no_grad()
    def check_finite(self, model: nn.Module, pass_name: str) -> None:
        """NaN/Inf guard: run a few seeded inputs; name the first layer whose output is not finite."""
        adapter = get_adapter(model)
        gen = torch.Generator().manual_seed(self.seed)
        bad: list[str] = []

        def hook(name):
            def fn(_m, _i, out):
                if not bad and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                    bad.append(name)
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        try:
            x = torch.randn((2, *adapter.latent_shape), generator=gen)
            cond = adapter.example_cond(2, gen)
            checks = [(x, torch.full((2,), t), cond, "seeded noise") for t in (50.0, 500.0, 950.0)]
            for calib in self._calib_cache.values():  # and real calibration inputs across the trajectory
                rows = calib.spread(8)
                checks.append((rows.x.to(self.device), rows.t.to(self.device), rows.cond, "calibration inputs"))
            for xi, ti, ci, what in checks:
                out = adapter.forward(xi, ti, ci)
                if not torch.isfinite(out).all():
                    where = f"first at layer '{bad[0]}'" if bad else "in the final output"
                    raise DitCompressError(
                        f"pass '{pass_name}' produced non-finite outputs (NaN/Inf) on {what} at "
                        f"t={float(ti.reshape(-1)[0]):.0f}, {where}. Exclude that layer from the pass or use a "
                        f"wider format for it."
                    )
        finally:
            for h in handles:
                h.remove()
