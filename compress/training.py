"""The one training loop every training pass shares: a student distilled from the frozen source.

Losses (weights are recipe fields):

- **output KD**: MSE between the student's and the teacher's predictions on the same inputs;
- **feature KD**: MSE between each student block's output and the output of the teacher block it came
  from, normalised per block and ignoring the teacher's massive activations (TinyFusion's masked KD:
  a few huge channels would otherwise dominate the loss and the student would copy only them);
- **diffusion**: the ordinary denoising loss (epsilon or velocity target) on forward-noised data.

Inputs: part of each batch is rows of the teacher's own sampling trajectories (recorded like
calibration data, both CFG branches: what the student will actually see when it samples), the rest
is the trajectories' end points (or the user's real data) forward-noised at uniform timesteps, so
every timestep is covered and the diffusion loss has a target.

Checkpoints every ``checkpoint_every`` steps under the run's work directory (atomic writes); with
``resume`` a killed run continues from its last checkpoint, data order included. Under ``torchrun`` (an
initialised process group) the student is wrapped in DDP, each rank draws its own data and rank 0
writes the checkpoints.

``Trainer`` is the loop; training passes subclass it and override its named hooks
(``param_groups``, ``extra_module``, ``before_step``, ``losses``, ``extra_loss``, ``extra_state``) instead
of writing another loop.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.calibration import CalibrationConfig, CalibrationSource
from compress.context import RunContext
from compress.diffusion.sampling import cat_cond, slice_cond
from compress.diffusion.schedules import training_scheduler
from compress.errors import DitCompressError
from compress.io import atomic_write_bytes
from compress.models.adapters import Cond, ModelAdapter, get_adapter
from compress.models.adapters.base import block_hidden
from compress.models.contract import SamplingContract
from compress.models.provenance import provenance


class LossWeights(BaseModel):
    """Weights of the three recovery losses (0 turns one off)."""

    model_config = ConfigDict(extra="forbid")

    output: float = Field(1.0, ge=0, description="Output KD: MSE to the teacher's prediction.")
    features: float = Field(0.1, ge=0, description="Masked feature KD on block outputs (blocks matched to the "
                                                   "teacher blocks they came from).")
    diffusion: float = Field(0.5, ge=0, description="Denoising loss on forward-noised data.")


class TrainingData(BaseModel):
    """What the student trains on."""

    model_config = ConfigDict(extra="forbid")

    trajectories: CalibrationConfig | None = Field(
        None, description="Teacher sampling trajectories recorded for training (images, steps, guidance); default: "
                          "the recipe's calibration trajectories.")
    real: str | None = Field(
        "auto", description="Clean data for the diffusion loss: 'auto' (the source's own training data when "
                            "dit-compress ships it, i.e. the digits for the bundled reference models; otherwise the "
                            "teacher's samples), 'digits' (the bundled digits), None (the teacher's samples), or a "
                            ".safetensors file with 'latents' (N, *latent shape) and the conditions by name (e.g. "
                            "'y' class labels).")
    trajectory_fraction: float = Field(0.5, ge=0, le=1, description="Share of each batch taken from trajectory rows "
                                                                     "(the rest is forward-noised clean data).")
    uncond_prob: float = Field(0.1, ge=0, le=1, description="Forward-noised rows given the null condition, so the "
                                                            "unconditional branch CFG needs keeps training.")


class TrainingConfig(BaseModel):
    """Optimisation settings shared by every training pass."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    steps: int = Field(1000, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(64, ge=1, le=65536, description="Rows per step (per rank under torchrun).")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup: int = Field(50, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate decay after warm-up.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    ema: float | None = Field(None, ge=0, lt=1, description="EMA decay of the student's weights (None: off); the "
                                                            "EMA weights are what the pass returns.")
    loss: LossWeights = Field(default_factory=LossWeights, description="Loss weights.")
    feature_mask: float = Field(
        8.0, ge=0, description="Masked feature KD: ignore teacher activations larger than this many times the RMS of "
                               "their feature map (massive activations); 0 keeps every element.")
    data: TrainingData = Field(default_factory=TrainingData, description="Training inputs.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (a killed run loses at most this).")
    seed: int | None = Field(None, ge=0, description="Data-order seed (None: the recipe's seed).")


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def block_origins(student: nn.Module, teacher: nn.Module) -> dict[str, list[int]]:
    """For each block kind, the teacher index each student block came from (replaying block removals)."""
    teacher_adapter = get_adapter(teacher)
    origins = {k: list(range(len(teacher.get_submodule(p)))) for k, p in teacher_adapter.block_lists.items()}
    new_edits = provenance(student)["edits"][len(provenance(teacher)["edits"]):]
    for e in new_edits:
        if e["op"] == "remove_blocks":
            gone = set(e["indices"])
            origins[e["kind"]] = [o for i, o in enumerate(origins[e["kind"]]) if i not in gone]
    return origins


class _BlockOutputs:
    """Forward hooks collecting each block's image-token output, in execution order."""

    def __init__(self, adapter: ModelAdapter):
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = [b.module.register_forward_hook(self._hook((b.kind, b.index))) for b in adapter.blocks()]

    def _hook(self, key):
        def fn(_m, _args, out):
            self.outputs[key] = block_hidden(out)
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def masked_feature_loss(student: torch.Tensor, teacher: torch.Tensor, k: float) -> torch.Tensor:
    """MSE over elements where the teacher is not a massive activation, relative to the teacher's power there."""
    teacher = teacher.detach()
    dims = tuple(range(1, teacher.dim()))
    if k > 0:
        rms = teacher.pow(2).mean(dim=dims, keepdim=True).sqrt()
        mask = (teacher.abs() <= k * rms).to(teacher.dtype)
    else:
        mask = torch.ones_like(teacher)
    n = mask.sum().clamp_min(1)
    err = ((student - teacher).pow(2) * mask).sum() / n
    power = (teacher.pow(2) * mask).sum() / n
    return err / power.clamp_min(1e-8)


class TrainingBatches:
    """Draws training batches: trajectory rows plus forward-noised clean data (teacher samples or real)."""

    def __init__(self, source: CalibrationSource, cfg: TrainingData, contract: SamplingContract):
        self.contract, self.cfg = contract, cfg
        self.traj = source.rows(cfg.trajectories)
        real = cfg.real
        if real == "auto":
            from compress.models.reference import REFERENCES

            src = provenance(source.model).get("source") or {}
            real = "digits" if src.get("name") in REFERENCES else None
        if real == "digits":
            self.x0, self.cond0 = _digits(contract)
        elif real is not None:
            self.x0, self.cond0 = _load_real(Path(real), contract)
        else:
            self.x0, self.cond0 = self.traj.final, self.traj.final_cond
        self.real = real
        self.flow = contract.prediction == "flow"
        self.alphas = training_scheduler().alphas_cumprod.float()

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor, int]:
        """(x, t, cond, target, n_traj): the first ``n_traj`` rows are trajectory rows (no denoising target)."""
        n_traj = round(n * self.cfg.trajectory_fraction)
        n_fwd = n - n_traj
        parts = []
        if n_traj:
            idx = torch.randint(0, len(self.traj), (n_traj,), generator=gen)
            parts.append((self.traj.x[idx], self.traj.t[idx].float(), slice_cond(self.traj.cond, idx)))
        target = torch.zeros(0)
        if n_fwd:
            idx = torch.randint(0, len(self.x0), (n_fwd,), generator=gen)
            x0, cond = self.x0[idx], slice_cond(self.cond0, idx)
            noise = torch.randn(x0.shape, generator=gen)
            shape = (n_fwd,) + (1,) * (x0.dim() - 1)
            if self.flow:
                sigma = torch.rand(n_fwd, generator=gen)
                s = sigma.reshape(shape)
                xt, t, target = (1 - s) * x0 + s * noise, sigma * 1000, noise - x0
            else:
                t = torch.randint(0, len(self.alphas), (n_fwd,), generator=gen)
                a = self.alphas[t].reshape(shape)
                xt, target, t = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t.float()
            drop = torch.rand(n_fwd, generator=gen) < self.cfg.uncond_prob
            null = self.contract.null_cond(cond)
            cond = {k: torch.where(drop.reshape((-1,) + (1,) * (v.dim() - 1)), null[k], v)
                    if v.dim() and v.shape[0] == n_fwd else v for k, v in cond.items()}
            parts.append((xt, t, cond))
        x = torch.cat([p[0] for p in parts])
        t = torch.cat([p[1] for p in parts])
        cond = parts[0][2] if len(parts) == 1 else cat_cond(parts[0][2], parts[1][2])
        return x, t, cond, target, n_traj


def _digits(contract: SamplingContract) -> tuple[torch.Tensor, Cond]:
    """The bundled digits (the reference models' training data) as clean data with their labels."""
    from compress.models.reference import digits_dataset

    if (tuple(contract.latent_shape), contract.num_classes) != ((1, 8, 8), 10):
        raise DitCompressError(f"training data.real: 'digits' are 1x8x8 images of 10 classes; this model takes "
                               f"{tuple(contract.latent_shape)} latents and {contract.num_classes} classes.")
    images, labels = digits_dataset()
    label = next(c.name for c in contract.conditions if c.kind == "label")
    return images, {label: labels}


def _load_real(path: Path, contract: SamplingContract) -> tuple[torch.Tensor, Cond]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise DitCompressError(f"training data.real: {path} does not exist.")
    try:
        data = load_file(str(path))
    except Exception as e:
        raise DitCompressError(f"training data.real: {path} is not a readable safetensors file ({e}).") from None
    if "latents" not in data:
        raise DitCompressError(f"training data.real: {path} has no 'latents' tensor (found {', '.join(data)}).")
    x0 = data.pop("latents").float()
    if tuple(x0.shape[1:]) != tuple(contract.latent_shape):
        raise DitCompressError(f"training data.real: {path} latents have shape {tuple(x0.shape[1:])}; the model "
                               f"expects {tuple(contract.latent_shape)}.")
    want = {c.name for c in contract.conditions}
    if set(data) != want:
        raise DitCompressError(f"training data.real: {path} has conditions {sorted(data)}; the model needs "
                               f"{sorted(want)}.")
    if not len(x0) or not torch.isfinite(x0).all():
        raise DitCompressError(f"training data.real: {path} latents are empty or hold NaN/Inf values.")
    for c in contract.conditions:
        v = data[c.name]
        if v.dim() == 0 or v.shape[0] != len(x0):
            raise DitCompressError(f"training data.real: {path} condition '{c.name}' has {tuple(v.shape)}; it needs "
                                   f"one entry per latent ({len(x0)}).")
        if c.kind == "label" and (v.is_floating_point() or int(v.min()) < 0 or int(v.max()) >= (c.num_classes or 0)):
            raise DitCompressError(f"training data.real: {path} labels '{c.name}' must be integers in "
                                   f"0..{(c.num_classes or 1) - 1}.")
    return x0, data




class _Trainee(nn.Module):
    """The student (plus any extra trainable module) behind one ``forward``, so DDP can wrap it."""

    def __init__(self, student: nn.Module, extra: nn.Module | None):
        super().__init__()
        self.student, self.extra = student, extra
        self.adapter = get_adapter(student)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.adapter.forward(x, t, cond)


def lr_factor(cfg: TrainingConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``cfg.steps``."""
    f = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return f


class Trainer:
    """Train ``student`` toward the frozen ``teacher``: the loop every training pass shares.

    ``run()`` returns the student (its EMA weights if ``cfg.ema``). Subclasses change what is trained
    and how through the hooks below; the loop itself (batches, optimiser, clipping, EMA, atomic
    checkpoints and exact resume, DDP) stays here.
    """

    # Some parameters may receive no gradient in a step (routed experts no token was sent to): DDP must then look
    # for unused parameters.
    sparse_gradients: bool = False

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainingConfig, run: RunContext,
                 source: CalibrationSource, tag: str):
        self.student, self.teacher, self.cfg, self.run_ctx, self.source, self.tag = (
            student, teacher, cfg, run, source, tag)
        self.rank, self.world = _dist()
        self.device = run.device
        self.teacher_adapter = get_adapter(teacher)

    # -- hooks -----------------------------------------------------------------------------------------
    def extra_module(self) -> nn.Module | None:
        """Trainable state besides the student (e.g. LoRA factors, selection logits); checkpointed with it."""
        return None

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups (default: every student parameter at ``cfg.lr``)."""
        return [{"params": list(self.student.parameters()), "lr": self.cfg.lr}]

    def before_step(self, step: int) -> None:
        """Runs before each step's forward (temperature annealing, mask sampling)."""

    def losses(self, out_s: torch.Tensor, out_t: torch.Tensor, target: torch.Tensor, n_traj: int,
               features: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The named loss terms of one step (weighted by ``cfg.loss``): output KD, feature KD, diffusion."""
        w = self.cfg.loss
        zero = out_s.new_zeros(())
        return {"output": F.mse_loss(out_s, out_t) if w.output else zero,
                "features": (sum(masked_feature_loss(s, t, self.cfg.feature_mask) for s, t in features)
                             / max(len(features), 1)) if features else zero,
                "diffusion": F.mse_loss(out_s[n_traj:], target.to(out_s.device)) if w.diffusion and len(target)
                else zero}

    def extra_loss(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """A term added to the weighted loss, computed from the step's losses (e.g. a score-function gradient)."""
        return loss.new_zeros(())

    def extra_state(self) -> dict:
        """Further state to checkpoint (beyond student, extra module, optimiser, EMA, data generator)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Inverse of ``extra_state`` on resume."""

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        cfg, run, student = self.cfg, self.run_ctx, self.student
        rank, world, device = self.rank, self.world, self.device
        adapter_t = self.teacher_adapter
        batches = TrainingBatches(self.source, cfg.data, adapter_t.contract())
        extra = self.extra_module()
        trainee = _Trainee(student, extra).to(device)
        groups = self.param_groups()
        for g in groups:
            g.setdefault("lr", cfg.lr)
            g["base_lr"] = g["lr"]
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in trainee.parameters():
            p.requires_grad_(id(p) in trainable)
        student.eval()  # no label dropout etc.: the conditioning dropout is ours (uncond_prob), seeded
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ema = None
        if cfg.ema is not None:
            ema = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        gen = torch.Generator().manual_seed((cfg.seed if cfg.seed is not None else run.seed) * 1000 + rank)
        ckpt = run.workdir.file(f"{self.tag}.pt") if run.workdir is not None else None
        cfg_key = cfg.model_dump_json()
        start = 0
        if ckpt is not None and run.resume and ckpt.exists():
            state = torch.load(ckpt, weights_only=True, map_location=device)
            if state.get("tag") != self.tag or state.get("config") != cfg_key:
                raise DitCompressError(
                    f"{ckpt}: this checkpoint was written by another training run (pass or settings differ: "
                    f"{state.get('tag')!r}); resume with the recipe that wrote it, or delete the work directory to "
                    f"start over.")
            student.load_state_dict(state["student"])
            if extra is not None:
                extra.load_state_dict(state["extra"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            if ema is not None:
                ema = state["ema"]
            self.load_extra_state(state.get("hooks") or {})
            start = int(state["step"])
            run.note(f"{self.tag}: resumed from {ckpt} at step {start}")
        model = trainee
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(trainee, find_unused_parameters=extra is not None or self.sparse_gradients)

        w = cfg.loss
        use_features = w.features > 0
        origins = block_origins(student, self.teacher) if use_features else {}
        hooks_t = _BlockOutputs(adapter_t) if use_features else None
        hooks_s = _BlockOutputs(trainee.adapter) if use_features else None
        t0, logged = time.perf_counter(), {"output": 0.0, "features": 0.0, "diffusion": 0.0, "n": 0}
        try:
            with run.progress(f"{self.tag}: training", cfg.steps) as advance:
                advance(start)
                for step in range(start, cfg.steps):
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * lr_factor(cfg, step)
                    self.before_step(step)
                    x, t, cond, target, n_traj = batches.draw(cfg.batch_size, gen)
                    x, t = x.to(device), t.to(device)
                    cond = {k: v.to(device) for k, v in cond.items()}
                    with torch.no_grad():
                        out_t = adapter_t.forward(x, t, cond)
                    out_s = model(x, t, cond)
                    pairs = [(hooks_s.outputs[(k, i)], hooks_t.outputs[(k, o)])
                             for k, origin in origins.items() for i, o in enumerate(origin)] if use_features else []
                    losses = self.losses(out_s, out_t, target, n_traj, pairs)
                    loss = sum(getattr(w, k) * v for k, v in losses.items())
                    total = loss + self.extra_loss(losses, loss)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
                    opt.step()
                    if ema is not None:
                        with torch.no_grad():
                            for n, p in student.named_parameters():
                                if n in ema:
                                    ema[n].lerp_(p.detach(), 1 - cfg.ema)
                    for k in ("output", "features", "diffusion"):
                        logged[k] += float(losses[k].detach())
                    logged["n"] += 1
                    advance(1, info=f"loss {float(loss.detach()):.4f}")
                    done = step + 1
                    if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                        if rank == 0:
                            buf = io.BytesIO()
                            torch.save({"step": done, "student": student.state_dict(), "opt": opt.state_dict(),
                                        "extra": extra.state_dict() if extra is not None else None, "ema": ema,
                                        "gen": gen.get_state(), "config": cfg_key, "tag": self.tag,
                                        "hooks": self.extra_state()}, buf)
                            atomic_write_bytes(ckpt, buf.getvalue())
                        if world > 1:
                            dist.barrier()
        finally:
            for h in (hooks_t, hooks_s):
                if h is not None:
                    h.remove()
        if ema is not None:
            with torch.no_grad():
                for n, p in student.named_parameters():
                    if n in ema:
                        p.copy_(ema[n])
        n = max(logged["n"], 1)
        run.note(f"{self.tag}: {cfg.steps - start} steps in {time.perf_counter() - t0:.0f} s (batch {cfg.batch_size} "
                 f"x {world} rank(s)); mean losses output {logged['output'] / n:.4g}, features "
                 f"{logged['features'] / n:.4g}, diffusion {logged['diffusion'] / n:.4g}")
        student.requires_grad_(False)
        return student
