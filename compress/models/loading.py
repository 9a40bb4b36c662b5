"""Checkpoint formats in, clear errors out.

``load_model`` accepts:
  * ``reference``                the bundled digits DiT;
  * a published config name      (``DiT-XL/2``, ``DiT-B/2`` ...) -> random weights, for speed work;
  * ``*.safetensors``            native DiT weights (config from metadata, else inferred from shapes);
  * ``*.pt`` / ``*.pth``         official DiT checkpoints or ``train.py`` checkpoints (``ema`` entry),
                                 read with ``torch.load(weights_only=True)``: never arbitrary unpickling;
  * a diffusers directory        (``config.json`` with ``_class_name``, or a pipeline with ``transformer/``).
Every failure becomes a ``DitCompressError`` that names the file and what is wrong.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.models.dit import DIT_CONFIGS, DiT, DiTConfig
from compress.models.provenance import file_sha256, stamp_source

# Official head counts by width (heads cannot be read off weight shapes).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Real-size diffusers architectures for speed work (random weights; latency does not depend on values).
DIFFUSERS_PRESETS = {
    "PixArt-XL/2-256": ("PixArtTransformer2DModel", dict(
        num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, sample_size=32,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False)),
}
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                     "FluxTransformer2DModel")


def load_model(source: str | Path, *, num_heads: int | None = None) -> nn.Module:
    """Load a DiT from a name, a file or a diffusers directory; returns the module in eval mode."""
    src = str(source)
    if src == "reference":
        from compress.models.reference import REFERENCE_CONFIG, WEIGHTS

        model = _load_native_file(WEIGHTS, REFERENCE_CONFIG)
        stamp_source(model, "reference", file_sha256(WEIGHTS))
    elif src in DIT_CONFIGS or src.removeprefix("preset:") in DIT_CONFIGS:
        name = src.removeprefix("preset:")
        torch.manual_seed(0)  # presets are for speed work: random weights, but the same ones every time
        model = DiT(DIT_CONFIGS[name])
        stamp_source(model, f"preset:{name}", None)
    elif src.removeprefix("preset:") in DIFFUSERS_PRESETS:
        import diffusers

        name = src.removeprefix("preset:")
        cls_name, cfg = DIFFUSERS_PRESETS[name]
        torch.manual_seed(0)
        model = getattr(diffusers, cls_name)(**cfg)
        stamp_source(model, f"preset:{name}", None)
    else:
        path = Path(source)
        if not path.exists():
            raise DitCompressError(
                f"{path}: no such file or directory. Pass 'reference', a config name such as 'DiT-XL/2', a "
                f".safetensors / .pt checkpoint, or a diffusers model directory."
            )
        if path.is_dir():
            if (path / "manifest.json").exists():
                from compress.artifact import load as load_artifact

                return load_artifact(path)
            model = _load_diffusers_dir(path)
            weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")]
            stamp_source(model, str(path), file_sha256(*weights) if weights else None)
        else:
            model = _load_native_file(path, None, num_heads)
            stamp_source(model, str(path), file_sha256(path))
    return model.eval()


# ---- native DiT files ---------------------------------------------------------------------------
def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .pt file, with format errors made readable."""
    if not path.is_file():
        raise DitCompressError(f"{path}: no such checkpoint file.")
    if path.stat().st_size == 0:
        raise DitCompressError(f"{path}: the file is empty (0 bytes); the checkpoint was not written completely.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DitCompressError(
                f"{path}: not a readable safetensors file ({_first_line(e)}). It is probably truncated or corrupt; "
                f"re-download or re-save it."
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DitCompressError(
            f"{path}: refused to load. The file contains Python objects other than tensors "
            f"({_first_line(e, 'unsupported global')}); dit-compress never unpickles arbitrary code. "
            f"Convert it to safetensors in a trusted environment first."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise DitCompressError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}). It is probably truncated or corrupt."
        ) from None
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DitCompressError(f"{path}: expected a dict of tensors (or one under 'ema' / 'model'), found {type(obj).__name__}.")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def infer_dit_config(sd: dict[str, torch.Tensor], path: Path, num_heads: int | None = None) -> DiTConfig:
    """Recover a DiTConfig from an official state dict's shapes."""
    required = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "t_embedder.mlp.0.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise DitCompressError(
            f"{path}: not a DiT checkpoint in the official layout; missing keys {missing} "
            f"(found e.g. {sorted(sd)[:5]})."
        )
    w = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    table = sd.get("y_embedder.embedding_table.weight")
    mlp = sd.get("blocks.0.mlp.fc1.weight")
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden) or _guess_heads(hidden)
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=(mlp.shape[0] / hidden) if mlp is not None else 4.0,
        class_dropout_prob=0.1, num_classes=(table.shape[0] - 1) if table is not None else 1000,
        learn_sigma=out == 2 * in_ch,
    )


def _guess_heads(hidden: int) -> int:
    """Non-official widths: head dim 64 when it divides, else the largest head count <= 16 that does."""
    if hidden % 64 == 0:
        return hidden // 64
    return next(h for h in range(16, 0, -1) if hidden % h == 0)


def _load_native_file(path: Path, config: DiTConfig | None, num_heads: int | None = None) -> DiT:
    sd, meta = read_state_dict(path)
    if config is None and "dit_config" in meta:
        config = DiTConfig(**json.loads(meta["dit_config"]))
    config = config or infer_dit_config(sd, path, num_heads)
    model = DiT(config)
    load_state_dict_strict(model, sd, path)
    return model


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path | str) -> None:
    """Strict load, with missing / unexpected / mis-shaped keys listed in one readable paragraph."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise DitCompressError(
            f"{path}: does not match the expected {type(model).__name__} architecture: {'; '.join(parts)}. "
            f"Check that the checkpoint and the configuration are the same model."
        )
    model.load_state_dict(sd, strict=True)


# ---- diffusers ----------------------------------------------------------------------------------
def _load_diffusers_dir(path: Path) -> nn.Module:
    import diffusers

    cfg_path = path / "config.json"
    if not cfg_path.exists() and (path / "transformer" / "config.json").exists():
        path, cfg_path = path / "transformer", path / "transformer" / "config.json"
    if not cfg_path.exists():
        raise DitCompressError(f"{path}: a directory without config.json; not a diffusers model or pipeline directory.")
    try:
        cls_name = json.loads(cfg_path.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise DitCompressError(f"{cfg_path}: invalid JSON ({e}).") from None
    if cls_name not in DIFFUSERS_CLASSES:
        raise DitCompressError(f"{cfg_path}: model class {cls_name!r} is not supported; supported: {', '.join(DIFFUSERS_CLASSES)}.")
    try:
        return getattr(diffusers, cls_name).from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # diffusers raises many types; all mean "this directory does not load"
        raise DitCompressError(f"{path}: diffusers could not load this {cls_name}: {_first_line(e)}") from None


def _first_line(e: BaseException, prefer: str | None = None) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    if prefer:
        lines = [ln for ln in lines if prefer.lower() in ln.lower()] or lines
    return lines[0][:300]
