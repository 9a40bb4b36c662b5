"""Competing quantizers run on the same model and the same calibration trajectories as dit-compress.

NVIDIA ModelOpt (``pip install nvidia-modelopt``; its fake quantization runs on the CPU) is a benchmark-only
dependency: import it lazily (the import alone takes ~13 s). NNCF is reached through the quantize
pass's ``backend: nncf`` (recipe ``w8a8-int8-nncf``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compress.passes import PassContext
from compress.passes.base import LayerSelection, select_block_linears


def modelopt_int8_smoothquant(model: nn.Module, ctx: PassContext) -> nn.Module:
    """ModelOpt's ``INT8_SMOOTHQUANT_CFG`` on the block Linears dit-compress quantizes (same layer set:
    embedders, adaLN modulation and the final layer are disabled), calibrated on ``ctx.calibration()``."""
    import modelopt.torch.quantization as mtq

    from compress.models.adapters import get_adapter

    q = copy.deepcopy(model).eval()
    chosen = set(select_block_linears(q, LayerSelection(), "modelopt"))
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    for name, mod in q.named_modules():
        if name and not list(mod.children()) and name not in chosen:  # every other leaf: LayerNorms, convs, ...
            cfg["quant_cfg"].append({"quantizer_name": f"{name}.*", "enable": False})
    adapter = get_adapter(q)
    calib = ctx.calibration()

    def forward_loop(m):
        with torch.no_grad():
            for x, t, c in calib.batches(64):
                adapter.forward(x, t, c)

    q = mtq.quantize(q, cfg, forward_loop)
    n_on = sum(1 for n, m in q.named_modules() if n.endswith("input_quantizer") and getattr(m, "is_enabled", False))
    object.__setattr__(q, "_modelopt_enabled_input_quantizers", n_on)
    return q
