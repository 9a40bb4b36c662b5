"""Post-training quantization of the Linear layers inside transformer blocks.

One pass, every format (torchao-style: a config object, one apply function):

* weight-only INT8 / INT4 (per channel or per group, sym/asym, stored packed) and FP8 weights;
* W8A8 INT8 and FP8 E4M3 with static (calibrated, optionally per timestep group) or dynamic
  per-token activation scales;
* W4A8 with outlier handling: SmoothQuant-style smoothing (strength searched per layer against the
  layer's output error, optionally timestep-aware as in PTQ4DiT) and an SVDQuant-style full-precision
  low-rank branch that absorbs what remains, quantizing only the residual.

Calibration inputs come from the source's own sampling trajectories (``ctx.calibration``), both CFG
branches; statistics are gathered in bounded memory by ``calib_stats``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.calibration import CalibrationConfig
from compress.nn.quant import ACT_FORMATS, QuantLinear, WeightOnlyLinear
from compress.passes.base import LayerSelection, PassConfig, PassContext, _match, register_pass, select_block_linears
from compress.passes.calib_stats import activation_salience, collect_input_stats, step_batches


class WeightQuant(BaseModel):
    """Weight format."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["int8", "int4", "fp8"] = Field("int8", description="Stored weight type (fp8 = E4M3).")
    group_size: int | None = Field(
        None, ge=8, le=4096,
        description="Input channels sharing one scale (e.g. 32/64/128); None = one scale per output channel.")
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric (uint with zero point; "
                                              "weight-only integer formats).")
    per_channel: bool = Field(True, description="fp8: one scale per output channel (True) or per tensor (False).")
    group_scales: Literal["float", "integer"] = Field(
        "float", description="int4 groups with int8 activations (W4A8): 'float' = one fp32 scale per group; "
                             "'integer' = integer group scales (1..18) times one fp32 scale per output channel "
                             "(QServe's two-level scheme): each weight is then an exact int8 per-channel one, so "
                             "the layer runs the W8A8 integer kernels (in PyTorch and as an INT8 QDQ export) at "
                             "a small accuracy cost.")
    reduce_range: bool = Field(
        False, description="int8 with int8 activations: 7-bit weights (-63..63). ONNX Runtime's int8 kernels on x86 "
                           "CPUs without VNNI (AVX2 only) add pairs of 8-bit products in 16 bits and saturate with "
                           "full-range weights; 7-bit weights cannot overflow. Costs a little accuracy.")


class ActivationQuant(BaseModel):
    """Input (activation) format; leave out for weight-only quantization."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["int8", "fp8"] = Field("int8", description="Activation type (fp8 = E4M3).")
    mode: Literal["static", "dynamic"] = Field(
        "static", description="'static': per-tensor scale calibrated offline; 'dynamic': per-token absmax at run time.")
    timestep_groups: int = Field(
        1, ge=1, le=64, description="Static only: separate scales for this many groups of timesteps, chosen by the "
                                    "step being run (activation ranges drift across the schedule).")
    clip_search: bool = Field(True, description="Static only: search a clipping ratio of the calibrated range "
                                                "that minimises each layer's output error.")


class Smoothing(BaseModel):
    """SmoothQuant: divide inputs by s, multiply weight columns by s, s_j = max|X_j|^a / max|W_j|^(1-a)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float | Literal["search"] = Field(
        "search", description="Migration strength in [0, 1], or 'search' per layer against the layer's output error.")
    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)],
                              description="Strengths tried by 'search'.")
    timestep_aware: bool = Field(
        False, description="Weight each timestep's activation salience by its complementarity (1 - Spearman rho) "
                           "with the weight salience, as PTQ4DiT does, instead of taking the max over timesteps.")

    @field_validator("alpha")
    @classmethod
    def _check_alpha(cls, v):
        if v != "search" and not 0.0 <= v <= 1.0:
            raise ValueError("the migration strength must lie in [0, 1]")
        return v

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, v):
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("the strengths 'search' tries must be a non-empty list of values in [0, 1]")
        return v


class AttentionQuant(BaseModel):
    """8-bit inputs to each attention's two batched matmuls (q k^T and p v), for CPU INT8 runtimes.

    q, k, v become symmetric INT8 and the softmax probabilities unsigned 8-bit, each with a static
    per-tensor scale calibrated on the trajectories (``compress.nn.attention.QuantAttention``). Exported as
    QDQ, OpenVINO and ONNX Runtime run both matmuls in integers; in PyTorch it is fake quantization.
    Self and joint attentions only: cross-attention (keys from a short text sequence) stays in float.
    """

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["int8"] = Field("int8", description="Matmul input type (q, k, v int8; probabilities uint8).")
    clip_search: bool = Field(True, description="Search a clipping ratio of each calibrated range (q, k, v, "
                                                "probabilities in turn) that minimises the attention's output error.")
    max_error: float = Field(
        0.02, gt=0.0, le=1.0,
        description="Per-attention decision: an attention whose output relative MSE on the calibration slices stays "
                    "above this after the search keeps float matmuls (reported).")
    samples: int = Field(32, ge=1, le=4096,
                         description="(image, head) slices of q/k/v kept per attention for the clipping search.")
    exclude: list[str] = Field(default_factory=list,
                               description="Attention paths to leave in float (fnmatch globs like 'blocks.0.attn', or "
                                           "'re:<regex>', as layer patterns).")


class LowRank(BaseModel):
    """SVDQuant: keep a rank-r full-precision branch of the (smoothed) weight, quantize the residual."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=1024, description="Rank of the full-precision branch.")


@register_pass("quantize")
class QuantizeConfig(PassConfig):
    """Post-training quantization of transformer-block Linear layers (weight-only, W8A8, FP8, W4A8 + low-rank)."""

    replaces_linears: ClassVar[bool] = True

    pass_: Literal["quantize"] = Field("quantize", alias="pass")
    weights: WeightQuant = Field(default_factory=WeightQuant, description="Weight format.")
    activations: ActivationQuant | None = Field(None, description="Activation format (None: weight-only).")
    smoothing: Smoothing | None = Field(None, description="SmoothQuant outlier migration (None: off).")
    low_rank: LowRank | None = Field(None, description="Full-precision low-rank outlier branch (None: off).")
    attention: AttentionQuant | None = Field(
        None, description="8-bit attention matmuls (q k^T, p v) for CPU INT8 runtimes (None: attention in float).")
    layers: LayerSelection = Field(default_factory=LayerSelection,
                                   description="Which block Linear layers to quantize (embedders, adaLN and the "
                                               "final layer stay in full precision by default).")
    calibration: CalibrationConfig | None = Field(
        None, description="Calibration trajectories for this pass (default: the recipe's 'calibration').")
    bias_correction: bool = Field(
        True, description="Shift each layer's bias by the mean output error quantization causes on the calibration "
                          "rows (as NNCF's fast bias correction does).")
    max_rows: int = Field(512, ge=16, le=65536,
                          description="Input rows kept per layer for the smoothing / clipping search (bounds memory).")

    @model_validator(mode="after")
    def _check(self):
        w, a = self.weights, self.activations
        if not w.symmetric and (w.dtype == "fp8" or a is not None or self.smoothing or self.low_rank):
            raise ValueError("weights.symmetric: asymmetric weights exist only for weight-only int8/int4 "
                             "without smoothing or low_rank")
        if w.reduce_range and (w.dtype != "int8" or a is None or a.dtype != "int8" or w.group_size):
            raise ValueError("weights.reduce_range: 7-bit weights are for per-channel int8 weights with int8 "
                             "activations (W8A8)")
        if w.group_scales == "integer" and (w.dtype != "int4" or not w.group_size or a is None
                                            or a.dtype != "int8"):
            raise ValueError("weights.group_scales: integer group scales are for group-wise int4 weights with "
                             "int8 activations (W4A8)")
        if w.group_size and w.dtype == "fp8":
            raise ValueError("weights.group_size: fp8 weights use per-channel or per-tensor scales, not groups")
        if a is not None and a.mode == "dynamic" and a.timestep_groups > 1:
            raise ValueError("activations.timestep_groups: only static activation scales can depend on the timestep")
        return self

    @property
    def needs_calibration(self) -> bool:
        a = self.activations
        return bool(self.smoothing or self.attention or (a is not None and a.mode == "static"))


@QuantizeConfig.applies
def apply_quantize(model: nn.Module, config: QuantizeConfig, ctx: PassContext) -> nn.Module:
    names = select_block_linears(model, config.layers, "quantize")
    attentions = _attention_paths(model, config.attention) if config.attention else []
    if not names and not attentions:
        config.nothing_to_do(ctx, "no full-precision Linear layer in the transformer blocks matches 'layers' (already "
                                  "quantized by an earlier pass, or no adaLN Linear inside the blocks)")
        return model
    _check_groups(model, names, config)
    if attentions:  # calibrated on the float model's attention inputs, before any Linear is quantized
        _quantize_attention(model, attentions, config, ctx)
    if not names:
        return model
    simple = config.activations is None and not config.smoothing and not config.low_rank and config.weights.dtype != "fp8"
    if simple:
        return _weight_only(model, names, config, ctx)
    return _calibrated(model, names, config, ctx)


def _attention_paths(model: nn.Module, cfg: AttentionQuant) -> list[str]:
    """Self / joint attentions still computing float softmax attention, minus ``cfg.exclude``."""
    adapter = get_adapter(model)
    views = [a for b in adapter.blocks() for a in b.attentions if a.kind != "cross"]
    for p in cfg.exclude:
        if not any(_match(v.path, p) for v in views):
            raise DitCompressError(f"pass 'quantize', field 'attention.exclude': pattern {p!r} matches no self or joint "
                                   f"attention (e.g. {', '.join(v.path for v in views[:3])}).")
    return [v.path for v in views if adapter.attention_kernel(v) is None
            and not any(_match(v.path, p) for p in cfg.exclude)]


def _attention_error(kernel, st, scales: dict[str, torch.Tensor], ref: torch.Tensor) -> float:
    out = kernel.attend(st.q[:, None], st.k[:, None], st.v[:, None], None, scales=scales)[:, 0]
    return float((out - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12))


def _quantize_attention(model: nn.Module, paths: list[str], config: QuantizeConfig, ctx: PassContext) -> None:
    """Calibrate and install ``QuantAttention`` kernels; attentions above ``max_error`` stay in float."""
    from compress.nn.attention import QuantAttention
    from compress.passes.calib_stats import collect_attention_stats

    cfg = config.attention
    adapter = get_adapter(model)
    calib = ctx.calibration.rows(config.calibration)
    with ctx.run.progress(f"recording {len(paths)} attentions", len(step_batches(calib, 64))) as advance:
        stats = collect_attention_stats(model, paths, calib, samples=cfg.samples, seed=ctx.run.seed, progress=advance)
    grid = adapter.token_grid(tuple(adapter.latent_shape)) or (1, 1)
    kept, errors = [], []
    for path in paths:
        view, st = adapter.attention_view(path), stats[path]
        kernel = QuantAttention(view.heads, view.head_dim, grid, view.image_tokens)
        kernel.set_scales(st.amax)
        with torch.no_grad():
            ref = torch.nn.functional.scaled_dot_product_attention(st.q[:, None], st.k[:, None], st.v[:, None])[:, 0]
            base = {r: s.clone() for r, s in kernel.scales().items()}
            err = _attention_error(kernel, st, base, ref)
            for role in (QuantAttention.ROLES if cfg.clip_search else ()):  # one range at a time
                start, best = base[role], base
                for clip in (0.9, 0.8, 0.7, 0.6, 0.5):
                    trial = {**base, role: start * clip}
                    e = _attention_error(kernel, st, trial, ref)
                    if e < err:
                        err, best = e, trial
                base = best
            for r, s in base.items():
                getattr(kernel, f"{r}_scale").copy_(s)
        errors.append(err)
        if err > cfg.max_error:
            kept.append(f"{path} ({err:.1e})")
            continue
        adapter.set_attention_kernel(view, kernel.to(next(model.parameters()).device))
    done = len(paths) - len(kept)
    ctx.run.note(f"{done} attentions -> int8 matmuls (q k^T, p v); output rel. MSE mean "
                 f"{sum(errors) / len(errors):.2e}, worst {max(errors):.2e}")
    if kept:
        ctx.run.note(f"{len(kept)} attentions above max_error {cfg.max_error} keep float matmuls: {', '.join(kept)}")


def _check_groups(model: nn.Module, names: list[str], config: QuantizeConfig) -> None:
    g = config.weights.group_size
    for name in names:
        lin = model.get_submodule(name)
        if g and lin.in_features % g:
            raise DitCompressError(
                f"pass 'quantize', field 'weights.group_size': {g} does not divide layer '{name}' "
                f"(in_features={lin.in_features}); choose a divisor or exclude the layer."
            )
        if config.low_rank and config.low_rank.rank >= min(lin.in_features, lin.out_features):
            raise DitCompressError(
                f"pass 'quantize', field 'low_rank.rank': {config.low_rank.rank} is not smaller than layer "
                f"'{name}' ({lin.out_features}x{lin.in_features}); a low-rank branch that large stores more than the "
                f"weight itself."
            )


def _weight_only(model, names, config, ctx: PassContext):
    adapter = get_adapter(model)
    bits = 8 if config.weights.dtype == "int8" else 4
    g = config.weights.group_size
    with ctx.run.progress("quantizing weights", len(names)) as advance:
        for name in names:
            lin = model.get_submodule(name)
            adapter.replace(name, WeightOnlyLinear.from_linear(lin, bits, g, config.weights.symmetric))
            advance()
    ctx.run.note(f"{len(names)} Linear layers -> {config.weights.dtype} weights "
             f"({'group ' + str(g) if g else 'per channel'}, {'sym' if config.weights.symmetric else 'asym'})")
    return model


def _formats(config: QuantizeConfig) -> dict:
    a = config.activations
    return {
        "weight_format": config.weights.dtype, "group_size": config.weights.group_size,
        "weight_per_channel": config.weights.per_channel,
        "act_format": None if a is None else a.dtype, "act_mode": "static" if a is None else a.mode,
        "rank": config.low_rank.rank if config.low_rank else 0, "reduce_range": config.weights.reduce_range,
        "integer_group_scales": config.weights.group_scales == "integer",
    }


def _step_groups(step_t: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Assign each recorded step to one of ``n_groups`` contiguous timestep groups (ascending t).

    Returns (group index per step, bucket edges in timestep units or None for one group).
    """
    n_groups = min(n_groups, len(step_t))
    if n_groups <= 1:
        return torch.zeros(len(step_t), dtype=torch.long), None
    order = step_t.argsort()
    group = torch.empty(len(step_t), dtype=torch.long)
    chunks = torch.tensor_split(order, n_groups)
    for gi, c in enumerate(chunks):
        group[c] = gi
    edges = torch.stack([(step_t[a].max() + step_t[b].min()) / 2 for a, b in zip(chunks[:-1], chunks[1:])])
    return group, edges


def _fit_layer(lin, st, smooth, clips, step_group, edges, n_groups, fmt, bias_correction):
    """Quantize ``lin`` once for this smoothing and keep the clipping ratio (from ``clips``, first wins ties)
    with the lowest relative output error on the sampled rows. Returns (layer, error, clip)."""
    static = fmt["act_format"] is not None and fmt["act_mode"] == "static"
    amax = qmax = None
    if static:
        per_step = (st.absmax / (smooth if smooth is not None else 1.0)).amax(1)  # (steps,)
        qmax = ACT_FORMATS[fmt["act_format"]][1]
        amax = torch.stack([per_step[step_group == g].max() for g in range(n_groups)])
    q = QuantLinear.from_linear(lin, smooth=smooth, act_scale=None if amax is None else amax * clips[0] / qmax,
                                act_edges=edges, **fmt)
    x = st.rows.to(lin.weight.device)
    best = None
    with torch.no_grad():
        ref = lin(x)
        for clip in clips:
            if static:
                q.act_scale.copy_((amax * clip / qmax).clamp_min(1e-8))
            row_scale = None if not static else q.act_scale[step_group[st.row_step]][:, None]
            y = q(x, act_scale=row_scale)
            shift = None
            if bias_correction and q.bias is not None:  # remove the mean output shift quantization introduces
                shift = (ref - y).mean(0)
                y = y + shift
            err = float((y - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12))
            if best is None or err < best[0]:
                best = (err, clip, shift)
        err, clip, shift = best
        if static:
            q.act_scale.copy_((amax * clip / qmax).clamp_min(1e-8))
        if shift is not None:
            q.bias.copy_(lin.bias.detach() + shift)
    return q, err, clip


def _calibrated(model, names, config, ctx: PassContext):
    adapter = get_adapter(model)
    fmt = _formats(config)
    a, sm = config.activations, config.smoothing
    stats = None
    if config.needs_calibration:
        calib = ctx.calibration.rows(config.calibration)
        batch = 64
        with ctx.run.progress(f"collecting input statistics of {len(names)} layers",
                              len(step_batches(calib, batch))) as advance:
            stats = collect_input_stats(model, names, calib, max_rows=config.max_rows, batch_size=batch,
                                        seed=ctx.run.seed, progress=advance)
    n_groups = a.timestep_groups if a is not None and a.mode == "static" else 1
    if stats is not None:
        step_group, edges = _step_groups(stats.step_t, n_groups)
        n_groups = int(step_group.max()) + 1
    alphas, clips, errors = [], [], []
    bc = config.bias_correction
    with ctx.run.progress("quantizing layers", len(names)) as advance:
        for name in names:
            lin = model.get_submodule(name)
            if stats is None:  # dynamic activations / fp8 weight-only without smoothing: nothing to calibrate
                q = QuantLinear.from_linear(lin, **fmt)
                adapter.replace(name, q)
                advance()
                continue
            st = stats.layers[name]
            salience = activation_salience(st, lin.weight, sm.timestep_aware) if sm else None
            w_sal = lin.weight.detach().float().abs().amax(0)

            def smooth_for(alpha):
                if salience is None:
                    return None
                s = salience.clamp_min(1e-5).pow(alpha) / w_sal.clamp_min(1e-5).pow(1 - alpha)
                return s.clamp(1e-4, 1e4)

            grid = ([None] if sm is None else sm.grid if sm.alpha == "search" else [sm.alpha])
            fit = lambda alpha, clips: _fit_layer(lin, st, smooth_for(alpha), clips, step_group, edges,  # noqa: E731
                                                  n_groups, fmt, bc)
            alpha, q, err, clip = min(((alpha, *fit(alpha, [1.0])) for alpha in grid), key=lambda r: r[2])
            if a is not None and a.mode == "static" and a.clip_search:
                q, err, clip = fit(alpha, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
            adapter.replace(name, q)
            alphas.append(alpha)
            clips.append(clip)
            errors.append(err)
            advance(info=f"{name}: rel. err {err:.2e}")
    desc = (f"{len(names)} Linear layers -> W:{fmt['weight_format']}"
            f"{'/g' + str(fmt['group_size']) if fmt['group_size'] else ''} "
            f"A:{(a.dtype + '/' + a.mode) if a else 'none'}")
    if n_groups > 1:
        desc += f" ({n_groups} timestep groups)"
    if config.low_rank:
        desc += f", low-rank branch r={config.low_rank.rank}"
    ctx.run.note(desc)
    if errors:
        if sm:
            ctx.run.note(f"smoothing{' (timestep-aware)' if sm.timestep_aware else ''}: alpha mean "
                     f"{sum(alphas) / len(alphas):.2f} (min {min(alphas)}, max {max(alphas)})")
        if any(c < 1.0 for c in clips):
            ctx.run.note(f"activation clipping: {sum(c < 1.0 for c in clips)} layers clipped, min ratio {min(clips)}")
        worst = max(range(len(errors)), key=errors.__getitem__)
        ctx.run.note(f"layer output rel. MSE: mean {sum(errors) / len(errors):.2e}, worst {errors[worst]:.2e} "
                 f"({names[worst]})")
    return model
