"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models").

Round r trains a student that takes one DDIM step where its teacher takes two: from x_t on the student's
grid the teacher steps to the midpoint and on to the student's next timestep, and the student's output
target is the one whose single DDIM step lands on the same point. The student of one round is the teacher
of the next; ``start_steps`` halve to ``student.steps``. The loss is the output-space error with a
truncated-SNR weight (an x0-space error at high noise, where few-step students lose most), and every round
checkpoints on its own, so a killed run resumes inside the round it was in.

A one-step student of an epsilon source may take its single call at another timestep label than the grid's 999
(``progressive.one_step_timestep``, DMD2's "conditioning timestep"): the input is still pure noise, but the
image is read off the output with that label's coefficients, so an output error is not divided by
sqrt(alpha_bar_999) ~ 0.006.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from compress.distillation.student import add_guidance_input, student_contract
from compress.distillation.core import grid
from compress.distillation.settings import ProgressiveSettings
from compress.distillation.trainer import DistillTrainer, Guidance, check_schedule, objective_tag
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter


class ProgressiveRound(DistillTrainer):
    """One halving: ``teacher_grid`` has twice the points of the student's (every other one)."""

    def __init__(self, *args, teacher_grid: list[float], one_step_label: float | None = None, **kw):
        super().__init__(*args, **kw)
        self.teacher_grid = teacher_grid
        self.student_grid = teacher_grid[::2]
        self.one_step_label = one_step_label  # a one-step student's call: this label on the grid's first input

    def objective_key(self) -> dict:
        key = {"teacher_grid": self.teacher_grid}
        return key if self.one_step_label is None else {**key, "one_step_timestep": self.one_step_label}

    def train_step(self, step: int) -> dict[str, float]:
        n, d = self.cfg.batch_size, self.diffusion
        k = len(self.student_grid)
        i = torch.randint(0, k, (n,), generator=self.gen)
        tg = torch.tensor(self.teacher_grid + [0.0])
        t, t_mid, t_next = tg[2 * i], tg[2 * i + 1], tg[(2 * i + 2).clamp(max=len(self.teacher_grid))]
        x0, cond = self.batches.clean(n, self.gen)
        x = d.noised(x0, torch.randn(x0.shape, generator=self.gen), t)
        w = self.guidance.draw(n, self.gen)
        x, t, t_mid, t_next, w = self.to(x, t, t_mid, t_next, w)
        cond = self.cond_to(cond)
        x_mid = d.ode_step(self.teacher_output(x, t, cond, w), x, t, t_mid)
        x_next = d.ode_step(self.teacher_output(x_mid, t_mid, cond, w), x_mid, t_mid, t_next)
        # the student's call: at its own label (a one-step student's), the output whose single step lands there
        ts = t if self.one_step_label is None else torch.full_like(t, self.one_step_label)
        target = d.output_for(x, ts, x_next, t_next)
        out = self.student_call(self.model, x, ts, cond, w)
        loss = (d.snr_weight(ts, out) * (out - target).pow(2)).mean()
        self.optimize(loss)
        return {"loss": float(loss.detach()), "weighted_mse": float(loss.detach())}


def distill_progressive(model: nn.Module, config, ctx) -> nn.Module:
    settings = config.progressive or ProgressiveSettings()
    inp = get_adapter(model).contract()
    # round 1's teacher: the pass's input when guidance was already distilled into it (one call per step),
    # else the source itself with classifier-free guidance
    first = copy.deepcopy(model).eval().requires_grad_(False) if inp.guidance_input else ctx.teacher
    source = get_adapter(first).contract()
    guidance = Guidance(config.guidance, source)
    if guidance.input:
        add_guidance_input(model, guidance.hidden, guidance.scale)
    rounds = int(math.log2(settings.start_steps // config.student.steps))
    teacher, steps = first, settings.start_steps
    # the first teacher's evenly spaced grid (whole timesteps for a discrete-schedule epsilon source); every
    # round's student keeps every other point of its teacher's grid
    points = grid(steps)
    if source.prediction == "epsilon":
        points = [float(round(t)) for t in points]
    check_schedule(points, source.prediction, "progressive.start_steps")
    label = settings.one_step_timestep
    if label is not None:
        if source.prediction != "epsilon":
            raise DitCompressError("pass 'distill', field 'progressive.one_step_timestep': for epsilon sources only; a "
                                   "flow source's single step (x - v at t = 1000) divides by nothing")
        check_schedule([label], source.prediction, "progressive.one_step_timestep")
    for r in range(1, rounds + 1):
        tag, file = objective_tag(ctx, config, f"-round{r}" if r > 1 else "")
        last_label = label if r == rounds else None
        ProgressiveRound(model, teacher, config.training(), ctx.run, ctx.calibration, tag, guidance=guidance,
                         file=file, teacher_grid=points, one_step_label=last_label).run()
        ctx.run.note(f"progressive round {r}/{rounds}: {steps} -> {steps // 2} steps"
                     + (f", its call labelled t = {last_label:g}" if last_label is not None else ""))
        steps //= 2
        points = points[::2] if last_label is None else [float(last_label)]
        if r < rounds:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            get_adapter(teacher).set_contract(_round_contract(model, points, guidance))
    sampler = "euler" if source.prediction == "flow" else "tcd"
    contract = student_contract(source, model, timesteps=points, sampler=sampler, scale=guidance.scale,
                                guidance_input=guidance.input)
    get_adapter(model).set_contract(contract)
    return model


def _round_contract(model: nn.Module, timesteps: list[float], guidance: Guidance):
    """The contract of an intermediate student (next round's teacher): a guidance input, or its baked scale."""
    c = get_adapter(model).contract()
    if guidance.input:
        return c.model_copy(update={"guidance_scale": guidance.scale})
    return c.model_copy(update={"guidance_scale": 1.0, "guidance_baked": guidance.scale})
