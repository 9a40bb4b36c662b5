"""Guards run between passes: a model whose outputs are not finite never goes further."""

from __future__ import annotations

import torch
from torch import nn

from compress.calibration import CalibrationSet
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter


@torch.no_grad()
def check_finite(model: nn.Module, what: str, rows: list[CalibrationSet] = (), seed: int = 0,
                 device: str = "cpu") -> None:
    """Run seeded inputs (and a few calibration rows) through ``model``; raise naming the first layer whose
    output is NaN/Inf. ``what`` says whose fault it would be ('the source model', "pass #2 'quantize'")."""
    adapter = get_adapter(model)
    contract = adapter.contract()
    gen = torch.Generator().manual_seed(seed)
    bad: list[str] = []

    def hook(name):
        def fn(_m, _i, out):
            if not bad and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                bad.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        x = torch.randn((2, *contract.latent_shape), generator=gen).to(device)
        cond = {k: v.to(device) for k, v in contract.example_cond(2, gen).items()}
        checks = [(x, torch.full((2,), t, device=device), cond, "seeded noise") for t in (50.0, 500.0, 950.0)]
        for calib in rows:  # and real calibration inputs across the trajectory
            r = calib.spread(8)
            checks.append((r.x.to(device), r.t.to(device), {k: v.to(device) for k, v in r.cond.items()},
                           "calibration inputs"))
        for xi, ti, ci, kind in checks:
            out = adapter.forward(xi, ti, ci)
            if not torch.isfinite(out).all():
                where = f"first at layer '{bad[0]}'" if bad else "in the final output"
                fix = ("The source checkpoint is corrupt or diverged; nothing was applied." if what == "the source model"
                       else "Exclude that layer from the pass or use a wider format for it.")
                raise DitCompressError(
                    f"{what} produced non-finite outputs (NaN/Inf) on {kind} at t={float(ti.reshape(-1)[0]):.0f}, "
                    f"{where}. {fix}")
    finally:
        for h in handles:
            h.remove()
