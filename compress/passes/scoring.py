"""Scoring a model's parts by what changing each one alone does to the whole denoiser's output.

Depth pruning scores a block by the output error of skipping it; linear attention scores a block by the
output error of linearising its attention. Both run the same loop: the model's outputs on calibration
rows (the source's trajectories, both CFG branches) with and without one change at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager

import torch
from torch import nn

from compress.calibration import CalibrationSet
from compress.models.adapters import get_adapter


@torch.no_grad()
def output_errors(model: nn.Module, rows: CalibrationSet,
                  changes: dict[Hashable, Callable[[], AbstractContextManager]], device: str = "cpu",
                  batch: int = 64) -> dict[Hashable, float]:
    """Relative output MSE (sum |out - ref|^2 / sum |ref|^2) of ``model`` under each change alone.

    ``changes`` maps a key to a factory of a context manager that changes the model while it is active.
    """
    adapter = get_adapter(model)
    batches = [(x.to(device), t.to(device), {k: v.to(device) for k, v in c.items()}) for x, t, c in rows.batches(batch)]
    ref = [adapter.forward(*b) for b in batches]
    power = sum(float(r.pow(2).sum()) for r in ref)
    out = {}
    for key, change in changes.items():
        with change():
            err = sum(float((adapter.forward(*b) - r).pow(2).sum()) for b, r in zip(batches, ref))
        out[key] = err / max(power, 1e-12)
    return out
