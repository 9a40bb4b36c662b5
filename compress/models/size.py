"""How big a model is: the one place parameter counts and byte sizes are computed."""

from __future__ import annotations

from torch import nn


def param_count(model: nn.Module) -> int:
    """Trainable-or-not ``nn.Parameter`` elements (quantized layers keep their weights in buffers)."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state dict holds: parameters and buffers, packed ones included.

    This is what an uncompressed weights file of the model holds; tensors shared under two names count once.
    """
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
