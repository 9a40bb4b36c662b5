"""Consistency distillation, LCM-style (Luo et al., "Latent Consistency Models"; Song et al., "Consistency Models").

The student ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` (LCMScheduler's boundary scalings, so training
and sampling evaluate the same function; flow students use x0 directly, as FlowMatchLCMScheduler does)
maps any point of the source's guided ODE trajectory to its end. Each training pair is one step of the
source's DDIM solver apart along a ``solver_steps`` grid (the skipping schedule): the online student at
the later point is pulled toward an EMA target network at the earlier one, under a pseudo-Huber loss. The
guidance scale is an input (drawn from the range) or fixed. Sampling: multistep consistency sampling
(predict the end, re-noise to the next timestep) at the chosen subset of the solver grid.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.distillation.student import add_guidance_input, student_contract
from compress.distillation.core import consistency_output, grid
from compress.distillation.settings import ConsistencySettings
from compress.distillation.trainer import DistillTrainer, Guidance, check_schedule, objective_tag
from compress.models.adapters import get_adapter
from compress.training import full_state, load_full_state


class ConsistencyTrainer(DistillTrainer):
    def __init__(self, *args, solver_grid: list[float], target_ema: float, huber_c: float, **kw):
        super().__init__(*args, **kw)
        self.solver_grid, self.target_ema, self.huber_c = solver_grid, target_ema, huber_c

    def objective_key(self) -> dict:
        return {"solver_grid": self.solver_grid, "target_ema": self.target_ema, "huber_c": self.huber_c}

    def setup(self) -> None:
        self.target = self.shard(copy.deepcopy(self.student).eval().requires_grad_(False))
        self.target_adapter = get_adapter(self.target)

    def extra_state(self) -> dict:
        return {"target": full_state(self.target)}

    def load_extra_state(self, state: dict) -> None:
        load_full_state(self.target, state["target"])

    def train_step(self, step: int) -> dict[str, float]:
        n, d = self.cfg.batch_size, self.diffusion
        g = torch.tensor(self.solver_grid + [0.0])
        i = torch.randint(0, len(self.solver_grid), (n,), generator=self.gen)
        t, t_prev = g[i], g[i + 1]
        x0, cond = self.batches.clean(n, self.gen)
        x = d.noised(x0, torch.randn(x0.shape, generator=self.gen), t)
        w = self.guidance.draw(n, self.gen)
        x, t, t_prev, w = self.to(x, t, t_prev, w)
        cond = self.cond_to(cond)
        x_prev = d.ode_step(self.teacher_output(x, t, cond, w), x, t, t_prev)
        with torch.no_grad():
            target = consistency_output(self.diffusion, self.student_call(self.target_adapter.forward, x_prev, t_prev, cond, w),
                                         x_prev, t_prev)
        pred = consistency_output(self.diffusion, self.student_call(self.model, x, t, cond, w), x, t)
        c = self.huber_c
        loss = ((pred - target).pow(2).flatten(1).mean(1) + c * c).sqrt().sub(c).mean()
        self.optimize(loss)
        with torch.no_grad():
            for pt, ps in zip(self.target.parameters(), self.student.parameters()):
                pt.lerp_(ps.detach(), 1 - self.target_ema)
        return {"loss": float(loss.detach()), "huber": float(loss.detach())}


def distill_consistency(model: nn.Module, config, ctx) -> nn.Module:
    settings = config.consistency or ConsistencySettings()
    source = get_adapter(ctx.teacher).contract()
    guidance = Guidance(config.guidance, source)
    if guidance.input:
        add_guidance_input(model, guidance.hidden, guidance.scale)
    solver = grid(settings.solver_steps)
    k = config.student.steps
    timesteps = config.student.timesteps or [solver[round(j * len(solver) / k)] for j in range(k)]
    check_schedule(timesteps, source.prediction)
    tag, file = objective_tag(ctx, config)
    student = ConsistencyTrainer(model, ctx.teacher, config.training(), ctx.run, ctx.calibration, tag,
                                 guidance=guidance, file=file, solver_grid=solver, target_ema=settings.target_ema,
                                 huber_c=settings.huber_c).run()
    sampler = "flow-lcm" if source.prediction == "flow" else "lcm"
    contract = student_contract(source, student, timesteps=timesteps, sampler=sampler, scale=guidance.scale,
                                guidance_input=guidance.input)
    get_adapter(student).set_contract(contract)
    ctx.run.note(f"consistency student: {k} steps {timesteps} ({sampler}), solver grid {settings.solver_steps}")
    return student
