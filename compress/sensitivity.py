"""Per-layer quantization sensitivity and a mixed-precision plan under a size budget.

For every candidate format (a bundled or user quantization recipe) each block Linear is quantized
*alone* in the full-precision model, and the relative error of the whole denoiser's output on
calibration inputs (the source's trajectories, both CFG branches) is measured. A greedy knapsack then
starts from the smallest format everywhere and upgrades the layers that buy the most error per
extra byte until the budget is spent. The plan is written as an ordinary recipe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.size import state_bytes
from compress.passes import CalibrationConfig, PassContext
from compress.recipe import apply_recipe, load_recipe

FULL = "fp32"


@dataclass
class Sensitivity:
    layers: list[str]
    formats: list[str]  # recipe names, FULL first
    error: dict[str, dict[str, float]]  # layer -> format -> relative output MSE of the whole model
    size: dict[str, dict[str, int]]  # layer -> format -> bytes
    fixed_bytes: int  # everything that is not a candidate layer
    pass_configs: dict[str, dict] = field(default_factory=dict)  # format -> quantize pass (without layers)

    def plan_size(self, plan: dict[str, str]) -> int:
        return self.fixed_bytes + sum(self.size[n][f] for n, f in plan.items())

    def uniform(self, fmt: str) -> dict[str, str]:
        return {n: fmt for n in self.layers}

    def plan(self, budget_bytes: int) -> dict[str, str]:
        """Greedy error-per-byte upgrades from the smallest format; raises if even that does not fit."""
        order = sorted(self.formats, key=lambda f: sum(self.size[n][f] for n in self.layers))
        plan = {n: order[0] for n in self.layers}
        if self.plan_size(plan) > budget_bytes:
            raise DitCompressError(
                f"sensitivity: budget {budget_bytes / 1e6:.3f} MB is below the smallest plan "
                f"({order[0]} everywhere, {self.plan_size(plan) / 1e6:.3f} MB).")
        while True:
            room = budget_bytes - self.plan_size(plan)
            best, best_gain = None, 0.0
            for n in self.layers:
                cur = plan[n]
                for f in self.formats:
                    extra = self.size[n][f] - self.size[n][cur]
                    gain = self.error[n][cur] - self.error[n][f]
                    if extra <= room and gain > 0 and extra > 0 and gain / extra > best_gain:
                        best, best_gain = (n, f), gain / extra
            if best is None:
                return plan
            plan[best[0]] = best[1]

    def recipe(self, plan: dict[str, str], name: str, description: str) -> dict:
        """A recipe with one quantize pass per format used (layers listed by exact name)."""
        passes = []
        for f in self.formats:
            names = [n for n in self.layers if plan[n] == f]
            if f != FULL and names:
                passes.append({**self.pass_configs[f], "layers": {"include": names}})
        return {"name": name, "description": description, "passes": passes}


@torch.no_grad()
def measure_sensitivity(model: nn.Module, formats: list[str], *, calibration: CalibrationConfig | None = None,
                        eval_rows: int = 64, seed: int = 0, console=None) -> Sensitivity:
    """Quantize each block Linear alone in every format of ``formats`` (recipe names or paths)."""
    ctx = PassContext.for_model(model, calibration or CalibrationConfig(), seed=seed, console=console,
                                show_progress=console is not None)
    quantized, pass_configs = {}, {}
    for f in formats:
        r = load_recipe(f)
        if len(r.passes) != 1 or r.passes[0].pass_ != "quantize":
            raise DitCompressError(f"sensitivity: format {f!r} must be a recipe with exactly one 'quantize' pass.")
        cfg = {"pass": "quantize", **r.passes[0].model_dump(by_alias=True, exclude={"layers", "pass_"},
                                                             exclude_defaults=True)}
        pass_configs[f] = cfg
        quantized[f] = apply_recipe(model, r, ctx=ctx, show_progress=console is not None, console=console)
    # the layers every format touched
    layers = [n for n, m in quantized[formats[0]].named_modules()
              if n and all(type(q.get_submodule(n)) is not type(model.get_submodule(n)) for q in quantized.values())
              and isinstance(model.get_submodule(n), nn.Linear)]
    if not layers:
        raise DitCompressError("sensitivity: the formats quantize no common layer.")
    work = copy.deepcopy(model).eval()
    adapter = get_adapter(work)
    rows = ctx.calibration.rows().spread(eval_rows)
    x, t, cond = rows.x, rows.t, rows.cond
    ref = adapter.forward(x, t, cond)
    denom = ref.pow(2).mean().clamp_min(1e-20)
    error = {n: {FULL: 0.0} for n in layers}
    size = {n: {FULL: state_bytes(model.get_submodule(n))} for n in layers}
    with ctx.run.progress("measuring per-layer sensitivity", len(layers) * len(formats)) as advance:
        for n in layers:
            orig = work.get_submodule(n)
            parent, _, attr = n.rpartition(".")
            for f in formats:
                qmod = quantized[f].get_submodule(n)
                setattr(work.get_submodule(parent), attr, qmod)
                error[n][f] = float((adapter.forward(x, t, cond) - ref).pow(2).mean() / denom)
                size[n][f] = state_bytes(qmod)
                advance()
            setattr(work.get_submodule(parent), attr, orig)
    fixed = state_bytes(model) - sum(size[n][FULL] for n in layers)
    return Sensitivity(layers, [FULL, *formats], error, size, fixed, pass_configs)


def write_recipe(data: dict, path: str | Path) -> Path:
    """Atomic write of a recipe YAML."""
    from compress.io import atomic_write_text

    p = Path(path)
    atomic_write_text(p, yaml.safe_dump(data, sort_keys=False))
    return p
