"""Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", stage one).

The student (the source with a zero-initialised guidance-scale embedding) learns to produce, in one call,
the source's classifier-free-guided prediction ``uncond + w (cond - uncond)`` at scales ``w`` drawn from the
configured range. Inputs: the source's own sampling trajectories (what the student will see when it
samples) and forward-noised clean data at uniform timesteps (every timestep covered). The student samples
exactly as the source did (same scheduler and steps), with half the calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.distillation.student import add_guidance_input, student_contract
from compress.distillation.trainer import DistillTrainer, Guidance, objective_tag
from compress.models.adapters import get_adapter
from compress.diffusion.sampling import cat_cond


class GuidanceTrainer(DistillTrainer):
    def train_step(self, step: int) -> dict[str, float]:
        n = self.cfg.batch_size
        n_traj = round(n * self.cfg.data.trajectory_fraction)
        parts = []
        if n_traj:
            parts.append(self.batches.rows(n_traj, self.gen, conditional=True))
        if n - n_traj:
            x0, cond = self.batches.clean(n - n_traj, self.gen)
            t = self.random_t(n - n_traj)
            parts.append((self.diffusion.noised(x0, torch.randn(x0.shape, generator=self.gen), t), t, cond))
        x = torch.cat([p[0] for p in parts])
        t = torch.cat([p[1] for p in parts])
        cond = parts[0][2] if len(parts) == 1 else cat_cond(parts[0][2], parts[1][2])
        w = self.guidance.draw(n, self.gen)
        x, t, w = self.to(x, t, w)
        cond = self.cond_to(cond)
        target = self.teacher_output(x, t, cond, w)
        loss = F.mse_loss(self.student_call(self.model, x, t, cond, w), target)
        self.optimize(loss)
        return {"loss": float(loss.detach()), "guided_mse": float(loss.detach())}


def distill_guidance(model: nn.Module, config, ctx) -> nn.Module:
    source = get_adapter(ctx.teacher).contract()
    guidance = Guidance(config.guidance, source)
    if guidance.input:
        add_guidance_input(model, guidance.hidden, guidance.scale)
    tag, file = objective_tag(ctx, config)
    student = GuidanceTrainer(model, ctx.teacher, config.training(), ctx.run, ctx.calibration, tag,
                              guidance=guidance, file=file).run()
    contract = student_contract(source, student, timesteps=None, sampler=None, scale=guidance.scale,
                                guidance_input=guidance.input)
    get_adapter(student).set_contract(contract)
    ctx.run.note(f"guidance distilled: scale {'input, trained on ' + str(list(guidance.range)) if guidance.input else 'fixed'}"
                 f" (default {guidance.scale}); one call per step ({contract.nfe} calls per image at {contract.steps} "
                 f"steps, source {source.nfe})")
    return student
