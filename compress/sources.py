"""Any model source in, a PyTorch module out: the one loader behind ``compress.load_model``.

Artifact directories (``manifest.json``, or an interrupted ``.NAME.partial-*`` write) go to
``compress.artifact.load``; everything else (bundled names, presets, checkpoint files, diffusers
directories) to ``compress.models.loading.load_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compress.artifact import load as load_artifact
from compress.models.loading import load_checkpoint


def load_model(source: str | Path, *, num_heads: int | None = None) -> nn.Module:
    """Load a model from a name, a checkpoint, a diffusers directory or an artifact; eval mode."""
    p = Path(source)
    if p.is_dir() and ((p / "manifest.json").exists() or ".partial-" in p.name or ".old-" in p.name):
        return load_artifact(p)
    return load_checkpoint(source, num_heads=num_heads)
