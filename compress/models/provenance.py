"""Where a model came from and what was done to it, carried on the module itself.

``load_model`` stamps the source (name, content hash); the adapter records the source architecture
the first time it sees the model and appends every structural edit (block removal, sub-module
replacement, attribute change) in order; passes append their log and may change how the model is
sampled (its sampling contract). ``compress.save`` writes all of it to ``manifest.json`` and
``compress.load`` replays the edits on a freshly built source architecture, so every compressed model
reloads the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

ATTR = "_dit_compress"
FIELDS = ("source", "architecture", "recipe", "passes", "edits", "sampling")


def provenance(model: nn.Module) -> dict:
    """The mutable provenance record of ``model`` (created empty if the model has none)."""
    rec = getattr(model, ATTR, None)
    if rec is None:
        rec = {"source": None, "architecture": None, "edits": [], "passes": [], "recipe": None, "sampling": None}
        object.__setattr__(model, ATTR, rec)
    return rec


def stamp_source(model: nn.Module, name: str, sha256: str | None) -> nn.Module:
    """Record where ``model`` was loaded from (a name or path, and the content hash of its weights)."""
    provenance(model)["source"] = {"name": name, "sha256": sha256}
    return model


def record_edit(model: nn.Module, edit: dict) -> None:
    provenance(model)["edits"].append(edit)


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
