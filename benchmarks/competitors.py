"""Competing quantizers run on the same model, layers and calibration trajectories as dit-compress.

Benchmark-only dependencies (``pip install "dit-compress[compare]"``), imported lazily:

* NVIDIA ModelOpt (its fake quantization runs on the CPU; the import alone takes ~13 s);
* NNCF's PyTorch backend (SmoothQuant + fake quantizers). It compiles a small C++ extension on first use
  (minutes; ``TORCH_EXTENSIONS_DIR`` keeps it) and its result has no artifact form: a comparison, not a
  deliverable. NNCF's deployable path (OpenVINO) is the exporters' business.
"""

from __future__ import annotations

import copy
import os
import re

import torch
from torch import nn

from compress.models.adapters import get_adapter
from compress.passes import LayerSelection, PassContext
from compress.passes.base import select_block_linears


def modelopt_int8_smoothquant(model: nn.Module, ctx: PassContext) -> nn.Module:
    """ModelOpt's ``INT8_SMOOTHQUANT_CFG`` on the block Linears dit-compress quantizes (same layer set:
    embedders, adaLN modulation and the final layer are disabled), calibrated on ``ctx``'s rows."""
    import modelopt.torch.quantization as mtq

    q = copy.deepcopy(model).eval()
    chosen = set(select_block_linears(q, LayerSelection(), "modelopt"))
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    for name, mod in q.named_modules():
        if name and not list(mod.children()) and name not in chosen:  # every other leaf: LayerNorms, convs, ...
            cfg["quant_cfg"].append({"quantizer_name": f"{name}.*", "enable": False})
    adapter = get_adapter(q)
    calib = ctx.calibration.rows()

    def forward_loop(m):
        with torch.no_grad():
            for x, t, c in calib.batches(64):
                adapter.forward(x, t, c)

    q = mtq.quantize(q, cfg, forward_loop)
    n_on = sum(1 for n, m in q.named_modules() if n.endswith("input_quantizer") and getattr(m, "is_enabled", False))
    object.__setattr__(q, "_modelopt_enabled_input_quantizers", n_on)
    return q


def nncf_int8(model: nn.Module, ctx: PassContext, smoothing: bool = True) -> nn.Module:
    """NNCF's post-training INT8 quantization (``model_type=TRANSFORMER``) of the block Linears dit-compress's
    ``w8a8-int8`` quantizes, calibrated on ``ctx``'s rows. Native DiT family only."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # first-use compile exceeds NNCF's 60 s default
    import nncf

    q = copy.deepcopy(model).eval()
    adapter = get_adapter(q)
    if adapter.family != "dit":
        raise ValueError(f"the NNCF comparison is wired for native DiT models, not family '{adapter.family}'")
    names = select_block_linears(q, LayerSelection(), "nncf")
    calib = ctx.calibration.rows()
    dataset = nncf.Dataset(list(calib.batches(64)), lambda it: (it[0], it[1], it[2]["y"]))
    # NNCF's torch backend names a layer's nodes by its path *inside* the repeated block
    # ('adaLN_modulation/1/linear/<call index>'), so the selection is expressed per relative name.
    rel = {b.path: {n[len(b.path) + 1:] for n in names if n.startswith(b.path + ".")} for b in adapter.blocks()}
    keep = next(iter(rel.values()))
    others = {n for b in adapter.blocks() for n, m in b.module.named_modules() if isinstance(m, nn.Linear)} - keep
    patterns = [r"(.*/)?" + re.escape(n).replace(r"\.", "/") + r"/.*" for n in sorted(others)]
    patterns += [r".*embedder.*", r".*final_layer.*", r".*norm.*", r".*pos_embed.*",
                 r".*scaled_dot_product_attention.*"]  # dit-compress leaves attention matmuls in fp too
    advanced = None
    if not smoothing:
        advanced = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    return nncf.quantize(q, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib),
                         ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False),
                         advanced_parameters=advanced)
