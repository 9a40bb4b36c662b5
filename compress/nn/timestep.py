"""The timestep of the denoiser call being run, for layers whose arithmetic depends on it.

Per-timestep-group activation scales (``QuantLinear``) and step caches need to know which timestep the
current transformer call is at. The adapter's ``forward`` sets it for the duration of the call
(``denoiser_call``); layers read it with ``current_timestep``. A context variable, not a global: nested
or concurrent calls (threads, generators) each see their own value, and nothing has to be installed on
the model for it to work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_CURRENT: ContextVar[torch.Tensor | None] = ContextVar("dit_compress_timestep", default=None)


@contextlib.contextmanager
def denoiser_call(t: torch.Tensor | float | None) -> Iterator[None]:
    """Make ``t`` (the call's timesteps, in [0, 1000] for every family) current inside the block."""
    token = _CURRENT.set(None if t is None else torch.as_tensor(t))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_timestep() -> torch.Tensor | None:
    """The running call's timesteps (a tensor, one per row or one for all), or None outside a call."""
    return _CURRENT.get()
