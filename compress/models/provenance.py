"""Where a model came from and what was done to it, carried on the module itself.

``load_model`` stamps the source (name, content hash, architecture); the adapter appends every
structural edit (block removal, sub-module replacement, attribute change) in order; passes append
their log. ``compress.save`` writes all of it to ``manifest.json`` and ``compress.load`` replays the
edits on a freshly built source architecture, so every compressed model reloads the same way.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

from torch import nn

ATTR = "_dit_compress"


def provenance(model: nn.Module) -> dict:
    """The mutable provenance record of ``model`` (created empty if the model has none)."""
    rec = getattr(model, ATTR, None)
    if rec is None:
        rec = {"source": None, "architecture": architecture_of(model), "edits": [], "passes": [], "recipe": None}
        object.__setattr__(model, ATTR, rec)
    return rec


def stamp_source(model: nn.Module, name: str, sha256: str | None) -> nn.Module:
    rec = provenance(model)
    rec["source"] = {"name": name, "sha256": sha256}
    rec["architecture"] = architecture_of(model)
    return model


def record_edit(model: nn.Module, edit: dict) -> None:
    provenance(model)["edits"].append(edit)


def copy_provenance(src: nn.Module, dst: nn.Module) -> None:
    object.__setattr__(dst, ATTR, copy.deepcopy(provenance(src)))


def architecture_of(model: nn.Module) -> dict:
    """Enough to rebuild the un-edited source module: class and config."""
    from compress.models.dit import DiT

    if isinstance(model, DiT):
        return {"class": "DiT", "config": model.config.to_dict()}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "items"):
        return {"class": type(model).__name__, "config": {k: v for k, v in dict(cfg).items()
                                                          if not k.startswith("_")}}
    return {"class": type(model).__name__, "config": None}


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
