"""Reading tensors from checkpoint files and loading them strictly, with readable errors.

Shared by model loading (checkpoints in) and artifact loading (an artifact's weights file).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError


def first_line(e: BaseException, prefer: str | None = None) -> str:
    """The first (or the first ``prefer``-containing) non-empty line of an exception's message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    if prefer:
        lines = [ln for ln in lines if prefer.lower() in ln.lower()] or lines
    return lines[0][:300]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file; a truncated or foreign file is a clear error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DitCompressError(
            f"{path}: not a readable safetensors file ({first_line(e)}). It is probably truncated or corrupt; "
            f"re-download or re-save it."
        ) from None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .pt file, with format errors made readable."""
    if not path.is_file():
        raise DitCompressError(f"{path}: no such checkpoint file.")
    if path.stat().st_size == 0:
        raise DitCompressError(f"{path}: the file is empty (0 bytes); the checkpoint was not written completely.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(2)
    # torch's zip format starts with a local-file header ("PK"; a truncated one is still one), a legacy pickle with
    # its protocol opcode; anything else was never written by torch.save.
    if head != b"PK" and head[:1] != b"\x80":
        raise DitCompressError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle; "
                               f"it starts with {head!r}). Pass a .pt/.pth written by torch.save, or a .safetensors.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DitCompressError(
            f"{path}: refused to load. The file contains Python objects other than tensors "
            f"({first_line(e, 'unsupported global')}); dit-compress never unpickles arbitrary code. "
            f"Convert it to safetensors in a trusted environment first."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as e:
        raise DitCompressError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(e)}). It is probably truncated or corrupt."
        ) from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DitCompressError(f"{path}: expected a dict of tensors (or one under 'ema' / 'model'), found "
                               f"{type(obj).__name__}{' (empty)' if isinstance(obj, dict) and not obj else ''}.")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}, {}


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path | str) -> None:
    """Strict load, with missing / unexpected / mis-shaped / mis-typed keys listed in one readable paragraph."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    # integer / float8 storage must match exactly (a float file in an int8 slot would be silently cast)
    dtypes = [f"{k}: checkpoint {sd[k].dtype} vs model {own[k].dtype}" for k in own
              if k in sd and sd[k].shape == own[k].shape and sd[k].dtype != own[k].dtype
              and not (sd[k].is_floating_point() and own[k].is_floating_point() and own[k].element_size() >= 2)]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if dtypes:
            parts.append(f"{len(dtypes)} dtype mismatches (e.g. {'; '.join(dtypes[:3])})")
        raise DitCompressError(
            f"{path}: does not match the expected {type(model).__name__} architecture: {'; '.join(parts)}. "
            f"Check that the checkpoint and the configuration are the same model."
        )
    bad = [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not torch.isfinite(v.float()).all()]
    if bad:
        raise DitCompressError(f"{path}: {len(bad)} tensors hold NaN or Inf values (e.g. {', '.join(bad[:3])}); the "
                               f"checkpoint is corrupt or diverged. Use a checkpoint from before the divergence.")
    model.load_state_dict(sd, strict=True)
