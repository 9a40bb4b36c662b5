"""Depth pruning: remove whole transformer blocks (both block kinds for SD3/Flux), chosen by one of
several selection methods, all behind one pass:

- ``uniform``: keep evenly spaced blocks (at half depth: keep every other block);
- ``last``: drop the last blocks;
- ``influence``: drop the blocks that change their input least (1 - cosine similarity of a block's
  output to its input over calibration rows; ShortGPT's block influence);
- ``remove_one``: drop the blocks whose removal alone changes the model's output least;
- ``learned``: TinyFusion — per group of M blocks a learnable distribution over which N to keep,
  sampled with Gumbel noise at an annealed temperature and trained jointly with a light LoRA, so the
  choice favours blocks whose removal is *recoverable*, not merely small. The logits' gradient is the
  straight-through Gumbel-softmax estimate (TinyFusion's) or, by default, the score-function estimate
  (REINFORCE with a running baseline) of the same sampled masks: on the reference model the
  straight-through estimate has the wrong sign exactly where it matters (d loss / d gate of block 0 at
  gate 0 is +2.3, yet keeping block 0 lowers the loss 4x), and it learns to drop block 0;
- ``manual``: the indices to keep.

Removing blocks leaves the model off its trajectory; follow the pass with ``distill`` (recovery).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.adapters.base import block_hidden, block_identity_output
from compress.calibration import CalibrationConfig, CalibrationSet
from compress.passes.base import PassConfig, PassContext, register_pass
from compress.passes.scoring import output_errors
from compress.training import LossWeights, Trainer, TrainingConfig


def _selection_training() -> TrainingConfig:
    return TrainingConfig(steps=200, lr=1e-3, warmup=10, loss=LossWeights(output=1.0, features=0.0, diffusion=0.5))


class LearnedSelection(BaseModel):
    """TinyFusion-style learned block selection."""

    model_config = ConfigDict(extra="forbid")

    blocks_per_group: int = Field(4, ge=2, le=64, description="M: blocks per group (consecutive); each group keeps "
                                                              "N of its M blocks, N set by the target depth.")
    lora_rank: int = Field(8, ge=0, le=256, description="Rank of the LoRA trained with the selection (0: none). "
                                                        "It is discarded afterwards: it only makes the choice favour "
                                                        "recoverable blocks.")
    gate_lr: float = Field(0.05, gt=0, le=10, description="Learning rate of the selection logits (Adam moves them "
                                                          "about this much per step whatever the gradient's size, so "
                                                          "a large value stops exploring after a few steps).")
    estimator: Literal["score_function", "straight_through"] = Field(
        "score_function", description="Gradient of the selection logits: 'score_function' (REINFORCE with a running "
                                      "baseline; unbiased) or 'straight_through' (Gumbel-softmax, TinyFusion's; "
                                      "biased where removing a block is far from linear).")
    temperature: tuple[float, float] = Field((4.0, 0.1), description="Gumbel-softmax temperature, annealed "
                                                                     "exponentially from the first to the second.")
    training: TrainingConfig = Field(default_factory=_selection_training,
                                     description="Steps, batch, LoRA learning rate (lr), data and losses of the "
                                                 "selection run (feature KD must be 0: skipped blocks have no "
                                                 "counterpart).")

    @model_validator(mode="after")
    def _check(self):
        if self.training.loss.features:
            raise ValueError("training.loss.features must be 0 during selection (a skipped block has no teacher "
                             "counterpart)")
        if not self.temperature[0] >= self.temperature[1] > 0:
            raise ValueError("temperature: (start, end) with start >= end > 0")
        return self


@register_pass("prune_depth")
class PruneDepthConfig(PassConfig):
    """Depth pruning: remove whole transformer blocks (uniform, last, influence, remove-one, learned, manual)."""

    changes_structure: ClassVar[bool] = True

    pass_: Literal["prune_depth"] = Field("prune_depth", alias="pass")
    depth: int | float | dict[str, int] = Field(
        ..., description="Blocks to keep: a count (split over block kinds in proportion), a fraction of every kind "
                         "(0.5 halves each), or a count per kind ({joint: 10, single: 19}).")
    method: Literal["uniform", "last", "influence", "remove_one", "learned", "manual"] = Field(
        "learned", description="How the kept blocks are chosen (see the module docstring).")
    keep: dict[str, list[int]] | None = Field(None, description="method 'manual': indices to keep, per block kind.")
    learned: LearnedSelection = Field(default_factory=LearnedSelection, description="method 'learned' settings.")
    calibration: CalibrationConfig | None = Field(
        None, description="Trajectories scored by 'influence' and 'remove_one' (default: the recipe's).")
    max_rows: int = Field(256, ge=8, le=65536, description="Calibration rows used for scoring.")

    @model_validator(mode="after")
    def _check(self):
        if (self.method == "manual") != (self.keep is not None):
            raise ValueError("keep: give 'keep' exactly when method is 'manual'")
        d = self.depth
        if isinstance(d, float) and not 0 < d <= 1:
            raise ValueError("depth: a fraction must be in (0, 1]")
        if isinstance(d, int) and d < 1:
            raise ValueError("depth: keep at least one block")
        return self


def targets(model: nn.Module, depth, field: str = "depth") -> dict[str, int]:
    """Blocks to keep per kind for a ``depth`` spec (count, fraction or per-kind dict)."""
    adapter = get_adapter(model)
    counts = {k: len(model.get_submodule(p)) for k, p in adapter.block_lists.items()}
    total = sum(counts.values())
    if isinstance(depth, dict):
        bad = set(depth) - set(counts)
        if bad:
            raise DitCompressError(f"pass 'prune_depth', field '{field}': unknown block kind(s) {sorted(bad)}; "
                                   f"{adapter.family} has {', '.join(f'{k} ({n})' for k, n in counts.items())}.")
        out = {k: depth.get(k, n) for k, n in counts.items()}
    elif isinstance(depth, float):
        out = {k: max(1, round(n * depth)) for k, n in counts.items()}
    else:
        if depth > total:
            raise DitCompressError(f"pass 'prune_depth', field '{field}': {depth} blocks requested but the model has "
                                   f"{total}.")
        share = {k: n * depth / total for k, n in counts.items()}
        out = {k: max(1, math.floor(s)) for k, s in share.items()}
        for k in sorted(share, key=lambda k: share[k] - math.floor(share[k]), reverse=True):
            if sum(out.values()) < depth and out[k] < counts[k]:
                out[k] += 1
    for k, n in out.items():
        if not 1 <= n <= counts[k]:
            raise DitCompressError(f"pass 'prune_depth', field '{field}': keep {n} '{k}' blocks of {counts[k]}; "
                                   f"it must be between 1 and {counts[k]}.")
    return out


def _rows(ctx: PassContext, config: PruneDepthConfig) -> CalibrationSet:
    return ctx.calibration.rows(config.calibration).spread(config.max_rows)


@torch.no_grad()
def block_influence(model: nn.Module, rows: CalibrationSet, device: str = "cpu") -> dict[tuple[str, int], float]:
    """1 - mean cosine similarity between each block's image-token input and output."""
    adapter = get_adapter(model)
    sums: dict[tuple[str, int], float] = {}
    count = 0

    def hook(key):
        def fn(_m, args, kwargs, out):
            a, b = block_hidden(block_identity_output(args, kwargs, out)), block_hidden(out)
            sums[key] = sums.get(key, 0.0) + float((1 - F.cosine_similarity(a, b, dim=-1)).mean(dim=-1).sum())
        return fn

    handles = [b.module.register_forward_hook(hook((b.kind, b.index)), with_kwargs=True) for b in adapter.blocks()]
    try:
        for x, t, c in rows.batches(64):
            adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in c.items()})
            count += len(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v / count for k, v in sums.items()}


@contextlib.contextmanager
def skipped(block: nn.Module) -> Iterator[None]:
    """Inside the block, ``block`` returns its inputs (as if it were removed)."""
    h = block.register_forward_hook(lambda _m, a, k, o: block_identity_output(a, k, o), with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def removal_error(model: nn.Module, rows: CalibrationSet, device: str = "cpu") -> dict[tuple[str, int], float]:
    """Relative output error of the model with each single block removed (skipped)."""
    changes = {(b.kind, b.index): (lambda m=b.module: skipped(m)) for b in get_adapter(model).blocks()}
    return output_errors(model, rows, changes, device)


def _groups(n: int, keep: int, size: int) -> list[tuple[list[int], int]]:
    """Consecutive groups of ``size`` blocks and how many each keeps (summing to ``keep``)."""
    groups = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    share = [len(g) * keep / n for g in groups]
    want = [math.floor(s) for s in share]
    for i in sorted(range(len(groups)), key=lambda i: share[i] - want[i], reverse=True):
        if sum(want) < keep and want[i] < len(groups[i]):
            want[i] += 1
    return list(zip(groups, want))


class _LoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, linear.in_features, generator=gen) / math.sqrt(linear.in_features))
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def hook(self, _m, args, out):
        return out + F.linear(F.linear(args[0], self.a.to(out.dtype)), self.b.to(out.dtype))


class _Selector(nn.Module):
    """Selection logits per group plus the LoRA factors; installs gate and LoRA hooks on the model."""

    def __init__(self, model: nn.Module, plan: dict[str, list[tuple[list[int], int]]], cfg: LearnedSelection, seed: int):
        super().__init__()
        self.adapter, self.cfg, self.seed = get_adapter(model), cfg, seed
        self.groups = [(kind, blocks, list(itertools.combinations(blocks, n)))
                       for kind, groups in plan.items() for blocks, n in groups]
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros(len(opts))) for _, _, opts in self.groups])
        gen = torch.Generator().manual_seed(seed)
        self.linears = [m for b in self.adapter.blocks() for m in b.module.modules() if isinstance(m, nn.Linear)]
        self.lora = nn.ModuleList([_LoRA(m, cfg.lora_rank, gen) for m in self.linears] if cfg.lora_rank else [])
        self.mask: dict[tuple[str, int], torch.Tensor] = {}
        self.log_prob: torch.Tensor | None = None  # of the sampled options (score-function estimator)
        self.register_buffer("baseline", torch.zeros(()))  # running mean of the loss (checkpointed)
        self.register_buffer("seen", torch.zeros(()))
        self.handles = []

    def install(self) -> None:
        for lin, lora in zip(self.linears, self.lora):
            self.handles.append(lin.register_forward_hook(lora.hook))
        for b in self.adapter.blocks():
            self.handles.append(b.module.register_forward_hook(self._gate((b.kind, b.index)), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _gate(self, key):
        def fn(_m, args, kwargs, out):
            m = self.mask.get(key)
            if m is None:
                return out
            skip = block_identity_output(args, kwargs, out)
            if isinstance(out, tuple):
                return tuple(o if o is None else s + m * (o - s) for s, o in zip(skip, out))
            return skip + m * (out - skip)
        return fn

    def sample(self, step: int, steps: int) -> None:
        """One option per group from Gumbel(logits / tau), tau annealed; seeded per step, so resumable."""
        t0, t1 = self.cfg.temperature
        tau = t0 * (t1 / t0) ** (step / max(steps - 1, 1))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self.mask, log_probs = {}, []
        for (kind, blocks, opts), logits in zip(self.groups, self.logits):
            u = torch.rand(len(opts), generator=gen).clamp(1e-9, 1 - 1e-9)
            soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=0)
            hard = F.one_hot(soft.argmax(), len(opts)).to(soft.dtype)
            if self.cfg.estimator == "straight_through":
                y = hard - soft.detach() + soft
            else:
                y = hard
                log_probs.append(F.log_softmax(logits / tau, dim=0)[soft.argmax()])
            for b in blocks:
                self.mask[(kind, b)] = sum(y[j] for j, o in enumerate(opts) if b in o)
        self.log_prob = sum(log_probs) if log_probs else None

    def extra_loss(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """REINFORCE term: raise the log-probability of masks whose loss beats the running baseline.

        The reward is the output-KD loss when it is on: student and teacher see the same inputs, so it is
        free of the batch-to-batch noise of the diffusion loss, which would otherwise drown the difference
        between masks.
        """
        if self.log_prob is None:
            return loss.new_zeros(())
        out = losses["output"].detach()
        value = out if float(out) > 0 else loss.detach()
        advantage = value - self.baseline if self.seen else torch.zeros_like(value)
        with torch.no_grad():
            self.baseline.lerp_(value, 1.0 if not self.seen else 0.1)
            self.seen.fill_(1)
        return self.log_prob * advantage

    def choice(self) -> dict[str, list[int]]:
        keep: dict[str, list[int]] = {}
        for (kind, _blocks, opts), logits in zip(self.groups, self.logits):
            keep.setdefault(kind, []).extend(opts[int(logits.argmax())])
        return {k: sorted(v) for k, v in keep.items()}

    def probabilities(self) -> list[str]:
        out = []
        for (kind, _blocks, opts), logits in zip(self.groups, self.logits):
            p = F.softmax(logits.detach(), 0)
            j = int(p.argmax())
            out.append(f"{kind} {list(opts[j])} p={float(p[j]):.2f}")
        return out


class SelectionTrainer(Trainer):
    """The shared loop training the selection logits (and the LoRA) instead of the student's weights."""

    def __init__(self, model: nn.Module, sel: _Selector, cfg: LearnedSelection, ctx: PassContext):
        super().__init__(model, ctx.teacher, cfg.training, ctx.run, ctx.calibration,
                         tag=f"pass{ctx.run.pass_index + 1}-prune_depth-selection")
        self.sel, self.selection = sel, cfg

    def extra_module(self) -> nn.Module:
        return self.sel

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.sel.logits), "lr": self.selection.gate_lr, "weight_decay": 0.0}]
        if self.selection.lora_rank:
            groups.append({"params": list(self.sel.lora.parameters()), "lr": self.cfg.lr})
        return groups

    def before_step(self, step: int) -> None:
        self.sel.sample(step, self.cfg.steps)

    def extra_loss(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        return self.sel.extra_loss(losses, loss)


def learned_selection(model: nn.Module, want: dict[str, int], config: PruneDepthConfig,
                      ctx: PassContext) -> dict[str, list[int]]:
    """Train selection logits (+ LoRA) on the model itself; the model's own weights stay untouched."""
    cfg = config.learned
    adapter = get_adapter(model)
    plan = {k: _groups(len(model.get_submodule(p)), want[k], cfg.blocks_per_group)
            for k, p in adapter.block_lists.items()}
    sel = _Selector(model, plan, cfg, ctx.run.seed)
    sel.install()
    try:
        SelectionTrainer(model, sel, cfg, ctx).run()
    finally:
        sel.remove()
    ctx.run.note("learned selection (kept blocks, probability): " + "; ".join(sel.probabilities()))
    return sel.choice()


def _keep_costliest(scores: dict[tuple[str, int], float], want: dict[str, int]) -> dict[str, list[int]]:
    """Per kind, keep the ``want[kind]`` blocks whose removal costs most (highest score)."""
    keep = {}
    for kind, n in want.items():
        ranked = sorted((i for k, i in scores if k == kind), key=lambda i: scores[(kind, i)], reverse=True)
        keep[kind] = sorted(ranked[:n])
    return keep


@PruneDepthConfig.applies
def apply_prune_depth(model: nn.Module, config: PruneDepthConfig, ctx: PassContext) -> nn.Module:
    adapter = get_adapter(model)
    counts = {k: len(model.get_submodule(p)) for k, p in adapter.block_lists.items()}
    want = targets(model, config.depth)
    if config.method == "manual":
        keep = {k: sorted(set(v)) for k, v in config.keep.items()}
        for k, idx in config.keep.items():
            dup = sorted({i for i in idx if idx.count(i) > 1})
            if dup:
                raise DitCompressError(f"pass 'prune_depth', field 'keep.{k}': block indices {dup} are listed more "
                                       f"than once; list each kept block once.")
        for k, idx in keep.items():
            if k not in counts or any(not 0 <= i < counts[k] for i in idx):
                raise DitCompressError(f"pass 'prune_depth', field 'keep.{k}': indices must be blocks of kind {k!r} "
                                       f"(0..{counts.get(k, 0) - 1}); got {idx}.")
        keep = {k: keep.get(k, list(range(n))) for k, n in counts.items()}
    elif config.method == "uniform":
        keep = {k: sorted({round(i * n / want[k]) for i in range(want[k])}) for k, n in counts.items()}
    elif config.method == "last":
        keep = {k: list(range(want[k])) for k in counts}
    elif config.method == "influence":
        scores = block_influence(model, _rows(ctx, config), ctx.run.device)
        keep = _keep_costliest(scores, want)
        ctx.run.note("block influence: " + ", ".join(f"{k}{i}={v:.3g}" for (k, i), v in scores.items()))
    elif config.method == "remove_one":
        scores = removal_error(model, _rows(ctx, config), ctx.run.device)
        keep = _keep_costliest(scores, want)
        ctx.run.note("remove-one output error: " + ", ".join(f"{k}{i}={v:.3g}" for (k, i), v in scores.items()))
    else:
        keep = learned_selection(model, want, config, ctx)
    drops = {kind: [i for i in range(n) if i not in set(keep[kind])] for kind, n in counts.items()}
    if not any(drops.values()):
        config.nothing_to_do(ctx, f"'depth' keeps every block ({sum(counts.values())})")
        return model
    for kind, drop in drops.items():
        if drop:
            adapter.remove_blocks(kind, drop)
    ctx.run.note(f"kept blocks ({config.method}): " + "; ".join(f"{k} {v}" for k, v in keep.items()))
    return model
