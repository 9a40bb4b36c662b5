"""Adapter for the native (official-layout) DiT in ``compress.models.dit``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compress.models.adapters.base import AttentionView, BlockView, Cond, MLPView, ModelAdapter, register_adapter
from compress.models.contract import ConditionSpec
from compress.models.dit import DiT, DiTConfig, Mlp

# Bounds a recorded architecture must satisfy before anything is allocated (DiT-XL/2 is 1152 wide, 28 deep).
_MAX_PARAMS = 50e9


@register_adapter
class NativeDiTAdapter(ModelAdapter):
    family = "dit"
    prediction = "epsilon"
    block_lists = {"block": "blocks"}
    default_guidance = 4.0  # the official sample.py default

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, DiT)

    def architecture(self) -> dict:
        return {"class": "DiT", "config": self.model.config.to_dict()}

    @classmethod
    def handles(cls, architecture: dict) -> bool:
        return architecture.get("class") == "DiT"

    @classmethod
    def check_architecture(cls, architecture: dict) -> None:
        cfg = architecture.get("config")
        if not isinstance(cfg, dict):
            raise ValueError("architecture.config: missing (a DiT needs its DiTConfig fields)")
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(DiTConfig)})
        if unknown:
            raise ValueError(f"architecture.config: unknown DiT fields {unknown}")
        types = {f.name: f.type for f in dataclasses.fields(DiTConfig)}  # "int" / "float" / "bool" (annotations)
        for k, v in cfg.items():
            ok = {"bool": isinstance(v, bool), "int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, int | float) and not isinstance(v, bool)}[types[k]]
            if not ok:
                raise ValueError(f"architecture.config.{k}: expected {types[k]}, got {v!r}")
            if types[k] != "bool" and not 0 <= v <= 1_000_000:
                raise ValueError(f"architecture.config.{k}: {v} is out of range")
        c = DiTConfig(**cfg)
        if min(c.input_size, c.patch_size, c.in_channels, c.hidden_size, c.depth, c.num_heads, c.num_classes) < 1:
            raise ValueError("architecture.config: sizes must be positive")
        est = c.depth * 12 * c.hidden_size**2 * (1 + c.mlp_ratio / 4) + (c.num_classes + 1) * c.hidden_size
        if est > _MAX_PARAMS:
            raise ValueError(f"architecture.config: about {est:.3g} parameters, more than any DiT this loader "
                             f"accepts ({_MAX_PARAMS:.0e})")

    @classmethod
    def build(cls, architecture: dict) -> DiT:
        return DiT(DiTConfig(**architecture["config"]))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.model.config
        return (c.in_channels, c.input_size, c.input_size)

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        return [("t_embedder", self.model.config.hidden_size)]  # c = t_embedder(t) + y_embedder(y)

    def conditions(self) -> list[ConditionSpec]:
        return [ConditionSpec(name="y", kind="label", num_classes=self.model.config.num_classes, null="null_label")]

    def block_view(self, kind, index, path, block) -> BlockView:
        a, mlp = block.attn, block.mlp
        # a dense Mlp only: once the moe pass turned it into routed experts, it is no longer an MLP view
        mlps = [MLPView(f"{path}.mlp", mlp.fc1, mlp.fc2, mlp.fc1.out_features, activation="gelu_tanh")
                ] if isinstance(mlp, Mlp) else []
        return BlockView(
            kind=kind, index=index, path=path, module=block,
            attentions=[AttentionView(f"{path}.attn", a, a.num_heads, a.head_dim, qkv=a.qkv, out=a.proj)],
            mlps=mlps,
            modulation=[block.adaLN_modulation[1]],
        )

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        p = self.model.config.patch_size
        return latent_shape[-2] // p, latent_shape[-1] // p

    def attention_kernel(self, view: AttentionView) -> nn.Module | None:
        return view.module.kernel

    def install_kernel(self, view: AttentionView, kernel: nn.Module | None) -> None:
        """``Attention.kernel``: the computation between ``qkv`` and ``proj`` (None: SDPA)."""
        view.module.kernel = kernel

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.model(x, t, cond["y"])
        return out[:, : self.model.in_channels]
