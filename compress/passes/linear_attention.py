"""Linear-attention students: softmax self-attention swapped for a linear-cost kernel, then distilled.

Self-attention costs O(N^2) in image tokens; a PixArt-class model at 1024 px spends a third of its FLOPs
there, at 2048 px two thirds. This pass replaces the attention computation of chosen blocks (the
projections keep the source's weights: LiT's weight inheritance) with a ``compress.nn.attention`` kernel:

- ``relu`` (SANA, LiT) or ``elu`` (ELU+1, Katharopoulos et al.) linear attention, optionally with LiT's
  depthwise convolution of the values over the adapter's 2-D token grid (``conv``, zero-initialised);
- ``window``: CLEAR's local attention (softmax over a ``window x window`` neighbourhood).

Hybrid students keep softmax attention in ``softmax_blocks`` blocks: by default the blocks whose
linearisation alone changes the model's output most along the calibration trajectories (``sensitivity``),
or the first / last blocks, or a manual list.

Recovery is two trainings on the shared trainer (checkpoints, exact resume, DDP / FSDP2): this pass's
``layer_kd`` stage (attention-output KD per layer: each linearised attention is trained toward the source's
softmax attention on the same inputs, its own inputs detached so each layer learns on its own), then the
``distill`` pass (recovery: output KD + masked feature KD + diffusion loss) that recipes put after it.

What is linearised, per family (what the adapter exposes):

| family | linearised | kept softmax |
|---|---|---|
| dit (native), diffusers-dit | every block's self-attention | - |
| pixart | self-attention (attn1) | cross-attention to the text tokens (attn2): N x T, already linear in N |
| sd3 | the joint attention over [image, text] (one normaliser over both streams); SD3.5's image-only attn2 | - |
| flux | joint blocks' attention over [text, image] and single blocks' attention (the same joint sequence in one stream), on the RoPE-rotated queries and keys | - |

The depthwise convolution covers the image tokens only; the window kernel needs image-only attention,
so it is refused on joint attention (SD3, Flux).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.calibration import CalibrationConfig
from compress.errors import DitCompressError
from compress.models.adapters import AttentionView, BlockView, ModelAdapter, get_adapter
from compress.nn.attention import LinearAttention, WindowAttention
from compress.passes.base import PassConfig, PassContext, register_pass
from compress.passes.scoring import output_errors
from compress.training import LossWeights, Trainer, TrainingConfig, masked_feature_loss


class AttentionKDWeights(LossWeights):
    """Loss weights of the per-layer stage: attention-output KD, optionally with the recovery losses."""

    attention: float = Field(1.0, ge=0, description="Attention-output KD: relative MSE between each linearised "
                                                    "attention's output and the source's softmax attention on the "
                                                    "same input, averaged over layers.")
    output: float = Field(0.0, ge=0, description="Output KD (MSE to the teacher's prediction); 0 here: the distill "
                                                 "pass after this one trains end to end.")
    features: float = Field(0.0, ge=0, description="Masked feature KD on block outputs; 0 here (see output).")
    diffusion: float = Field(0.0, ge=0, description="Denoising loss on forward-noised data; 0 here (see output).")


class LayerKD(TrainingConfig):
    """The per-layer attention-output KD stage (the shared trainer's settings; only attention weights train)."""

    steps: int = Field(300, ge=1, le=10_000_000, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    warmup: int = Field(20, ge=0, description="Linear warm-up steps.")
    loss: AttentionKDWeights = Field(default_factory=AttentionKDWeights, description="Loss weights.")


@register_pass("linear_attention")
class LinearAttentionConfig(PassConfig):
    """Linear attention: swap blocks' softmax attention for a linear kernel (ReLU / ELU+1 / local window) and distil."""

    changes_structure: ClassVar[bool] = True

    pass_: Literal["linear_attention"] = Field("linear_attention", alias="pass")
    kernel: Literal["relu", "elu", "window"] = Field(
        "relu", description="'relu' (SANA / LiT) or 'elu' (ELU+1) linear attention, or 'window' (CLEAR-style local "
                            "softmax attention over a window x window neighbourhood).")
    conv: int = Field(3, ge=0, le=31, description="relu / elu: odd kernel size of LiT's depthwise convolution of the "
                                                  "values over the token grid (0: none). Zero-initialised.")
    window: int | None = Field(None, ge=1, le=255, description="kernel 'window': the odd window side, in tokens "
                                                               "(at most the token grid's side).")
    attention: list[Literal["self", "joint", "cross"]] = Field(
        ["self", "joint"], min_length=1, description="Which attention kinds to replace: 'self' (image tokens), 'joint' "
                                                     "(text + image, SD3 / Flux). 'cross' is refused: cross-attention "
                                                     "to text tokens is already linear in image tokens.")
    softmax_blocks: int = Field(0, ge=0, le=4096, description="Hybrid students: how many blocks keep softmax "
                                                              "attention (a count budget; 0: every block linear).")
    selection: Literal["sensitivity", "first", "last", "manual"] = Field(
        "sensitivity", description="Which blocks keep softmax: the most 'sensitivity' (output error of linearising "
                                   "one block at a time on calibration rows), the 'first' / 'last' ones, or 'manual' "
                                   "(keep_softmax).")
    keep_softmax: dict[str, list[int]] | None = Field(
        None, description="selection 'manual': block indices that keep softmax, per block kind ({block: [0, 5]}).")
    calibration: CalibrationConfig | None = Field(None, description="Trajectories the sensitivity is measured on "
                                                                    "(default: the recipe's).")
    max_rows: int = Field(256, ge=8, le=65536, description="Calibration rows the sensitivity is measured on.")
    layer_kd: LayerKD | None = Field(default_factory=LayerKD, description="The per-layer attention-output KD stage "
                                                                          "(None: skip it).")

    @model_validator(mode="after")
    def _check(self):
        if (self.kernel == "window") != (self.window is not None):
            raise ValueError("window: give 'window' exactly when kernel is 'window'")
        if self.window is not None and self.window % 2 == 0:
            raise ValueError(f"window: {self.window} must be odd (a window centred on its token)")
        if self.conv and self.conv % 2 == 0:
            raise ValueError(f"conv: {self.conv} must be odd (a centred kernel) or 0")
        if self.kernel == "window" and "conv" in self.model_fields_set and self.conv:
            raise ValueError("conv: the depthwise convolution belongs to the linear kernels (relu, elu), not 'window'")
        if (self.selection == "manual") != (self.keep_softmax is not None):
            raise ValueError("keep_softmax: give 'keep_softmax' exactly when selection is 'manual'")
        if self.keep_softmax is not None and "softmax_blocks" in self.model_fields_set:
            raise ValueError("softmax_blocks: with selection 'manual' the count is the length of keep_softmax")
        return self


def _field(name: str) -> str:
    return f"pass 'linear_attention', field '{name}'"


def _targets(adapter: ModelAdapter, config: LinearAttentionConfig) -> list[tuple[BlockView, list[AttentionView]]]:
    """Every block with the attentions the pass would replace in it (blocks with none left out)."""
    if "cross" in config.attention:
        raise DitCompressError(f"{_field('attention')}: 'cross' attention is kept: its keys are the text tokens, so its "
                               f"cost is already linear in image tokens (PixArt's attn2). Linearise 'self' / 'joint'.")
    if type(adapter).install_kernel is ModelAdapter.install_kernel:
        raise DitCompressError(f"{_field('attention')}: the {adapter.family} adapter does not expose its attention "
                               f"computation, so its attention cannot be linearised.")
    blocks = adapter.blocks()
    done = [a.path for b in blocks for a in b.attentions if adapter.attention_kernel(a) is not None]
    if done:
        raise DitCompressError(f"pass 'linear_attention': {done[0]} already computes with a replaced kernel (an "
                               f"earlier pass); linearise once, with the blocks that should keep softmax.")
    out = [(b, [a for a in b.attentions if a.kind in config.attention]) for b in blocks]
    out = [(b, views) for b, views in out if views]
    if not out:
        have = sorted({f"{a.kind} ({a.path.rsplit('.', 1)[-1]})" for b in blocks for a in b.attentions})
        raise DitCompressError(f"{_field('attention')}: the {adapter.family} adapter exposes no "
                               f"{' or '.join(config.attention)} attention to linearise (its blocks have: "
                               f"{', '.join(have) or 'no attention'}).")
    if config.kernel == "window":
        joint = [a.path for _, views in out for a in views if a.image_tokens != "all"]
        if joint:
            raise DitCompressError(f"{_field('kernel')}: 'window' needs image-only attention; {joint[0]} attends over "
                                   f"text and image tokens together. Use kernel 'relu' / 'elu' on {adapter.family}, "
                                   f"or attention: [self].")
    return out


def _kernel_factory(adapter: ModelAdapter, config: LinearAttentionConfig):
    grid = adapter.token_grid(tuple(adapter.latent_shape))
    if grid is None:
        raise DitCompressError(f"{_field('kernel')}: the {adapter.family} adapter does not say on which grid its "
                               f"image tokens lie.")
    if config.kernel == "window" and config.window > min(grid):
        raise DitCompressError(f"{_field('window')}: {config.window} is larger than the {grid[0]}x{grid[1]} token "
                               f"grid of this model.")

    def make(view: AttentionView) -> nn.Module:
        if config.kernel == "window":
            return WindowAttention(view.heads, view.head_dim, grid, view.image_tokens, window=config.window)
        return LinearAttention(view.heads, view.head_dim, grid, view.image_tokens, feature=config.kernel,
                               conv=config.conv)

    return make


def _softmax_keys(model: nn.Module, targets, config: LinearAttentionConfig, ctx: PassContext,
                  make) -> list[tuple[str, int]]:
    """The (kind, index) of the blocks that keep softmax attention."""
    keys = [(b.kind, b.index) for b, _ in targets]
    if config.selection == "manual":
        chosen = [(kind, i) for kind, idx in config.keep_softmax.items() for i in idx]
        bad = [f"{k}{i}" for k, i in chosen if (k, i) not in keys]
        if bad or len(set(chosen)) != len(chosen):
            raise DitCompressError(f"{_field('keep_softmax')}: {', '.join(bad) or 'a block listed twice'}: list each "
                                   f"block once, by kind and index among those with linearisable attention "
                                   f"({', '.join(f'{k}{i}' for k, i in keys)}).")
        return chosen
    n = config.softmax_blocks
    if n > len(keys):
        raise DitCompressError(f"{_field('softmax_blocks')}: {n} blocks keep softmax attention, but the model has "
                               f"{len(keys)} blocks with attention to linearise.")
    if config.selection == "first" or n == 0:
        return keys[:n]
    if config.selection == "last":
        return keys[len(keys) - n:]
    adapter = get_adapter(model)

    @contextlib.contextmanager
    def linearised(views: list[AttentionView]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for v in views:
                stack.enter_context(adapter.trial_attention_kernel(v, make(v).to(ctx.run.device)))
            yield

    rows = ctx.calibration.rows(config.calibration).spread(config.max_rows)
    changes = {(b.kind, b.index): (lambda views=views: linearised(views)) for b, views in targets}
    scores = output_errors(model, rows, changes, ctx.run.device)
    ctx.run.note("linearisation sensitivity (relative output MSE, one block at a time): "
                 + ", ".join(f"{k}{i}={v:.3g}" for (k, i), v in scores.items()))
    return sorted(sorted(scores, key=scores.get, reverse=True)[:n], key=keys.index)


class AttentionKDTrainer(Trainer):
    """The shared loop, training linearised attentions toward the source's softmax attention, layer by layer.

    Forward hooks on each student attention run a frozen copy of its softmax original on the same inputs;
    pre-hooks detach those inputs, so each layer's loss trains that layer only. Only attention parameters
    (projections and kernel) train; the rest of the model is frozen.
    """

    def __init__(self, model: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], cfg: LayerKD, ctx: PassContext):
        super().__init__(model, ctx.teacher, cfg, ctx.run, ctx.calibration,
                         tag=f"pass{ctx.run.pass_index + 1}-linear_attention-layers")
        self.pairs = pairs
        self.terms: list[torch.Tensor] = []

    def param_groups(self) -> list[dict]:
        seen, params = set(), []
        for student, _ in self.pairs:
            for p in student.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return [{"params": params, "lr": self.cfg.lr}]

    def losses(self, out_s, out_t, target, n_traj, features):
        terms = super().losses(out_s, out_t, target, n_traj, features)
        terms["attention"] = torch.stack(self.terms).mean() if self.terms else out_s.new_zeros(())
        self.terms = []
        return terms

    def _kd_hook(self, teacher: nn.Module):
        def fn(_m, args, kwargs, out):
            with torch.no_grad():
                ref = teacher(*args, **kwargs)
            outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
            self.terms.extend(masked_feature_loss(o, r, 0.0) for o, r in zip(outs, refs) if o is not None)
        return fn

    @staticmethod
    def _detach_inputs(_m, args, kwargs):
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    def run(self) -> nn.Module:
        handles = []
        for student, teacher in self.pairs:
            teacher.to(self.device).eval().requires_grad_(False)
            handles.append(student.register_forward_pre_hook(self._detach_inputs, with_kwargs=True))
            handles.append(student.register_forward_hook(self._kd_hook(teacher), with_kwargs=True))
        try:
            return super().run()
        finally:
            for h in handles:
                h.remove()


@LinearAttentionConfig.applies
def apply_linear_attention(model: nn.Module, config: LinearAttentionConfig, ctx: PassContext) -> nn.Module:
    adapter = get_adapter(model)
    targets = _targets(adapter, config)
    make = _kernel_factory(adapter, config)
    keep = _softmax_keys(model, targets, config, ctx, make)
    linear = [(b, views) for b, views in targets if (b.kind, b.index) not in set(keep)]
    if not linear:
        config.nothing_to_do(ctx, f"every block with linearisable attention keeps softmax ({len(targets)})")
        return model
    pairs = []
    for _, views in linear:
        for v in views:
            original = copy.deepcopy(v.module) if config.layer_kd is not None else None
            adapter.set_attention_kernel(v, make(v).to(ctx.run.device))
            if original is not None:
                pairs.append((v.module, original))
    kinds = sorted({v.kind for _, views in linear for v in views})
    detail = f"window {config.window}" if config.kernel == "window" else f"conv {config.conv}"
    ctx.run.note(f"linearised the {'/'.join(kinds)} attention of {len(linear)} of {len(targets)} blocks (kernel "
                 f"{config.kernel}, {detail}); softmax kept in: "
                 + (", ".join(f"{k} {i}" for k, i in keep) or "none"))
    if config.layer_kd is not None:
        AttentionKDTrainer(model, pairs, config.layer_kd, ctx).run()
    return model
