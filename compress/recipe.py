"""YAML recipe -> validated list of pass configs -> run them in order.

    name: int8-weights
    description: INT8 per-channel weight-only quantization of every block Linear.
    defaults: {seed: 0, device: cpu, calibration: {samples: 64, steps: 25}}
    passes:
      - pass: quantize
        weights: {dtype: int8}

Every error names the file, the pass (by position and name), the field and what was expected. Recipes
are read strictly (``compress.yamlio``): duplicate keys, booleans where numbers belong and pass orders
that cannot work are refused before any work starts.
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from torch import nn

from compress.checks import check_finite
from compress.errors import DitCompressError
from compress.io import WorkDir
from compress.models.provenance import provenance
from compress.models.size import param_count, state_bytes
from compress.models.adapters import get_adapter
from compress.passes import PASSES, CalibrationConfig, CalibrationSource, PassContext
from compress.yamlio import read_yaml, validate

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeDefaults(BaseModel):
    """Settings shared by every pass of a recipe."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for calibration noise, labels and any sampling.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="Where passes run.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="Calibration trajectories shared by all passes.")


@lru_cache(maxsize=1)
def recipe_model() -> type[BaseModel]:
    """The Recipe model, built from the registered passes (a tagged union on ``pass``)."""
    configs = tuple(spec.config for spec in PASSES.values())
    PassUnion = Annotated[Union[configs], Field(discriminator="pass_")]  # noqa: UP007

    class Recipe(BaseModel):
        """A named, ordered chain of compression passes."""

        model_config = ConfigDict(extra="forbid")

        name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200,
                          description="Short identifier.")
        description: str = Field(..., min_length=1, description="One line: the trade-off this recipe makes.")
        defaults: RecipeDefaults = Field(default_factory=RecipeDefaults, description="Shared settings.")
        passes: list[PassUnion] = Field(..., min_length=1, max_length=100, description="Passes, applied in order.")

        @model_validator(mode="after")
        def _order(self):
            quantized = None
            for i, p in enumerate(self.passes):
                if getattr(type(p), "changes_structure", False) and quantized is not None:
                    raise ValueError(
                        f"passes: pass #{i + 1} ('{p.pass_}') cannot run after pass #{quantized + 1} "
                        f"('{self.passes[quantized].pass_}'): pruning reshapes Linear layers, and the quantized "
                        f"layers that pass left are no longer Linear layers. Put pruning before quantization")
                if getattr(type(p), "replaces_linears", False) and quantized is None:
                    quantized = i
            return self

    return Recipe


def recipe_schema() -> dict:
    """JSON Schema for editors (``dit-compress recipes --schema``)."""
    return recipe_model().model_json_schema(by_alias=True)


def parse_recipe(data, source: str = "<recipe>"):
    """Validate a recipe dict; errors name the source, pass, field and expectation."""
    return validate(recipe_model(), data, source, "recipe", tags=sorted(PASSES))


def load_recipe(path: str | Path):
    """Read and validate a recipe YAML file (a bundled recipe may be named without its path)."""
    p = Path(path)
    if not p.exists() and "/" not in str(path) and (RECIPES_DIR / f"{path}.yaml").exists():
        p = RECIPES_DIR / f"{path}.yaml"
    if not p.is_file():
        raise DitCompressError(f"{p}: recipe file not found (bundled recipes: {', '.join(bundled_recipes())}).")
    return parse_recipe(read_yaml(p, "recipe"), str(p))


def bundled_recipes() -> dict[str, str]:
    """Bundled recipe names -> one-line descriptions."""
    out = {}
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            out[f.stem] = load_recipe(f).description
        except DitCompressError as e:
            out[f.stem] = f"(invalid: {e})"
    return out


def with_defaults(recipe, **fields):
    """A copy of a parsed recipe with some ``defaults`` fields replaced (e.g. ``calibration=...``)."""
    return recipe.model_copy(update={"defaults": recipe.defaults.model_copy(update=fields)})


def apply_recipe(model: nn.Module, recipe, *, console: Console | None = None, show_progress: bool = True,
                 ctx: PassContext | None = None, workdir: str | Path | WorkDir | None = None,
                 resume: bool = False) -> nn.Module:
    """Apply ``recipe`` (a path, a bundled name, a dict or a parsed Recipe) to a copy of ``model``.

    ``model`` itself is left untouched and serves as the frozen teacher; it is checked first (a source
    with NaN outputs is reported as such). The result carries its provenance (source, recipe, per-pass log,
    structural edits, sampling contract) for ``compress.save``. A ``ctx`` passed in is shared across calls
    (its recorded calibration trajectories are reused) and its calibration settings take the place of the
    recipe's ``defaults.calibration``; a pass's own ``calibration`` still wins. Training passes checkpoint
    under ``workdir`` and, with ``resume``, continue from those checkpoints.
    """
    if isinstance(recipe, str | Path):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    d = recipe.defaults
    if d.device.startswith("cuda") and not torch.cuda.is_available():
        raise DitCompressError(f"recipe '{recipe.name}', field 'defaults.device': {d.device!r} but this machine has "
                               f"no CUDA device; use 'cpu'.")
    provenance(model)  # make sure the source has a record before copying
    teacher = model.eval().requires_grad_(False).to(d.device)
    ctx = ctx or PassContext.for_model(teacher, d.calibration, seed=d.seed, device=d.device, console=console,
                                       show_progress=show_progress)
    if workdir is not None:
        ctx.run.workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
        ctx.run.resume = resume
    check_finite(teacher, "the source model", seed=ctx.run.seed, device=d.device)
    student = copy.deepcopy(teacher)
    rec = provenance(student)
    rec["recipe"] = recipe.model_dump(mode="json", by_alias=True)
    for i, cfg in enumerate(recipe.passes):
        spec = PASSES[cfg.pass_]
        before_p, before_b = param_count(student), state_bytes(student)
        ctx.run.notes, ctx.run.pass_index = [], i
        t0 = time.perf_counter()
        sampled = get_adapter(student).contract()
        student = spec.apply(student, cfg, ctx)
        student.eval()
        now = get_adapter(student).contract()
        if (now.timesteps, now.guidance_input, now.sampler) != (sampled.timesteps, sampled.guidance_input,
                                                                 sampled.sampler):
            # the model now samples differently: later passes calibrate along its own trajectories
            ctx.calibration = CalibrationSource(copy.deepcopy(student).requires_grad_(False), ctx.calibration.config,
                                                ctx.run)
        check_finite(student, f"pass #{i + 1} '{cfg.pass_}'", rows=list(ctx.calibration.cache.values()),
                     seed=ctx.run.seed, device=d.device)
        rec = provenance(student)
        rec["passes"].append({
            "pass": cfg.pass_, "config": cfg.model_dump(mode="json", by_alias=True),
            "params_before": before_p, "params_after": param_count(student),
            "bytes_before": before_b, "bytes_after": state_bytes(student),
            "seconds": round(time.perf_counter() - t0, 3), "notes": list(ctx.run.notes),
        })
    return student.requires_grad_(False)
