"""Artifacts: ``model.safetensors`` + ``manifest.json`` in a directory, written atomically.

Loading rebuilds the source architecture, replays the recorded structural edits (pruned blocks,
replaced modules, changed attributes), then loads the weights with strict keys: one format for
pruned, quantized, MoE and linear-attention models alike.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from compress.io import atomic_directory
from compress.nn.quant import track_timesteps
from compress.errors import DitCompressError
from compress.models.provenance import ATTR, file_sha256, provenance

FORMAT = "dit-compress-artifact"
VERSION = 1


def save(model: nn.Module, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``model`` and its manifest to ``out_dir`` atomically (temp dir + rename)."""
    out = Path(out_dir)
    why = getattr(model, "_dit_compress_unsaveable", None)
    if why:
        raise DitCompressError(f"{out}: this model cannot be saved as an artifact: {why}.")
    if out.exists() and not force:
        raise DitCompressError(f"{out}: already exists; pass --force (force=True) to replace it.")
    with atomic_directory(out) as tmp:
        weights = tmp / "model.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, weights)
        rec = provenance(model)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": rec["source"], "architecture": rec["architecture"], "recipe": rec["recipe"],
            "passes": rec["passes"], "edits": rec["edits"],
            "params": sum(p.numel() for p in model.parameters()),
            "weights": {"file": "model.safetensors", "bytes": weights.stat().st_size, "sha256": file_sha256(weights)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return out


def read_manifest(path: str | Path) -> dict:
    d = Path(path)
    mpath = d / "manifest.json"
    if not d.is_dir():
        raise DitCompressError(f"{d}: no such artifact directory.")
    if ".partial-" in d.name:
        raise DitCompressError(f"{d}: an unfinished artifact (its write was interrupted); apply the recipe again.")
    if not mpath.exists():
        raise DitCompressError(f"{d}: not a dit-compress artifact (no manifest.json).")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DitCompressError(f"{mpath}: corrupt manifest ({e}).") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DitCompressError(f"{mpath}: unsupported artifact format {m.get('format')!r} v{m.get('version')!r}.")
    return m


def _build_source(arch: dict, where: Path) -> nn.Module:
    from compress.models.dit import DiT, DiTConfig

    if arch["class"] == "DiT":
        return DiT(DiTConfig(**arch["config"]))
    import diffusers

    cls = getattr(diffusers, arch["class"], None)
    if cls is None or arch.get("config") is None:
        raise DitCompressError(f"{where}: cannot rebuild architecture {arch['class']!r}.")
    return cls.from_config(arch["config"])


def load(path: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a saved artifact: source architecture + replayed edits + strict weights."""
    from safetensors.torch import load_file

    from compress.models.adapters import get_adapter
    from compress.models.loading import load_state_dict_strict

    d = Path(path)
    m = read_manifest(d)
    weights = d / m["weights"]["file"]
    if not weights.exists():
        raise DitCompressError(f"{d}: manifest present but {weights.name} is missing.")
    if verify and (weights.stat().st_size != m["weights"]["bytes"] or file_sha256(weights) != m["weights"]["sha256"]):
        raise DitCompressError(f"{weights}: content does not match the manifest's size/sha256; the file is "
                               f"truncated or was modified after saving.")
    model = _build_source(m["architecture"], d)
    get_adapter(model).replay(m["edits"])
    try:
        sd = load_file(weights)
    except Exception as e:  # safetensors raises its own error type
        raise DitCompressError(f"{weights}: unreadable weights ({e}).") from None
    load_state_dict_strict(model, sd, weights)
    if any(getattr(mod, "act_edges", None) is not None for mod in model.modules()):
        track_timesteps(model)  # per-timestep-group activation scales need the running timestep
    object.__setattr__(model, ATTR, {k: m[k] for k in ("source", "architecture", "recipe", "passes", "edits")})
    return model.eval().requires_grad_(False)
