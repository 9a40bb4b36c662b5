"""What the few-step objectives share on top of the shared trainer: guidance scales, data, the two calls."""

from __future__ import annotations

import json

import torch
from torch import nn

from compress.distillation.core import Diffusion, guided_output
from compress.distillation.settings import GuidanceSettings
from compress.errors import DitCompressError
from compress.models.adapters import Cond, get_adapter
from compress.models.contract import SamplingContract
from compress.nn.guidance import GUIDANCE_INPUT
from compress.training import Trainer


class Guidance:
    """The guidance scales a student is trained at: a range (guidance as an input) or one fixed scale."""

    def __init__(self, settings, source: SamplingContract):
        g = settings or GuidanceSettings()
        self.input = g.input
        self.scale = float(g.scale if g.scale is not None else max(source.guidance_scale, 1.0))
        self.range = tuple(g.range) if g.range is not None else (1.0, max(2 * self.scale, 1.0))
        self.hidden = g.hidden

    def key(self) -> dict:
        return {"input": self.input, "scale": self.scale, "range": list(self.range), "hidden": self.hidden}

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if not self.input:
            return torch.full((n,), self.scale)
        lo, hi = self.range
        return lo + (hi - lo) * torch.rand(n, generator=gen)


class DistillTrainer(Trainer):
    """A trainer whose teacher is called with classifier-free guidance and whose student may take the scale."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg, run, source, tag: str, *, guidance: Guidance,
                 file: str | None = None):
        super().__init__(student, teacher, cfg, run, source, tag, file=file)
        self.guidance = guidance
        self.teacher_contract = get_adapter(teacher).contract()
        self.diffusion = Diffusion(self.teacher_contract.prediction)

    def resume_key(self) -> str:
        """The shared key plus the guidance and the objective's own settings: a checkpoint of the same pass with
        another schedule, guidance or objective setting is refused, not silently continued."""
        return json.dumps({"training": super().resume_key(), "guidance": self.guidance.key(),
                           "objective": self.objective_key()}, sort_keys=True)

    def objective_key(self) -> dict:
        """The objective's settings that change what a training step computes (JSON-able)."""
        return {}

    def teacher_output(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, w: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction at scales ``w``: classifier-free guided, through its guidance input if it has
        one, or a plain call if it is a student with one scale baked in."""
        c = self.teacher_contract
        if c.guidance_baked is not None:
            w = torch.ones_like(w)
        with torch.no_grad():
            return guided_output(self.teacher_adapter, c, x, t, cond, w)

    def student_call(self, module, x: torch.Tensor, t: torch.Tensor, cond: Cond, w: torch.Tensor) -> torch.Tensor:
        """``module`` (the wrapped student, or a copy of it) called as the student is sampled."""
        if self.guidance.input:
            cond = {**cond, GUIDANCE_INPUT: w.to(x.device)}
        return module(x, t, cond)

    def random_t(self, n: int, lo: float = 0.0, hi: float = 999.0) -> torch.Tensor:
        """Uniform training timesteps in [lo, hi]: integers for epsilon sources (their schedule is discrete)."""
        t = lo + (hi - lo) * torch.rand(n, generator=self.gen)
        return t.round() if self.diffusion.prediction == "epsilon" else t

    def to(self, *tensors):
        return [v.to(self.device) for v in tensors]

    def cond_to(self, cond: Cond) -> Cond:
        return {k: v.to(self.device) for k, v in cond.items()}


def check_schedule(timesteps: list[float], prediction: str, field: str = "student.timesteps") -> None:
    """A schedule the source's scheduler can produce: integer timesteps for a DDPM-trained (epsilon) source."""
    if prediction == "epsilon" and any(abs(t - round(t)) > 1e-6 for t in timesteps):
        raise DitCompressError(f"pass 'distill', field '{field}': {timesteps} are not integers, but an epsilon "
                               f"(DDPM-trained) source has a discrete schedule of timesteps 0..999.")


def objective_tag(ctx, config, suffix: str = "") -> tuple[str, str]:
    """(checkpoint tag, file): one file per pass position, so another objective's checkpoint there is refused."""
    base = f"pass{ctx.run.pass_index + 1}-distill"
    return f"{base}-{config.objective}{suffix}", f"{base}{suffix}"
