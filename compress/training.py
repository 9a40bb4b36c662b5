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
(``param_groups``, ``extra_module``, ``before_step``, ``after_step``, ``losses``, ``extra_loss``,
``extra_state``) instead of writing another loop.
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
from compress.context import RunContext, world
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
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: 'ddp' replicates the student on every rank; 'fsdp' shards the student, "
                           "any auxiliary network (DMD's fake score) and the optimiser state across ranks "
                           "(torch FSDP2 fully_shard), for students that do not fit one device.")


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
        self.source, self.contract, self.cfg = source, contract, cfg
        real = cfg.real
        if real == "auto":
            from compress.models.reference import REFERENCES

            src = provenance(source.model).get("source") or {}
            real = "digits" if src.get("name") in REFERENCES else None
        self.real = real
        self._x0 = None
        self.flow = contract.prediction == "flow"
        self.alphas = training_scheduler().alphas_cumprod.float()

    @property
    def traj(self):
        """The teacher's recorded trajectories (recorded on first use: objectives that train only on clean data
        never pay for them)."""
        return self.source.rows(self.cfg.trajectories)

    @property
    def x0(self) -> torch.Tensor:
        return self._clean()[0]

    @property
    def cond0(self) -> Cond:
        return self._clean()[1]

    def _clean(self) -> tuple[torch.Tensor, Cond]:
        if self._x0 is None:
            if self.real == "digits":
                self._x0 = _digits(self.contract)
            elif self.real is not None:
                self._x0 = _load_real(Path(self.real), self.contract)
            else:
                self._x0 = (self.traj.final, self.traj.final_cond)
        return self._x0

    def clean(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, Cond]:
        """``n`` random rows of clean data (real data, or the teacher's samples) with their conditions."""
        idx = torch.randint(0, len(self.x0), (n,), generator=gen)
        return self.x0[idx], slice_cond(self.cond0, idx)

    def rows(self, n: int, gen: torch.Generator, conditional: bool = False) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """``n`` random trajectory rows (x_t, t, cond); ``conditional`` keeps only rows of the conditional branch."""
        pool = torch.arange(len(self.traj))
        if conditional:
            null = self.contract.null_cond(self.traj.cond)
            keep = torch.ones(len(self.traj), dtype=torch.bool)
            for k, v in self.traj.cond.items():
                if v.dim() and v.shape[0] == len(self.traj) and not v.is_floating_point():
                    keep &= v != null[k]
            pool = pool[keep]
        idx = pool[torch.randint(0, len(pool), (n,), generator=gen)]
        return self.traj.x[idx], self.traj.t[idx].float(), slice_cond(self.traj.cond, idx)

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




class Trainee(nn.Module):
    """A model (plus any extra trainable module) behind its adapter's ``forward(x, t, cond)``, so DDP / FSDP can
    wrap it."""

    def __init__(self, student: nn.Module, extra: nn.Module | None):
        super().__init__()
        self.student, self.extra = student, extra
        self.adapter = get_adapter(student)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.adapter.forward(x, t, cond)


def lr_factor(cfg: "TrainingConfig", step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``cfg.steps``."""
    f = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return f


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's whole state dict on CPU, gathered from FSDP2 shards when it is sharded (a collective)."""
    if any(_is_dtensor(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``full_state`` (every rank passes the whole dict)."""
    if any(_is_dtensor(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The state of ``opt`` (stepping ``module``'s parameters) as full tensors: gathered by parameter name when
    ``module`` is FSDP2-sharded (a collective), ``opt.state_dict()`` otherwise."""
    if not any(_is_dtensor(p) for p in module.parameters()):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule

    # FSDP2 leaves a root module's parameters gathered after a forward with no backward (it expects the
    # backward next): reshard, so the parameters the optimiser steps are the module's again
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of ``full_optimizer_state`` (every rank passes the whole dict)."""
    if not any(_is_dtensor(p) for p in module.parameters()):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


class Trainer:
    """Train ``student`` toward the frozen ``teacher``: the loop every training pass shares.

    ``run()`` returns the student (its EMA weights if ``cfg.ema``). Subclasses change what is trained
    and how through the hooks below; the loop itself (learning-rate schedule, clipping, EMA, atomic
    checkpoints and exact resume, DDP or FSDP2 under torchrun) stays here. ``train_step`` is the widest
    hook: an objective that is not "student output vs teacher output on one batch" (progressive,
    consistency, distribution-matching distillation) replaces it and keeps the rest of the loop.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainingConfig, run: RunContext,
                 source: CalibrationSource, tag: str, file: str | None = None):
        """``tag`` identifies the run in its checkpoint (a resume with another tag is refused); ``file`` names the
        checkpoint file (default: the tag), so runs that must not resume each other can share a file name."""
        self.student, self.teacher, self.cfg, self.run_ctx, self.source, self.tag = (
            student, teacher, cfg, run, source, tag)
        self.file = file or tag
        self.rank, self.world = world()
        self.device = run.device
        self.teacher_adapter = get_adapter(teacher)
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"

    # -- hooks -----------------------------------------------------------------------------------------
    def extra_module(self) -> nn.Module | None:
        """Trainable state used in the student's forward (e.g. LoRA factors, selection logits); checkpointed."""
        return None

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups (default: every student parameter at ``cfg.lr``)."""
        return [{"params": list(self.student.parameters()), "lr": self.cfg.lr}]

    def before_step(self, step: int) -> None:
        """Runs before each step (temperature annealing, mask sampling)."""

    def after_step(self, step: int) -> None:
        """Runs after each optimiser step, before the EMA update and the checkpoint (state driven by the step's
        own forward, e.g. a MoE router's selection bias)."""

    def losses(self, out_s: torch.Tensor, out_t: torch.Tensor | None, target: torch.Tensor, n_traj: int,
               features: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The named loss terms of one KD step (weighted by ``cfg.loss``): output KD, feature KD, diffusion.

        ``out_t`` is None when neither output nor feature KD is weighted (the teacher did not run)."""
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

    def resume_key(self) -> str:
        """What a checkpoint must have been trained with to be resumed by this run (compared exactly). Subclasses
        add the settings that change what a step computes beyond the shared training config."""
        return self.cfg.model_dump_json()

    def setup(self) -> None:
        """Runs once before the student is wrapped for data parallelism and before the resume: build auxiliary
        networks here (``self.wrap`` a trainable one, ``self.shard`` a frozen one) and their optimisers."""

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns the logged loss values. Default: KD on one drawn batch."""
        cfg, device = self.cfg, self.device
        x, t, cond, target, n_traj = self.batches.draw(cfg.batch_size, self.gen)
        x, t = x.to(device), t.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        out_t = None  # the teacher runs only for the losses that read it (output KD, feature KD)
        if cfg.loss.output or self.hooks_t is not None:
            with torch.no_grad():
                out_t = self.teacher_adapter.forward(x, t, cond)
        out_s = self.model(x, t, cond)
        pairs = [(self.hooks_s.outputs[(k, i)], self.hooks_t.outputs[(k, o)])
                 for k, origin in self.origins.items() for i, o in enumerate(origin)] if self.hooks_s else []
        losses = self.losses(out_s, out_t, target, n_traj, pairs)
        loss = sum(getattr(cfg.loss, k) * v for k, v in losses.items())
        self.optimize(loss + self.extra_loss(losses, loss))
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}

    # -- plumbing the hooks use ----------------------------------------------------------------------------
    def optimize(self, loss: torch.Tensor, opt: torch.optim.Optimizer | None = None,
                 params: list[torch.Tensor] | None = None) -> None:
        """Backward, clip to ``cfg.grad_clip`` and step (the student's optimiser unless another is given)."""
        opt = opt or self.opt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params or [p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        opt.step()

    def wrap(self, module: nn.Module, blocks: list[nn.Module] = ()) -> nn.Module:
        """``module`` ready for data-parallel training: DDP, FSDP2 (``blocks`` sharded one by one), or itself."""
        if self.world <= 1:
            return module
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for b in blocks:
                fully_shard(b)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, find_unused_parameters=True)

    def shard(self, module: nn.Module) -> nn.Module:
        """A frozen auxiliary network (a target, a teacher copy): sharded under FSDP, as it is otherwise."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for b in get_adapter(module).blocks():
                fully_shard(b.module)
            fully_shard(module)
        return module

    def student_blocks(self) -> list[nn.Module]:
        return [b.module for b in get_adapter(self.student).blocks()]

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> nn.Module:
        cfg, run, student = self.cfg, self.run_ctx, self.student
        device = self.device
        self.batches = TrainingBatches(self.source, cfg.data, self.teacher_adapter.contract())
        if self.batches.real is not None:  # a bad data file fails now, before any work
            self.batches.x0
        extra = self.extra = self.extra_module()
        self.trainee = Trainee(student, extra).to(device)
        self.groups = self.param_groups()
        trainable = {id(p) for g in self.groups for p in g["params"]}
        for p in self.trainee.parameters():
            p.requires_grad_(id(p) in trainable)
        student.eval()  # no label dropout etc.: the conditioning dropout is ours (uncond_prob), seeded
        seed = cfg.seed if cfg.seed is not None else run.seed
        self.gen = torch.Generator().manual_seed(seed * 1000 + self.rank)  # data: each rank its own
        self.shared_gen = torch.Generator().manual_seed(seed * 1000 + 999)  # control flow: the same on every rank
        self.setup()
        names = {id(p): n for n, p in self.trainee.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in self.groups]
        self.model = self.wrap(self.trainee, self.student_blocks())
        if self.fsdp:  # sharding replaced the parameters by DTensor shards: find them again by name
            params = dict(self.trainee.named_parameters())
            self.groups = [{**g, "params": [params[n] for n in gn]} for g, gn in zip(self.groups, group_names)]
        for g in self.groups:
            g.setdefault("lr", cfg.lr)
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(self.groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = None
        if cfg.ema is not None:
            self.ema = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        ckpt = run.workdir.file(f"{self.file}.pt") if run.workdir is not None else None
        cfg_key = self.resume_key()
        start = 0
        if ckpt is not None and run.resume and ckpt.exists():
            start = self._resume(ckpt, cfg_key)
        use_features = cfg.loss.features > 0
        self.origins = block_origins(student, self.teacher) if use_features else {}
        self.hooks_t = _BlockOutputs(self.teacher_adapter) if use_features else None
        self.hooks_s = _BlockOutputs(self.trainee.adapter) if use_features else None
        t0, logged, n_logged = time.perf_counter(), {}, 0
        try:
            with run.progress(f"{self.tag}: training", cfg.steps) as advance:
                advance(start)
                for step in range(start, cfg.steps):
                    for g in self.opt.param_groups:
                        g["lr"] = g["base_lr"] * lr_factor(cfg, step)
                    self.before_step(step)
                    values = self.train_step(step)
                    self.after_step(step)
                    if self.ema is not None:
                        with torch.no_grad():
                            for n, p in student.named_parameters():
                                if n in self.ema:
                                    self.ema[n].lerp_(p.detach(), 1 - cfg.ema)
                    for k, v in values.items():
                        logged[k] = logged.get(k, 0.0) + v
                    n_logged += 1
                    advance(1, info=f"loss {values.get('loss', 0.0):.4f}")
                    done = step + 1
                    if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                        self._checkpoint(ckpt, done, cfg_key)
        finally:
            for h in (self.hooks_t, self.hooks_s):
                if h is not None:
                    h.remove()
        if self.ema is not None:
            with torch.no_grad():
                for n, p in student.named_parameters():
                    if n in self.ema:
                        p.copy_(self.ema[n])
        n = max(n_logged, 1)
        means = ", ".join(f"{k} {v / n:.4g}" for k, v in logged.items() if k != "loss")
        run.note(f"{self.tag}: {cfg.steps - start} steps in {time.perf_counter() - t0:.0f} s (batch {cfg.batch_size} "
                 f"x {self.world} rank(s){', FSDP2' if self.fsdp else ''}); mean losses {means}")
        if self.fsdp:
            student = self._unsharded(student)
        student.requires_grad_(False)
        return student

    def _state(self, done: int, cfg_key: str) -> dict:
        """Everything a resume needs, as full (unsharded) tensors."""
        opt = full_optimizer_state(self.trainee, self.opt)
        ema = None if self.ema is None else {n: (t.full_tensor() if _is_dtensor(t) else t).cpu()
                                             for n, t in self.ema.items()}
        return {"step": done, "student": full_state(self.student),
                "extra": full_state(self.extra) if self.extra is not None else None, "opt": opt, "ema": ema,
                "gen": self.gen.get_state(), "shared_gen": self.shared_gen.get_state(), "config": cfg_key, "tag": self.tag, "parallel": self.fsdp,
                "hooks": self.extra_state()}

    def _checkpoint(self, ckpt: Path, done: int, cfg_key: str) -> None:
        state = self._state(done, cfg_key)  # a collective under FSDP: every rank takes part
        if self.rank == 0:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(ckpt, buf.getvalue())
        if self.world > 1:
            dist.barrier()

    def _resume(self, ckpt: Path, cfg_key: str) -> int:
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        if state.get("tag") != self.tag or state.get("config") != cfg_key or state.get("parallel", False) != self.fsdp:
            raise DitCompressError(
                f"{ckpt}: this checkpoint was written by another training run (pass, settings or sharding differ: "
                f"{state.get('tag')!r}); resume with the recipe that wrote it, or delete the work directory to "
                f"start over.")
        load_full_state(self.student, state["student"])
        if self.extra is not None:
            load_full_state(self.extra, state["extra"])
        load_full_optimizer_state(self.trainee, self.opt, state["opt"])
        self.gen.set_state(state["gen"])
        self.shared_gen.set_state(state["shared_gen"])
        if self.ema is not None:
            params = dict(self.student.named_parameters())
            for n, t in state["ema"].items():
                p = params[n]
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor

                    t = distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements)
                self.ema[n].copy_(t)
        self.load_extra_state(state.get("hooks") or {})
        start = int(state["step"])
        self.run_ctx.note(f"{self.tag}: resumed from {ckpt} at step {start}")
        return start

    def _unsharded(self, student: nn.Module) -> nn.Module:
        """A plain module with the trained weights: FSDP2 changed the student's class, so rebuild it."""
        from compress.artifact import rebuild

        sd = full_state(student)
        return rebuild(provenance(student), sd)
