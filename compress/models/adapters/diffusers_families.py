"""Adapters for diffusers transformers: DiT, PixArt, SD3 (MMDiT) and Flux.

Attribute names follow diffusers 0.42 (``models/transformers/*``, ``attention.py``,
``attention_processor.py``, ``normalization.py``). diffusers is never imported here: a model can only
be a diffusers model if diffusers is already loaded, so ``matches`` looks the class up lazily and
``import compress`` stays fast for native-only use.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from compress.models.adapters.base import AttentionView, BlockView, Cond, MLPView, ModelAdapter, register_adapter
from compress.models.contract import ConditionSpec
from compress.nn.moe import MoEFeedForward

# Text embeddings (moved to the latent's dtype; zeroed for the unconditional branch, an approximation of the
# empty-prompt embedding). Masks and guidance are kept as they are.
_EMBEDDINGS = ("encoder_hidden_states", "pooled_projections")
TEXT_TOKENS = 8  # text tokens of the seeded embeddings used for calibration, tests and speed inputs
# Bounds a recorded architecture must satisfy before anything is allocated (Flux is 3072 wide, 57 blocks).
_MAX_WIDTH, _MAX_LAYERS = 16384, 1024


def _is_instance(model: nn.Module, class_name: str) -> bool:
    """isinstance against a diffusers class without importing diffusers when it is not loaded."""
    mod = sys.modules.get("diffusers")
    cls = getattr(mod, class_name, None) if mod is not None else None
    return cls is not None and isinstance(model, cls)


def _attention(path: str, a: nn.Module, kind: str = "self", image_tokens: str = "all") -> AttentionView:
    """View of a diffusers ``Attention``/``FluxAttention``; joint if it has context projections.

    ``heads`` is read from the module (the processors split heads with ``attn.heads``), ``head_dim`` from
    ``FluxAttention.head_dim`` or ``inner_dim // heads`` (diffusers ``Attention`` keeps no head_dim).
    ``image_tokens``: where the processor puts the image tokens in the joint sequence (SD3: first, Flux: last).
    """
    head_dim = getattr(a, "head_dim", None) or a.inner_dim // a.heads
    to_out = getattr(a, "to_out", None)  # None for Flux single blocks (pre_only)
    ctx_q = getattr(a, "add_q_proj", None)
    return AttentionView(
        path, a, a.heads, head_dim, q=a.to_q, k=a.to_k, v=a.to_v, out=to_out[0] if to_out is not None else None,
        context_q=ctx_q, context_k=getattr(a, "add_k_proj", None), context_v=getattr(a, "add_v_proj", None),
        context_out=getattr(a, "to_add_out", None), kind="joint" if ctx_q is not None else kind,
        image_tokens=image_tokens,
    )


class KernelAttnProcessor(nn.Module):
    """A diffusers attention processor that runs the attention's own processor with its softmax attention
    computed by ``kernel`` (a ``compress.nn.attention`` kernel).

    The family's processor keeps everything else (projections, QK norms, RoPE, the order in which it joins
    the text and image streams, output projections), so one processor serves every family. An ``nn.Module``
    (as diffusers' IP-Adapter processors are), so the kernel's weights are part of the model's state.
    """

    def __init__(self, kernel: nn.Module, original, where: str):
        super().__init__()
        self.kernel, self.original, self.where = kernel, original, where

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        from compress.nn.attention import routed_attention

        with routed_attention(self.kernel, self.where):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def _activation(act: nn.Module) -> str | None:
    """The elementwise activation of a diffusers activation module (``compress.nn.moe.ACTIVATIONS`` names)."""
    name = type(act).__name__
    if name == "GELU":  # diffusers' GELU (a projection + gelu) or torch's nn.GELU
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name == "GEGLU":
        return "gelu"
    if name == "ApproximateGELU":
        return "gelu_sigmoid"
    if name == "SwiGLU" or isinstance(getattr(act, "activation", None), nn.SiLU):  # SwiGLU, LinearActivation(silu)
        return "silu"
    return None


def _feed_forward(path: str, ff: nn.Module) -> list[MLPView]:
    """View of a diffusers ``FeedForward``: net[0].proj expands (x2 for GEGLU/SwiGLU), net[2] projects back.

    Empty for anything else (a ``FeedForward`` the moe pass turned into routed experts).
    """
    net = getattr(ff, "net", None)
    if net is None:
        return []
    fc_in, fc_out = net[0].proj, net[2]
    hidden = fc_out.in_features
    return [MLPView(path, fc_in, fc_out, hidden, gated=fc_in.out_features == 2 * hidden,
                    activation=_activation(net[0]))]


def _modulation(block: nn.Module, names: tuple[str, ...] = ("norm1", "norm1_context", "norm")) -> list[nn.Module]:
    """The adaLN ``.linear`` of each named norm that has one (AdaLayerNormZero/-Single/-Continuous)."""
    out = []
    for n in names:
        lin = getattr(getattr(block, n, None), "linear", None)
        if lin is not None:
            out.append(lin)
    return out


def _batch_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (batch,) tensor on x's device (a scalar or a length-1 tensor is expanded)."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(x.device)


def _text_cond(cond: Cond, x: torch.Tensor) -> Cond:
    """Text embeddings moved to x's device and dtype (conditions are built on the CPU in float32)."""
    return {k: v.to(x.device, x.dtype) if k in _EMBEDDINGS else v.to(x.device) for k, v in cond.items()}


def _make_context_pre_only(block: nn.Module) -> None:
    """Turn an SD3 joint block into the last-block form, exactly.

    The last block's context outputs are discarded by the model, so ``to_add_out``, ``ff_context`` and
    ``norm2_context`` are dead; the context adaLN-Zero (6 chunks: shift, scale, gate, ...) becomes an
    AdaLayerNormContinuous holding only its [scale | shift] rows. Skipped if the linear was replaced.
    """
    from diffusers.models.normalization import AdaLayerNormContinuous

    old = block.norm1_context.linear
    if not isinstance(old, nn.Linear):
        return
    dim = old.out_features // 6
    norm = AdaLayerNormContinuous(dim, old.in_features, elementwise_affine=False, eps=1e-6, bias=True,
                                  norm_type="layer_norm").to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        norm.linear.weight.copy_(torch.cat([old.weight[dim : 2 * dim], old.weight[:dim]]))
        norm.linear.bias.copy_(torch.cat([old.bias[dim : 2 * dim], old.bias[:dim]]))
    block.norm1_context, block.norm2_context, block.ff_context = norm, None, None
    block.context_pre_only = block.attn.context_pre_only = True
    block.attn.to_add_out = None


class _DiffusersAdapter(ModelAdapter):
    """Shared parts: config-derived widths, text conditions, keeping ``num_layers`` in sync, and rebuilding
    from (and loading) diffusers configs of ``class_name``."""

    class_name = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_instance(model, cls.class_name)

    def architecture(self) -> dict:
        cfg = self.model.config
        return {"class": type(self.model).__name__, "config": {k: v for k, v in dict(cfg).items()
                                                               if not k.startswith("_")}}

    @classmethod
    def handles(cls, architecture: dict) -> bool:
        return architecture.get("class") == cls.class_name

    @classmethod
    def check_architecture(cls, architecture: dict) -> None:
        cfg = architecture.get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"architecture.config: missing (a {cls.class_name} needs its diffusers config)")
        for key, limit in (("num_attention_heads", 1024), ("attention_head_dim", 1024), ("num_layers", _MAX_LAYERS),
                           ("num_single_layers", _MAX_LAYERS), ("in_channels", 4096), ("sample_size", 4096),
                           ("joint_attention_dim", _MAX_WIDTH), ("caption_channels", _MAX_WIDTH),
                           ("cross_attention_dim", _MAX_WIDTH), ("pooled_projection_dim", _MAX_WIDTH)):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit):
                raise ValueError(f"architecture.config.{key}: {v!r} is not an integer in 1..{limit}")
        heads, dim = cfg.get("num_attention_heads") or 1, cfg.get("attention_head_dim") or 1
        if heads * dim > _MAX_WIDTH:
            raise ValueError(f"architecture.config: width {heads} x {dim} is above {_MAX_WIDTH}")

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        import diffusers

        return getattr(diffusers, cls.class_name).from_config(architecture["config"])

    @classmethod
    def from_pretrained(cls, path) -> nn.Module:
        """Load a local diffusers model directory of this class (never from a hub)."""
        import diffusers

        return getattr(diffusers, cls.class_name).from_pretrained(str(path), local_files_only=True)

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        return c.num_attention_heads * c.attention_head_dim

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.model.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def after_structure_change(self) -> None:
        """Keep ``config.num_layers`` equal to the block count, so configs saved later describe the model."""
        self.model.register_to_config(num_layers=len(self.model.transformer_blocks))

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        p = self.model.config.patch_size
        return latent_shape[-2] // p, latent_shape[-1] // p

    def attention_kernel(self, view: AttentionView) -> nn.Module | None:
        proc = view.module.processor
        return proc.kernel if isinstance(proc, KernelAttnProcessor) else None

    def install_kernel(self, view: AttentionView, kernel: nn.Module | None) -> None:
        """Through the attention processor: the family's own processor, with its SDPA call routed to ``kernel``."""
        attn = view.module
        proc = attn.processor
        original = proc.original if isinstance(proc, KernelAttnProcessor) else proc
        attn.set_processor(original if kernel is None else KernelAttnProcessor(kernel, original, view.path))

    @staticmethod
    def _text(name: str, *shape: int) -> ConditionSpec:
        return ConditionSpec(name=name, kind="embedding", shape=list(shape), null="zeros")


@register_adapter
class DiffusersDiTAdapter(_DiffusersAdapter):
    """``DiTTransformer2DModel``: class-conditional, learned sigma, adaLN-Zero blocks.

    Quirk: diffusers conditions the final layer on ``transformer_blocks[0].norm1.emb``, and every block
    owns a copy of the timestep/label embedder (identical in converted checkpoints). Removing block 0
    therefore switches the final layer to block 1's copy, which only matters if the copies differ.
    """

    family = "diffusers-dit"
    prediction = "epsilon"
    block_lists = {"block": "transformer_blocks"}
    class_name = "DiTTransformer2DModel"
    default_guidance = 4.0  # DiTPipeline's default

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        """Every block's own timestep + label embedder (the final layer reads block 0's)."""
        return [(f"transformer_blocks.{i}.norm1.emb", self.hidden_size) for i in range(len(self.model.transformer_blocks))]

    def conditions(self) -> list[ConditionSpec]:
        """The extra label-embedding row (index num_classes) is the null class."""
        return [ConditionSpec(name="y", kind="label", num_classes=self.model.config.num_embeds_ada_norm,
                              null="null_label")]

    def block_view(self, kind: str, index: int, path: str, block: nn.Module) -> BlockView:
        return BlockView(
            kind, index, path, block, attentions=[_attention(f"{path}.attn1", block.attn1)],
            mlps=_feed_forward(f"{path}.ff", block.ff), modulation=_modulation(block, ("norm1",)),
            embedders=[e for e in (getattr(block.norm1, "emb", None),) if e is not None],
        )

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        y = cond["y"].to(x.device).long()
        out = self.model(x, timestep=_batch_t(t, x), class_labels=y).sample
        return out[:, : self.model.config.in_channels]


@register_adapter
class PixArtAdapter(_DiffusersAdapter):
    """``PixArtTransformer2DModel``: self attention, cross attention to T5 tokens, shared adaLN-single.

    Blocks modulate with a ``scale_shift_table`` parameter plus the model-level ``adaln_single.linear``,
    so a block has no modulation Linear of its own.
    """

    family = "pixart"
    prediction = "epsilon"
    default_guidance = 4.5  # PixArtAlphaPipeline's default
    block_lists = {"block": "transformer_blocks"}
    class_name = "PixArtTransformer2DModel"

    def block_view(self, kind: str, index: int, path: str, block: nn.Module) -> BlockView:
        attns = [_attention(f"{path}.attn1", block.attn1)]
        if block.attn2 is not None:
            attns.append(_attention(f"{path}.attn2", block.attn2, kind="cross"))
        return BlockView(kind, index, path, block, attentions=attns, mlps=_feed_forward(f"{path}.ff", block.ff))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = _text_cond(cond, x)
        added = {"resolution": None, "aspect_ratio": None}
        if self.model.use_additional_conditions:  # PixArt-alpha 1024px: micro-conditions as the pipeline builds them
            h, w = x.shape[-2] * 8, x.shape[-1] * 8  # pixel size (VAE factor 8)
            added = {"resolution": x.new_tensor([[h, w]]).repeat(x.shape[0], 1),
                     "aspect_ratio": x.new_tensor([[h / w]]).repeat(x.shape[0], 1)}
        out = self.model(
            x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=_batch_t(t, x),
            added_cond_kwargs=added, encoder_attention_mask=cond.get("encoder_attention_mask"),
        ).sample
        return out[:, : self.model.config.in_channels]

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        return [("adaln_single.emb", self.hidden_size)]

    def conditions(self) -> list[ConditionSpec]:
        c = self.model.config
        dim = c.caption_channels if c.caption_channels is not None else c.cross_attention_dim
        return [self._text("encoder_hidden_states", TEXT_TOKENS, dim)]


@register_adapter
class SD3Adapter(_DiffusersAdapter):
    """``SD3Transformer2DModel``: joint (MMDiT) blocks, rectified flow.

    The last block is ``context_pre_only`` (no ``to_add_out``/``ff_context``). SD3.5 blocks listed in
    ``dual_attention_layers`` carry a second, image-only self attention ``attn2``.
    """

    family = "sd3"
    prediction = "flow"
    default_guidance = 7.0  # StableDiffusion3Pipeline's default
    block_lists = {"joint": "transformer_blocks"}
    class_name = "SD3Transformer2DModel"

    def block_view(self, kind: str, index: int, path: str, block: nn.Module) -> BlockView:
        attns = [_attention(f"{path}.attn", block.attn, image_tokens="first")]  # JointAttnProcessor2_0: [image | text]
        if block.attn2 is not None:
            attns.append(_attention(f"{path}.attn2", block.attn2))
        mlps = _feed_forward(f"{path}.ff", block.ff)
        if block.ff_context is not None:
            mlps += _feed_forward(f"{path}.ff_context", block.ff_context)
        return BlockView(kind, index, path, block, attentions=attns, mlps=mlps, modulation=_modulation(block))

    def after_structure_change(self) -> None:
        """Renumber ``dual_attention_layers`` (block indices) and keep the last block context-pre-only.

        from_pretrained rebuilds the last block as ``context_pre_only``; if the old last block was removed,
        the new one is converted to match, or a saved pruned model would not load.
        """
        blocks = self.model.transformer_blocks
        if len(blocks) and not blocks[-1].context_pre_only:
            _make_context_pre_only(blocks[-1])
        dual = tuple(i for i, b in enumerate(blocks) if b.use_dual_attention)
        self.model.register_to_config(num_layers=len(blocks), dual_attention_layers=dual)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = _text_cond(cond, x)
        return self.model(
            x, encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
            timestep=_batch_t(t, x),
        ).sample

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        return [("time_text_embed", self.hidden_size)]  # timestep + pooled text

    def conditions(self) -> list[ConditionSpec]:
        c = self.model.config
        return [self._text("encoder_hidden_states", TEXT_TOKENS, c.joint_attention_dim),
                self._text("pooled_projections", c.pooled_projection_dim)]


@register_adapter
class FluxAdapter(_DiffusersAdapter):
    """``FluxTransformer2DModel``: joint blocks then single-stream blocks, rectified flow.

    x stays packed, (batch, N, in_channels) with N a square number of tokens; the adapter builds the RoPE
    ids itself as ``FluxPipeline`` does (2-D: img_ids for a sqrt(N) x sqrt(N) grid, txt_ids zeros) and
    passes ``timestep / 1000`` (the model multiplies by 1000 again).
    """

    family = "flux"
    prediction = "flow"
    default_guidance = 1.0  # FluxPipeline: no CFG (dev embeds its guidance, schnell needs none)
    block_lists = {"joint": "transformer_blocks", "single": "single_transformer_blocks"}
    class_name = "FluxTransformer2DModel"

    def __init__(self, model: nn.Module, tokens: int | None = None):
        super().__init__(model)
        # Default: a 1024px image (64x64 packed grid) for real widths, a 4x4 grid for toy models.
        self.tokens = tokens or (4096 if self.hidden_size >= 1024 else 16)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.tokens, self.model.config.in_channels)

    def block_view(self, kind: str, index: int, path: str, block: nn.Module) -> BlockView:
        if kind == "joint":
            return BlockView(  # FluxAttnProcessor joins the streams as [text | image]
                kind, index, path, block, attentions=[_attention(f"{path}.attn", block.attn, image_tokens="last")],
                mlps=_feed_forward(f"{path}.ff", block.ff) + _feed_forward(f"{path}.ff_context", block.ff_context),
                modulation=_modulation(block),
            )
        # Single block: proj_out reads [attn | mlp], so the MLP's columns start after the attention output. After
        # the moe pass proj_mlp holds routed experts that project their own output: no dense MLP view then. Its
        # attention sees the [text | image] sequence the block concatenated: joint attention in one stream.
        mlps = []
        if not isinstance(block.proj_mlp, MoEFeedForward):
            hidden = block.proj_mlp.out_features
            mlps.append(MLPView(path, block.proj_mlp, block.proj_out, hidden, activation=_activation(block.act_mlp),
                                fc_out_offset=block.proj_out.in_features - hidden, act_path=f"{path}.act_mlp"))
        attn = _attention(f"{path}.attn", block.attn, kind="joint", image_tokens="last")
        return BlockView(kind, index, path, block, attentions=[attn], mlps=mlps, modulation=_modulation(block))

    def after_structure_change(self) -> None:
        m = self.model
        m.register_to_config(num_layers=len(m.transformer_blocks), num_single_layers=len(m.single_transformer_blocks))

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        side = math.isqrt(latent_shape[0])  # packed (tokens, channels): a square grid (see denoise)
        return side, side

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = _text_cond(cond, x)
        n, side = x.shape[1], math.isqrt(x.shape[1])
        if side * side != n:
            raise ValueError(f"Flux input has {n} tokens; the adapter needs a square token grid")
        img_ids = torch.zeros(side, side, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(side, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(side, device=x.device, dtype=x.dtype)[None, :]
        ctx = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(ctx.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = cond.get("guidance", torch.tensor(3.5)).to(x.device, torch.float32)
            guidance = guidance.reshape(-1).expand(x.shape[0]) if guidance.numel() == 1 else guidance
        return self.model(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=cond["pooled_projections"],
            timestep=_batch_t(t, x).to(x.dtype) / 1000, img_ids=img_ids.reshape(n, 3), txt_ids=txt_ids,
            guidance=guidance,
        ).sample

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        return [("time_text_embed", self.hidden_size)]  # timestep (+ embedded guidance) + pooled text

    def conditions(self) -> list[ConditionSpec]:
        """Text embeddings, and for guidance-distilled Flux (dev) the embedded guidance FluxPipeline feeds."""
        c = self.model.config
        out = [self._text("encoder_hidden_states", TEXT_TOKENS, c.joint_attention_dim),
               self._text("pooled_projections", c.pooled_projection_dim)]
        if c.guidance_embeds:
            out.append(ConditionSpec(name="guidance", kind="scalar", value=3.5, null="same"))
        return out
