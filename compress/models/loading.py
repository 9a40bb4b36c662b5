"""Checkpoint formats in, clear errors out.

``load_model`` accepts:
  * ``reference`` / ``reference-p1``  the bundled digits DiTs (16 and 64 tokens per image);
  * a published config name      (``DiT-XL/2``, ``DiT-B/2`` ...) or a diffusers preset -> random weights, for
                                 speed work;
  * ``*.safetensors``            native DiT weights (config from metadata, a sidecar ``NAME.json``, or the
                                 official layout's shapes);
  * ``*.pt`` / ``*.pth``         official DiT checkpoints or ``train.py`` checkpoints (``ema`` entry),
                                 read with ``torch.load(weights_only=True)``: never arbitrary unpickling;
  * a diffusers directory        (``config.json`` with a ``_class_name`` some adapter serves, or a pipeline
                                 with ``transformer/``).
Artifact directories are the artifact module's business: ``compress.load_model`` (``compress.sources``)
accepts those too. Every failure becomes a ``DitCompressError`` that names the file and what is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import ADAPTERS, adapter_for_architecture, get_adapter
from compress.models.dit import DIT_CONFIGS, DiT, DiTConfig
from compress.models.provenance import file_sha256, stamp_source
from compress.models.weights import first_line, load_state_dict_strict, read_state_dict

# Official head counts by width (heads cannot be read off weight shapes; every published DiT of a given
# width has the same head count, so these widths are unambiguous).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Real-size diffusers architectures for speed work (random weights; latency does not depend on values).
# PixArt-XL/2 at 256 / 512 / 1024 / 2048 px: 256 / 1,024 / 4,096 / 16,384 image tokens (the latent is px / 8).
DIFFUSERS_PRESETS = {
    f"PixArt-XL/2-{px}": ("PixArtTransformer2DModel", dict(
        num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        sample_size=px // 8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False))
    for px in (256, 512, 1024, 2048)
}


def load_checkpoint(source: str | Path, *, num_heads: int | None = None) -> nn.Module:
    """Load a DiT from a name, a checkpoint file or a diffusers directory; returns the module in eval mode."""
    from compress.models.reference import REFERENCE_CFG, REFERENCE_STEPS, REFERENCES

    src = str(source)
    if src in REFERENCES:
        config, weights = REFERENCES[src]
        if not weights.is_file():
            raise DitCompressError(f"{src}: its bundled weights ({weights}) are missing from this installation.")
        model = _load_native_file(weights, config)
        stamp_source(model, src, file_sha256(weights))
        adapter = get_adapter(model)
        adapter.set_contract(adapter.default_contract().with_overrides(steps=REFERENCE_STEPS,
                                                                      guidance_scale=REFERENCE_CFG))
    elif src.removeprefix("preset:") in DIT_CONFIGS:
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
                f".safetensors / .pt checkpoint, a diffusers model directory or an artifact directory."
            )
        if path.is_dir():
            if (path / "manifest.json").exists():
                raise DitCompressError(f"{path}: a dit-compress artifact; load it with compress.load_model or "
                                       f"compress.load.")
            if (path / "export.json").exists() or (path / "engine.json").exists():
                raise DitCompressError(f"{path}: an exported engine, not a PyTorch model; pass it to 'dit-compress "
                                       f"bench' or 'sample', or load the artifact it was exported from.")
            model = _load_diffusers_dir(path)
            weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")]
            stamp_source(model, str(path), file_sha256(*weights) if weights else None)
        else:
            model = _load_native_file(path, None, num_heads)
            stamp_source(model, str(path), file_sha256(path))
    get_adapter(model)  # records the architecture before anything edits the model
    return model.eval()


# ---- native DiT files ---------------------------------------------------------------------------
def infer_dit_config(sd: dict[str, torch.Tensor], path: Path, num_heads: int | None = None) -> DiTConfig:
    """Recover a DiTConfig from an official state dict's shapes; the head count only where it is unambiguous."""
    required = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "t_embedder.mlp.0.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise DitCompressError(
            f"{path}: not a DiT checkpoint in the official layout; missing keys {missing} "
            f"(found e.g. {sorted(sd)[:5]})."
        )
    w = sd["x_embedder.proj.weight"]
    if w.dim() != 4 or sd["pos_embed"].dim() != 3:
        raise DitCompressError(f"{path}: x_embedder.proj.weight / pos_embed have shapes {tuple(w.shape)} / "
                               f"{tuple(sd['pos_embed'].shape)}; not the official DiT layout.")
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    table = sd.get("y_embedder.embedding_table.weight")
    mlp = sd.get("blocks.0.mlp.fc1.weight")
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise DitCompressError(
            f"{path}: hidden size {hidden} is not a published DiT width, so the number of attention heads cannot be "
            f"read off the weights (a wrong guess gives silently wrong outputs). Save the checkpoint with its config "
            f"(safetensors metadata 'dit_config', as dit-compress writes it) or put the DiTConfig fields in "
            f"{path.with_suffix('.json').name} beside it, e.g. {{\"num_heads\": 8}}.")
    if hidden % heads:
        raise DitCompressError(f"{path}: hidden size {hidden} is not divisible by {heads} heads.")
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=(mlp.shape[0] / hidden) if mlp is not None else 4.0,
        class_dropout_prob=0.1, num_classes=(table.shape[0] - 1) if table is not None else 1000,
        learn_sigma=out == 2 * in_ch,
    )


def _config_from(fields: object, where: str) -> DiTConfig:
    """A DiTConfig from recorded fields (metadata or a sidecar file), checked like an artifact's architecture."""
    from compress.models.adapters.native import NativeDiTAdapter

    if not isinstance(fields, dict):
        raise DitCompressError(f"{where}: expected a JSON object of DiTConfig fields, found {type(fields).__name__}.")
    try:
        NativeDiTAdapter.check_architecture({"class": "DiT", "config": fields})
    except ValueError as e:
        raise DitCompressError(f"{where}: {str(e).replace('architecture.config', 'dit_config')}.") from None
    return DiTConfig(**fields)


def _sidecar_config(path: Path, sd: dict[str, torch.Tensor], num_heads: int | None) -> DiTConfig | None:
    """``NAME.json`` beside the checkpoint: DiTConfig fields overriding what the shapes say."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        fields = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DitCompressError(f"{side}: not valid JSON ({e}).") from None
    if not isinstance(fields, dict):
        raise DitCompressError(f"{side}: expected a JSON object of DiTConfig fields.")
    base = infer_dit_config(sd, path, num_heads or fields.get("num_heads") or 1).to_dict()
    return _config_from({**base, **fields}, str(side))


def _load_native_file(path: Path, config: DiTConfig | None, num_heads: int | None = None) -> DiT:
    sd, meta = read_state_dict(path)
    if config is None and "dit_config" in meta:
        try:
            fields = json.loads(meta["dit_config"])
        except json.JSONDecodeError as e:
            raise DitCompressError(f"{path}: its 'dit_config' metadata is not valid JSON ({e}).") from None
        config = _config_from(fields, f"{path}: metadata 'dit_config'")
    config = config or _sidecar_config(path, sd, num_heads) or infer_dit_config(sd, path, num_heads)
    model = DiT(config)
    load_state_dict_strict(model, sd, path)
    return model


# ---- diffusers ----------------------------------------------------------------------------------
def diffusers_classes() -> list[str]:
    """Model classes some registered adapter serves (what a diffusers directory may hold)."""
    return [a.class_name for a in ADAPTERS if getattr(a, "class_name", "")]


def _load_diffusers_dir(path: Path) -> nn.Module:
    cfg_path = path / "config.json"
    if not cfg_path.exists() and (path / "transformer" / "config.json").exists():
        path, cfg_path = path / "transformer", path / "transformer" / "config.json"
    if not cfg_path.exists():
        raise DitCompressError(f"{path}: a directory without config.json or manifest.json; not a diffusers model, a "
                               f"pipeline directory or a dit-compress artifact.")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DitCompressError(f"{cfg_path}: invalid JSON ({e}).") from None
    cls_name = config.get("_class_name") if isinstance(config, dict) else None
    adapter = adapter_for_architecture({"class": cls_name})
    if adapter is None or not hasattr(adapter, "from_pretrained"):
        raise DitCompressError(f"{cfg_path}: model class {cls_name!r} is not supported; supported: "
                               f"{', '.join(diffusers_classes())}.")
    try:
        adapter.check_architecture({"class": cls_name, "config": {k: v for k, v in config.items()
                                                                   if not k.startswith("_")}})
    except ValueError as e:
        raise DitCompressError(f"{cfg_path}: {str(e).replace('architecture.config', 'config')}.") from None
    try:
        return adapter.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types; all mean "this directory does not load"
        raise DitCompressError(f"{path}: diffusers could not load this {cls_name}: {first_line(e)}") from None

