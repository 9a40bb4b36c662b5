"""The state of the denoiser call being run: its timestep, the guidance scale of guidance-distilled students,
and the grid of its image tokens.

Per-timestep-group activation scales (``QuantLinear``), step caches, guidance embeddings and attention
kernels that work on the 2-D token grid (``compress.nn.attention``) need values that reach the model as
call arguments (or follow from their shapes) but are used deep inside it. The adapter's ``forward`` sets them
for the duration of the call (``denoiser_call``); layers read them with ``current_timestep`` /
``current_guidance``. Context variables, not globals: nested or concurrent calls each see their own
values, and nothing has to be installed on the model for it to work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_TIMESTEP: ContextVar[torch.Tensor | None] = ContextVar("dit_compress_timestep", default=None)
_GUIDANCE: ContextVar[torch.Tensor | None] = ContextVar("dit_compress_guidance", default=None)
_GRID: ContextVar[tuple[int, int] | None] = ContextVar("dit_compress_token_grid", default=None)
_FIRST: ContextVar[list | None] = ContextVar("dit_compress_first_timestep", default=None)  # a call's [] or [float]


@contextlib.contextmanager
def denoiser_call(t: torch.Tensor | float | None, guidance: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None) -> Iterator[None]:
    """Make ``t`` (the call's timesteps, in [0, 1000] for every family), ``guidance`` and the image-token ``grid``
    (rows, columns) current in the block."""
    tokens = (_TIMESTEP.set(None if t is None else torch.as_tensor(t)), _GUIDANCE.set(guidance), _GRID.set(grid),
              _FIRST.set([]))
    try:
        yield
    finally:
        _FIRST.reset(tokens[3])
        _GRID.reset(tokens[2])
        _GUIDANCE.reset(tokens[1])
        _TIMESTEP.reset(tokens[0])


def current_timestep() -> torch.Tensor | None:
    """The running call's timesteps (a tensor, one per row or one for all), or None outside a call."""
    return _TIMESTEP.get()


def current_first_timestep() -> float | None:
    """The running call's first timestep as a Python float (None outside a call or for an empty one), read from
    the tensor once per call: per-timestep-group scales are chosen by it in every quantized layer, and a device
    read per layer costs more than the small layers' matmuls."""
    first = _FIRST.get()
    if first:
        return first[0]
    t = _TIMESTEP.get()
    if t is None or not t.numel():
        return None
    value = float(t.reshape(-1)[0])
    if first is not None:
        first.append(value)
    return value


def current_guidance() -> torch.Tensor | None:
    """The running call's guidance scale per row (guidance-distilled students), or None."""
    return _GUIDANCE.get()


def current_grid() -> tuple[int, int] | None:
    """The running call's image-token grid (rows, columns), as its adapter derived it from the latent's shape."""
    return _GRID.get()
