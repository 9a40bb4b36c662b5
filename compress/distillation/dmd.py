"""Distribution-matching distillation (Yin et al., DMD and DMD2: "Improved Distribution Matching Distillation").

A few-step generator ``G`` (the student, initialised from the source) is trained so that the distribution of
its samples matches the source's. At a random timestep the generator's sample is noised; the source with
classifier-free guidance gives the "real" score's clean estimate, a fake score network (a trainable copy of
the source, fitted with the ordinary denoising loss to the generator's own samples) gives the "fake" one,
and their difference, normalised per sample, is the gradient pushed into the generator's output. Two
time-scale updates: the fake score takes ``fake_updates`` steps for every generator step, at its own
learning rate. Optional: a regression loss toward the source's samples from the same noise (DMD's
stabiliser) and a GAN loss from a classifier on the fake score's middle-block features (DMD2's sharpener).
Multi-step students train with backward simulation: the input of step k is produced by the student's own
earlier steps, re-noised as multistep consistency sampling does, so training sees what sampling sees.

Everything is in clean-image (x0) space with the source's own forward process, so flow (velocity) sources
train with the same code and the same stability as epsilon ones.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from compress.distillation.student import add_guidance_input, student_contract
from compress.distillation.core import consistency_output, grid
from compress.distillation.trainer import DistillTrainer, Guidance, check_schedule, objective_tag
from compress.diffusion.sampling import make_noise
from compress.models.adapters import get_adapter
from compress.models.adapters.base import block_hidden
from compress.training import (Trainee, full_optimizer_state, full_state, load_full_optimizer_state,
                               load_full_state)


class _Critic(nn.Module):
    """The GAN head: mean-pooled middle-block tokens of the fake score -> one logit."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.mean(dim=1)).squeeze(-1)


class DMDTrainer(DistillTrainer):
    def __init__(self, *args, settings, timesteps: list[float], **kw):
        super().__init__(*args, **kw)
        self.settings, self.timesteps = settings, timesteps

    def objective_key(self) -> dict:
        return {"dmd": self.settings.model_dump(mode="json"), "timesteps": list(self.timesteps)}

    # -- networks -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        s, lr = self.settings, self.cfg.lr * self.settings.fake_lr_ratio
        fake = copy.deepcopy(self.teacher).to(self.device).train(False).requires_grad_(True)
        self.fake_adapter = get_adapter(fake)
        blocks = self.fake_adapter.blocks()
        # every call goes through the wrapper (FSDP gathers the root's parameters in its forward hook)
        self.fake = self.wrap(Trainee(fake, None), [b.module for b in blocks])
        params = list(fake.parameters())
        self.critic = None
        if s.gan:
            self.critic = self.wrap(_Critic(self.fake_adapter.hidden_size).to(self.device))
            self._mid = blocks[len(blocks) // 2].module
            self._features: list[torch.Tensor] = []
            self._mid.register_forward_hook(lambda _m, _a, out: self._features.append(block_hidden(out)))
            params += list(self.critic.parameters())
        self.fake_params = params
        # everything the fake-score optimiser steps, as one module (how its state is gathered and restored)
        self.fake_group = nn.ModuleDict({"fake": self.fake, **({"critic": self.critic} if self.critic else {})})
        self.fake_opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.0, 0.999))
        self.pairs = self._regression_pairs() if s.regression else None

    def extra_state(self) -> dict:
        modules = {"fake": self.fake_adapter.model, **({"critic": self.critic} if self.critic is not None else {})}
        return {**{k: full_state(m) for k, m in modules.items()},
                "fake_opt": full_optimizer_state(self.fake_group, self.fake_opt)}

    def load_extra_state(self, state: dict) -> None:
        load_full_state(self.fake_adapter.model, state["fake"])
        if self.critic is not None:
            load_full_state(self.critic, state["critic"])
        load_full_optimizer_state(self.fake_group, self.fake_opt, state["fake_opt"])

    def _regression_pairs(self):
        """(noise, source sample, condition) for DMD's regression loss, from the source's own sampling contract
        (seeded: a resumed run regenerates the same pairs)."""
        from compress.evaluation import generate

        n = self.settings.regression_pairs
        c = self.teacher_contract.with_overrides(guidance_scale=self.guidance.scale, strict=False)
        s = generate(self.teacher_adapter.model, n, contract=c, seed=10_000 + self.rank)
        noise = make_noise(n, tuple(c.latent_shape), 10_000 + self.rank)
        cond = c.example_cond(n, torch.Generator().manual_seed(10_001 + self.rank), labels=s.labels)
        return noise, s.images.float(), cond

    # -- the generator's sampling -------------------------------------------------------------------------------
    def generator_input(self, n: int):
        """(x, t, cond, w): a batch at one of the student's timesteps, produced by its own earlier steps."""
        d, ts = self.diffusion, self.timesteps
        # the step drawn decides how many forwards run: the same draw on every rank (FSDP all-gathers per forward)
        k = int(torch.randint(0, len(ts), (1,), generator=self.shared_gen)) if self.settings.backward_simulation else 0
        _, cond = self.batches.clean(n, self.gen)
        w = self.guidance.draw(n, self.gen)
        x = torch.randn((n, *self.teacher_contract.latent_shape), generator=self.gen)
        cond, (x, w) = self.cond_to(cond), self.to(x, w)
        for j in range(k):  # the student's own earlier steps (no gradient), as multistep sampling runs them
            t = torch.full((n,), ts[j], device=self.device)
            with torch.no_grad():
                x0 = consistency_output(self.diffusion, self.student_call(self.model, x, t, cond, w), x, t)
            noise = torch.randn(x.shape, generator=self.gen).to(self.device)
            x = d.noised(x0, noise, torch.full((n,), ts[j + 1]))
        return x, torch.full((n,), ts[k], device=self.device), cond, w

    # -- the updates -------------------------------------------------------------------------------------------
    def fake_step(self) -> dict[str, float]:
        n, d = self.cfg.batch_size, self.diffusion
        x, t, cond, w = self.generator_input(n)
        with torch.no_grad():
            x0 = consistency_output(self.diffusion, self.student_call(self.model, x, t, cond, w), x, t)
        tt = self.random_t(n).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        xt = d.noised(x0, noise, tt)
        self._features = [] if self.critic is not None else None
        loss = F.mse_loss(self.fake(xt, tt, cond), d.output(x0, noise))
        logs = {"fake_mse": float(loss.detach())}
        if self.critic is not None:
            real0, rcond = self.batches.clean(n, self.gen)
            real0, rcond = real0.to(self.device), self.cond_to(rcond)
            with torch.no_grad():
                self.fake(d.noised(real0, torch.randn(real0.shape, generator=self.gen).to(self.device), tt), tt,
                          rcond)
            fake_logit, real_logit = self.critic(self._features[0].detach()), self.critic(self._features[1].detach())
            gan = F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()
            loss = loss + self.settings.gan * gan
            logs["critic"] = float(gan.detach())
        self.optimize(loss, self.fake_opt, self.fake_params)
        return logs

    def train_step(self, step: int) -> dict[str, float]:
        logs: dict[str, float] = {}
        for _ in range(self.settings.fake_updates):
            for k, v in self.fake_step().items():
                logs[k] = v
        s, d, n = self.settings, self.diffusion, self.cfg.batch_size
        x, t, cond, w = self.generator_input(n)
        m = 0
        if self.pairs is not None:  # regression rows ride in the same forward (one backward per step)
            m = max(1, n // 4)
            idx = torch.randint(0, len(self.pairs[0]), (m,), generator=self.gen)
            z, target0, zc = self.pairs[0][idx].to(self.device), self.pairs[1][idx].to(self.device), self.pairs[2]
            zc = self.cond_to({k: v[idx] for k, v in zc.items()})
            x = torch.cat([x, z])
            t = torch.cat([t, torch.full((m,), self.timesteps[0], device=self.device)])
            cond = {k: torch.cat([cond[k], zc[k]]) for k in cond}
            w = torch.cat([w, torch.full((m,), self.guidance.scale, device=self.device)])
        x0_all = consistency_output(self.diffusion, self.student_call(self.model, x, t, cond, w), x, t)
        x0 = x0_all[:n]
        cond_g = {k: v[:n] for k, v in cond.items()}
        tt = self.random_t(n, *s.t_range).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        xt = d.noised(x0.detach(), noise, tt)
        with torch.no_grad():
            p_real = d.x0(self.teacher_output(xt, tt, cond_g, w[:n]), xt, tt)
            p_fake = d.x0(self.fake(xt, tt, cond_g), xt, tt)
            norm = (x0 - p_real).abs().flatten(1).mean(1).clamp_min(1e-5)
            grad = (p_fake - p_real) / norm.reshape(-1, *([1] * (x0.dim() - 1)))
            grad = torch.nan_to_num(grad)
        loss_dmd = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        loss = loss_dmd
        logs["dmd"] = float(loss_dmd.detach())
        if m:
            reg = F.mse_loss(x0_all[n:], target0)
            loss = loss + s.regression * reg
            logs["regression"] = float(reg.detach())
        if self.critic is not None:
            self._features = []
            tg = self.random_t(n).to(self.device)
            self.fake(d.noised(x0, torch.randn(x0.shape, generator=self.gen).to(self.device), tg), tg, cond_g)
            gan = F.softplus(-self.critic(self._features[0])).mean()
            loss = loss + s.gan * gan
            logs["gan"] = float(gan.detach())
        self.optimize(loss)
        self.fake_opt.zero_grad(set_to_none=True)  # the generator's backward went through the fake / critic
        logs["loss"] = float(loss.detach())
        return logs


def distill_dmd(model: nn.Module, config, ctx) -> nn.Module:
    source = get_adapter(ctx.teacher).contract()
    guidance = Guidance(config.guidance, source)
    if guidance.input:
        add_guidance_input(model, guidance.hidden, guidance.scale)
    k = config.student.steps
    timesteps = config.student.timesteps or grid(k)
    check_schedule(timesteps, source.prediction)
    tag, file = objective_tag(ctx, config)
    student = DMDTrainer(model, ctx.teacher, config.training(), ctx.run, ctx.calibration, tag, guidance=guidance,
                         file=file, settings=config.dmd, timesteps=timesteps).run()
    sampler = "flow-lcm" if source.prediction == "flow" else "lcm"
    contract = student_contract(source, student, timesteps=timesteps, sampler=sampler, scale=guidance.scale,
                                guidance_input=guidance.input)
    get_adapter(student).set_contract(contract)
    ctx.run.note(f"DMD student: {k} steps {timesteps} ({sampler}); fake score lr x{config.dmd.fake_lr_ratio}, "
                 f"{config.dmd.fake_updates} fake updates per generator update"
                 + (f", regression {config.dmd.regression}" if config.dmd.regression else "")
                 + (f", GAN {config.dmd.gan}" if config.dmd.gan else ""))
    return student
