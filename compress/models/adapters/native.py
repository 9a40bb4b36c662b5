"""Adapter for the native (official-layout) DiT in ``compress.models.dit``."""

from __future__ import annotations

import torch

from compress.models.adapters.base import AttentionView, BlockView, Cond, MLPView, ModelAdapter, register_adapter
from compress.models.dit import DiT


@register_adapter
class NativeDiTAdapter(ModelAdapter):
    family = "dit"
    prediction = "epsilon"
    block_lists = {"block": "blocks"}

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, DiT)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.model.config
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def block_view(self, kind, index, path, block) -> BlockView:
        a = block.attn
        return BlockView(
            kind=kind, index=index, path=path, module=block,
            attentions=[AttentionView(f"{path}.attn", a, a.num_heads, a.head_dim, qkv=a.qkv, out=a.proj)],
            mlps=[MLPView(f"{path}.mlp", block.mlp.fc1, block.mlp.fc2, block.mlp.fc1.out_features)],
            modulation=[block.adaLN_modulation[1]],
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.model(x, t, cond["y"])
        return out[:, : self.model.in_channels]

    def null_cond(self, cond: Cond) -> Cond:
        return {"y": torch.full_like(cond["y"], self.num_classes)}

    def example_cond(self, batch, generator=None, labels=None) -> Cond:
        if labels is None:
            labels = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return {"y": labels.long()}
