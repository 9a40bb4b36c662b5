"""Guidance as an input: the embedding a guidance-distilled student adds to its timestep conditioning.

Meng et al. ("On Distillation of Guided Diffusion Models") train a student that takes the guidance scale
``w`` as an input and matches the teacher's classifier-free-guided output in one call. The student here is
the source model with its timestep embedder wrapped: the wrapper returns the original embedding plus an
MLP of sinusoidal features of ``w``, whose last layer starts at zero, so the student starts out exactly as
the source. ``w`` reaches the wrapper through ``compress.nn.timestep.current_guidance`` (the adapter sets
it from the ``guidance_scale`` condition), so no family's forward signature changes.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.nn.registry import replayable
from compress.nn.sinusoid import sinusoidal_embedding
from compress.nn.timestep import current_guidance

GUIDANCE_INPUT = "guidance_scale"  # the condition name students take the scale by (an ONNX input too)
# w is at most a few tens: scaled so the sinusoids resolve steps of 0.1 as timesteps resolve steps of 1
_W_SCALE = 100.0


class GuidanceEmbedding(nn.Module):
    """``inner(*args) + mlp(sinusoid(w))``: a wrapped conditioning embedder that also embeds the guidance scale.

    ``inner`` is the family's timestep (or timestep + label / text) embedder; its output is a (batch, dim)
    conditioning vector. Outside a guided call (``current_guidance()`` is None) the wrapper adds nothing.
    """

    def __init__(self, dim: int, hidden: int = 256, frequencies: int = 256):
        super().__init__()
        self.dim, self.hidden, self.frequencies = dim, hidden, frequencies
        self.inner: nn.Module | None = None  # set by ``ModelAdapter.wrap``
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        w = current_guidance()
        if w is None:
            return out
        emb = out[0] if isinstance(out, tuple) else out
        w = w.to(emb.device).float().reshape(-1)
        if w.numel() == 1:
            w = w.expand(emb.shape[0])
        g = self.mlp(sinusoidal_embedding(w * _W_SCALE, self.frequencies).to(emb.dtype))
        return (emb + g, *out[1:]) if isinstance(out, tuple) else emb + g

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


replayable(
    "guidance_embedding",
    lambda m: {"dim": m.dim, "hidden": m.hidden, "frequencies": m.frequencies, "wraps": True},
    lambda s: GuidanceEmbedding(s["dim"], s["hidden"], s["frequencies"]),
)(GuidanceEmbedding)
