"""Width pruning: remove attention heads and MLP hidden channels, with physically smaller tensors.

Scores (one per head, one per MLP channel):

- ``magnitude``: weight norms of everything the unit owns (its q/k/v rows and output columns; its
  MLP input row(s) and output column);
- ``activation``: mean magnitude of the unit's output on calibration rows times the norm of the
  weights that consume it (what it contributes to the block output);
- ``taylor``: first-order Taylor importance |sum a * dL/da| of the unit's output under the denoising
  loss, accumulated over forward-noised samples at uniform timesteps (Diff-Pruning's criterion).

Per-layer scope removes the same fraction everywhere; global scope ranks units of all layers together
(scores normalised per layer) and keeps at least ``min_keep`` of each layer. q/k/v/out (and the
context projections of joint attention), MLP in/out (both halves of gated MLPs, the shared output
projection of Flux single blocks) stay consistent; adaLN layout is untouched. Follow with ``distill``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.calibration import CalibrationConfig
from compress.passes.base import PassConfig, PassContext, register_pass
from compress.training import TrainingBatches, TrainingData


@register_pass("prune_width")
class PruneWidthConfig(PassConfig):
    """Width pruning: remove attention heads and MLP channels (magnitude, activation or Taylor scores)."""

    changes_structure: ClassVar[bool] = True

    pass_: Literal["prune_width"] = Field("prune_width", alias="pass")
    heads: float = Field(0.0, ge=0, lt=1, description="Fraction of attention heads to remove.")
    mlp: float = Field(0.0, ge=0, lt=1, description="Fraction of MLP hidden channels to remove.")
    params: float | None = Field(
        None, gt=0, lt=1, description="Instead of heads/mlp: the fraction of the model's parameters to remove, taken "
                                      "from heads and MLP channels alike (heads rounded to whole heads, MLP channels "
                                      "make up the rest).")
    importance: Literal["magnitude", "activation", "taylor"] = Field("taylor", description="Unit scores.")
    scope: Literal["layer", "global"] = Field("layer", description="'layer': the same fraction in every layer; "
                                                                   "'global': rank all layers' units together.")
    min_keep: float = Field(0.1, gt=0, le=1, description="global scope: fraction of each layer's heads / channels "
                                                         "always kept.")
    calibration: CalibrationConfig | None = Field(
        None, description="Trajectories for activation / Taylor scores (default: the recipe's).")
    max_rows: int = Field(256, ge=8, le=65536, description="Rows scored (activation, taylor).")

    @model_validator(mode="after")
    def _check(self):
        if self.params is not None and (self.heads or self.mlp):
            raise ValueError("params: give either 'params' or 'heads'/'mlp', not both")
        if self.params is None and not (self.heads or self.mlp):
            raise ValueError("heads: nothing to prune; set heads, mlp or params")
        return self


@dataclass
class _Unit:
    """A prunable layer: the heads of one attention or the channels of one MLP."""

    kind: str  # "heads" | "mlp"
    path: str
    size: int  # heads or channels
    width: int  # channels per unit (head_dim, or 1)
    rows: list[tuple[nn.Linear, int]]  # (linear, row offset) producing the unit's channels
    cols: list[tuple[nn.Linear, int]]  # (linear, column offset) consuming the unit's output
    module: nn.Module | None = None  # the attention module (its head count changes)
    cost: int = 0  # parameters per unit
    score: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def _units(model: nn.Module) -> list[_Unit]:
    out = []
    for b in get_adapter(model).blocks():
        for a in b.attentions:
            rows, cols = [], []
            for lin in (a.q, a.k, a.v, a.context_q, a.context_k, a.context_v):
                if lin is not None:
                    rows.append((lin, 0))
            if a.qkv is not None:  # fused rows [3, heads, head_dim]
                rows += [(a.qkv, s * a.heads * a.head_dim) for s in range(3)]
            if a.out is not None:
                cols.append((a.out, 0))
            elif b.mlps and b.mlps[0].fc_out_offset:  # Flux single block: proj_out reads [attn | mlp]
                cols.append((b.mlps[0].fc_out, 0))
            if a.context_out is not None:
                cols.append((a.context_out, 0))
            out.append(_Unit("heads", a.path, a.heads, a.head_dim, rows, cols, module=a.module))
        for m in b.mlps:
            rows = [(m.fc_in, 0)] + ([(m.fc_in, m.hidden)] if m.gated else [])
            out.append(_Unit("mlp", m.path, m.hidden, 1, rows, [(m.fc_out, m.fc_out_offset)]))
    for u in out:
        u.cost = sum(u.width * (lin.in_features + (lin.bias is not None)) for lin, _ in u.rows)
        u.cost += sum(u.width * lin.out_features for lin, _ in u.cols)
    return out


def _row_index(u: _Unit, off: int, unit: int) -> range:
    return range(off + unit * u.width, off + (unit + 1) * u.width)


def _magnitude(u: _Unit) -> torch.Tensor:
    s = torch.zeros(u.size)
    for lin, off in u.rows:
        w = lin.weight.detach()[off : off + u.size * u.width].float()
        s += w.pow(2).sum(1).reshape(u.size, u.width).sum(1)
    for lin, off in u.cols:
        w = lin.weight.detach()[:, off : off + u.size * u.width].float()
        s += w.pow(2).sum(0).reshape(u.size, u.width).sum(1)
    return s.sqrt()


def _data_scores(model: nn.Module, units: list[_Unit], config: PruneWidthConfig, ctx: PassContext) -> None:
    """Activation or Taylor scores from the unit outputs seen by their consuming projections."""
    adapter = get_adapter(model)
    taylor = config.importance == "taylor"
    acc = {id(u): torch.zeros(u.size) for u in units}
    handles = []

    def pre_hook(u: _Unit, lin: nn.Linear, off: int):
        col_norm = lin.weight.detach()[:, off : off + u.size * u.width].float().pow(2).sum(0)
        col_norm = col_norm.reshape(u.size, u.width).sum(1).sqrt()

        def fn(_m, args):
            full = args[0]
            x = full[..., off : off + u.size * u.width]
            if taylor:
                if full.requires_grad:  # the hook must sit on the tensor the layer consumes, then slice
                    def grad_hook(g, x=x.detach()):
                        g = g[..., off : off + u.size * u.width]
                        c = (x * g).reshape(x.shape[0], -1, u.size, u.width).sum(dim=(1, 3))
                        acc[id(u)].add_(c.abs().sum(0).float().cpu())
                    full.register_hook(grad_hook)
            else:
                mag = x.detach().abs().reshape(-1, u.size, u.width).mean(dim=(0, 2)).float().cpu()
                acc[id(u)].add_(mag * col_norm)
        return fn

    for u in units:
        for lin, off in u.cols[:1]:
            handles.append(lin.register_forward_pre_hook(pre_hook(u, lin, off)))
    try:
        if taylor:
            data = TrainingData(trajectories=config.calibration or ctx.calibration.config, trajectory_fraction=0.0,
                                uncond_prob=0.1, real=None)  # scored on the teacher's own samples
            batches = TrainingBatches(ctx.calibration, data, get_adapter(ctx.teacher).contract())
            gen = torch.Generator().manual_seed(ctx.run.seed)
            device = ctx.run.device
            model.requires_grad_(True)
            for i in range(0, config.max_rows, 64):
                x, t, cond, target, _ = batches.draw(min(64, config.max_rows - i), gen)
                out = adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
                loss = (out - target.to(device)).pow(2).mean()
                model.zero_grad(set_to_none=True)
                loss.backward()
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
        else:
            device = ctx.run.device
            with torch.no_grad():
                for x, t, cond in ctx.calibration.rows(config.calibration).spread(config.max_rows).batches(64):
                    adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
    finally:
        for h in handles:
            h.remove()
    for u in units:
        u.score = acc[id(u)]


def _amounts(units: list[_Unit], config: PruneWidthConfig, total_params: int) -> tuple[float, float]:
    """(heads fraction, mlp fraction); for a ``params`` target, solved from the units' parameter costs."""
    if config.params is None:
        return config.heads, config.mlp
    target = config.params * total_params
    prunable = sum(u.size * u.cost for u in units)
    if target > 0.9 * prunable:
        raise DitCompressError(f"pass 'prune_width', field 'params': removing {config.params:.0%} of the parameters "
                               f"needs more than 90% of all heads and MLP channels ({prunable:,} of {total_params:,} "
                               f"parameters are prunable).")
    f = target / prunable
    heads = [u for u in units if u.kind == "heads"]
    head_removed = sum(round(f * u.size) * u.cost for u in heads)
    mlp_params = sum(u.size * u.cost for u in units if u.kind == "mlp")
    mlp_f = (target - head_removed) / mlp_params if mlp_params else 0.0
    if not 0 <= mlp_f < 1:
        raise DitCompressError(f"pass 'prune_width', field 'params': cannot reach {config.params:.0%} with whole heads "
                               f"and MLP channels; set heads / mlp fractions instead.")
    return (sum(round(f * u.size) for u in heads) / max(sum(u.size for u in heads), 1)), mlp_f


def _choose(units: list[_Unit], kind: str, fraction: float, config: PruneWidthConfig) -> dict[int, list[int]]:
    """Units to remove per layer (id(unit) -> indices)."""
    layers = [u for u in units if u.kind == kind]
    if not layers or fraction <= 0:
        return {}
    if config.scope == "layer":
        return {id(u): torch.argsort(u.score)[: round(fraction * u.size)].tolist() for u in layers}
    total = round(fraction * sum(u.size for u in layers))
    ranked = sorted(((float(s) / (float(u.score.mean()) or 1.0), id(u), j)
                     for u in layers for j, s in enumerate(u.score)))
    floor = {id(u): max(1, math.ceil(config.min_keep * u.size)) for u in layers}
    left = {id(u): u.size for u in layers}
    drop: dict[int, list[int]] = {id(u): [] for u in layers}
    for _s, uid, j in ranked:
        if total <= 0:
            break
        if left[uid] > floor[uid]:
            drop[uid].append(j)
            left[uid] -= 1
            total -= 1
    return drop


def _shrink(lin: nn.Linear, rows: list[int] | None, cols: list[int] | None) -> nn.Linear:
    w = lin.weight.detach()
    r = torch.tensor(rows) if rows is not None else torch.arange(w.shape[0])
    c = torch.tensor(cols) if cols is not None else torch.arange(w.shape[1])
    new = nn.Linear(len(c), len(r), bias=lin.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[r][:, c])
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach()[r])
    return new


@PruneWidthConfig.applies
def apply_prune_width(model: nn.Module, config: PruneWidthConfig, ctx: PassContext) -> nn.Module:
    from compress.nn.moe import MoEFeedForward

    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        raise DitCompressError("pass 'prune_width': the model's MLPs are routed experts (a 'moe' pass ran before); "
                               "prune width first, then convert to MoE.")
    from compress.nn.quant import QuantLinear, WeightOnlyLinear

    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, WeightOnlyLinear))]
    if quantized:
        raise DitCompressError(f"pass 'prune_width': {quantized[0]} is already quantized (a 'quantize' pass ran "
                               f"before); prune width first, then quantize.")
    adapter = get_adapter(model)
    kernels = [a.path for b in adapter.blocks() for a in b.attentions if adapter.attention_kernel(a) is not None]
    if kernels and (config.heads or config.params):
        raise DitCompressError(f"pass 'prune_width': {kernels[0]} computes with a replaced attention kernel (e.g. INT8 "
                               f"attention from 'quantize'), built for its current heads; prune heads first, then "
                               f"quantize (or set heads: 0 to prune MLP channels only).")
    units = _units(model)
    total = sum(p.numel() for p in model.parameters())
    if config.importance == "magnitude":
        for u in units:
            u.score = _magnitude(u)
    else:
        _data_scores(model, units, config, ctx)
    f_heads, f_mlp = _amounts(units, config, total)
    drop = {**_choose(units, "heads", f_heads, config), **_choose(units, "mlp", f_mlp, config)}
    if not any(drop.values()):
        config.nothing_to_do(ctx, "the fractions round to zero heads and zero MLP channels in every layer")
        return model
    row_drop: dict[int, set[int]] = {}
    col_drop: dict[int, set[int]] = {}
    linears: dict[int, nn.Linear] = {}
    for u in units:
        for j in drop.get(id(u), []):
            for lin, off in u.rows:
                linears[id(lin)] = lin
                row_drop.setdefault(id(lin), set()).update(_row_index(u, off, j))
            for lin, off in u.cols:
                linears[id(lin)] = lin
                col_drop.setdefault(id(lin), set()).update(_row_index(u, off, j))
    names = {id(m): n for n, m in model.named_modules()}
    for lid, lin in linears.items():
        rows = [i for i in range(lin.out_features) if i not in row_drop.get(lid, set())]
        cols = [i for i in range(lin.in_features) if i not in col_drop.get(lid, set())]
        if not rows or not cols:
            raise DitCompressError(f"pass 'prune_width': pruning would remove every unit of {names[lid]}.")
        adapter.replace(names[lid], _shrink(lin, rows, cols))
    removed_heads = removed_channels = 0
    for u in units:
        n = len(drop.get(id(u), []))
        if u.kind == "heads" and n:
            attr = "num_heads" if hasattr(u.module, "num_heads") else "heads"
            adapter.set_attr(names[id(u.module)], attr, u.size - n)
            if hasattr(u.module, "inner_dim"):
                adapter.set_attr(names[id(u.module)], "inner_dim", (u.size - n) * u.width)
            removed_heads += n
        elif n:
            removed_channels += n
    after = sum(p.numel() for p in model.parameters())
    ctx.run.note(f"removed {removed_heads} of {sum(u.size for u in units if u.kind == 'heads')} heads and "
             f"{removed_channels} of {sum(u.size for u in units if u.kind == 'mlp')} MLP channels "
             f"({config.importance}, {config.scope}); parameters {total:,} -> {after:,} ({1 - after / total:.1%} fewer)")
    return model
