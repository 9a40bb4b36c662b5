"""``backend: nncf`` of the quantize pass: NNCF's post-training INT8 quantization on the same layers and
the same calibration trajectories, so the two can be compared side by side.

NNCF's torch backend inserts its own fake-quantize hooks (and SmoothQuant multipliers) into the model;
the result runs and samples like any model but has no artifact form here, so saving it is refused.
NNCF compiles a small C++ extension on first use (minutes); ``TORCH_EXTENSIONS_DIR`` keeps it.
"""

from __future__ import annotations

import os
import re

from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter

UNSAVEABLE = "_dit_compress_unsaveable"


def apply_nncf(model: nn.Module, names: list[str], config, ctx) -> nn.Module:
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # first-use compile exceeds NNCF's 60 s default
    try:
        import nncf
    except ImportError:
        raise DitCompressError("pass 'quantize', field 'backend': 'nncf' needs NNCF "
                               "(pip install \"dit-compress[nncf]\").") from None
    adapter = get_adapter(model)
    if adapter.family != "dit":
        raise DitCompressError(f"pass 'quantize', field 'backend': 'nncf' is wired for native DiT models (the "
                               f"reference and official checkpoints), not family '{adapter.family}'.")
    calib = ctx.calibration(config.calibration)
    items = list(calib.batches(64))
    dataset = nncf.Dataset(items, lambda it: (it[0], it[1], it[2]["y"]))
    # NNCF's torch backend names a layer's nodes by its path *inside* the repeated block
    # ('adaLN_modulation/1/linear/<call index>'), so a selection can only be expressed per relative name.
    rel: dict[str, set[str]] = {}
    for b in adapter.blocks():
        rel[b.path] = {n[len(b.path) + 1:] for n in names if n.startswith(b.path + ".")}
    kinds = {frozenset(v) for v in rel.values()}
    if len(kinds) != 1:
        raise DitCompressError("pass 'quantize', field 'layers': backend 'nncf' needs the same layers chosen in "
                               "every block (NNCF names nodes by their path inside the block).")
    keep = next(iter(kinds))
    others = {n for b in adapter.blocks() for n, m in b.module.named_modules() if isinstance(m, nn.Linear)} - keep
    patterns = [r"(.*/)?" + re.escape(n).replace(r"\.", "/") + r"/.*" for n in sorted(others)]
    patterns += [r".*embedder.*", r".*final_layer.*", r".*norm.*", r".*pos_embed.*",
                 r".*scaled_dot_product_attention.*"]  # dit-compress leaves attention matmuls in fp too
    sq = config.smoothing
    params = nncf.AdvancedSmoothQuantParameters(matmul=-1) if sq is None else None
    advanced = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=params) if params else None
    with ctx.progress("NNCF post-training quantization", None):
        q = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                          ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False),
                          advanced_parameters=advanced)
    object.__setattr__(q, UNSAVEABLE, "quantized by NNCF (its fake-quantize hooks have no artifact form here); "
                                      "use backend: native to save")
    ctx.note(f"NNCF {nncf.__version__} PTQ (INT8, model_type TRANSFORMER, "
             f"SmoothQuant {'default' if sq else 'off'}) on {len(names)} Linear layers, {len(calib)} calibration rows")
    return q
