"""YAML recipe -> validated list of pass configs -> run them in order.

    name: int8-weights
    description: INT8 per-channel weight-only quantization of every block Linear.
    defaults: {seed: 0, device: cpu, calibration: {samples: 64, steps: 25}}
    passes:
      - pass: quantize
        weights: {dtype: int8}

Every error names the file, the pass (by position and name), the field and what was expected.
"""

from __future__ import annotations

import copy
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from torch import nn

from compress.errors import DitCompressError
from compress.models.provenance import provenance
from compress.passes import PASSES, CalibrationConfig, PassContext

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeDefaults(BaseModel):
    """Settings shared by every pass of a recipe."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="Seed for calibration noise, labels and any sampling.")
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

        name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Short identifier.")
        description: str = Field(..., min_length=1, description="One line: the trade-off this recipe makes.")
        defaults: RecipeDefaults = Field(default_factory=RecipeDefaults, description="Shared settings.")
        passes: list[PassUnion] = Field(..., min_length=1, description="Passes, applied in order.")

    return Recipe


def recipe_schema() -> dict:
    """JSON Schema for editors (``dit-compress recipes --schema``)."""
    return recipe_model().model_json_schema(by_alias=True)


def _describe(err: dict, data: dict) -> str:
    loc = list(err["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "passes" and isinstance(loc[1], int):
        idx = loc[1]
        item = data.get("passes", [])[idx] if isinstance(data.get("passes"), list) else None
        pname = item.get("pass") if isinstance(item, dict) else None
        where = f"pass #{idx + 1}" + (f" ('{pname}')" if pname else "")
        loc = loc[2:]
        if loc and loc[0] == pname:  # the union tag pydantic inserts
            loc = loc[1:]
    field = ".".join(str(p) for p in loc)
    typ, msg = err["type"], err["msg"]
    if typ == "union_tag_invalid":
        tag = err.get("input", {}).get("pass") if isinstance(err.get("input"), dict) else None
        return f"{where}: unknown pass {tag!r}; known passes: {', '.join(sorted(PASSES))}"
    if typ == "union_tag_not_found":
        return f"{where}: missing 'pass:' key naming the pass (one of {', '.join(sorted(PASSES))})"
    if typ == "extra_forbidden":
        return f"{where + ', ' if where else ''}field '{field}': unknown field (not part of this {'pass' if where else 'recipe'})"
    if typ == "value_error" and not field:  # a config validator: its message starts with the field it is about
        m = re.match(r"Value error, ([\w.]+): (.*)", msg, re.S)
        if m:
            field, msg = m.group(1), m.group(2)
            return f"{where + ', ' if where else ''}field '{field}': {msg}"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) and got is not None else ""
    return f"{where + ', ' if where else ''}field '{field or '<root>'}': {msg}{got_s}"


def parse_recipe(data, source: str = "<recipe>"):
    """Validate a recipe dict; errors name the source, pass, field and expectation."""
    if not isinstance(data, dict):
        raise DitCompressError(f"{source}: a recipe must be a YAML mapping with name, description and passes; "
                               f"found {type(data).__name__}.")
    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        problems = "; ".join(_describe(err, data) for err in e.errors())
        raise DitCompressError(f"{source}: invalid recipe: {problems}.") from None


def load_recipe(path: str | Path):
    """Read and validate a recipe YAML file (a bundled recipe may be named without its path)."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{path}.yaml").exists():
        p = RECIPES_DIR / f"{path}.yaml"
    if not p.is_file():
        raise DitCompressError(f"{p}: recipe file not found (bundled recipes: {', '.join(bundled_recipes())}).")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DitCompressError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', None) or e}.") from None
    except UnicodeDecodeError:
        raise DitCompressError(f"{p}: not a text file.") from None
    return parse_recipe(data, str(p))


def bundled_recipes() -> dict[str, str]:
    """Bundled recipe names -> one-line descriptions."""
    out = {}
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            out[f.stem] = load_recipe(f).description
        except DitCompressError as e:
            out[f.stem] = f"(invalid: {e})"
    return out


def state_bytes(model: nn.Module) -> int:
    """Bytes of everything a model's state dict holds (parameters and buffers, packed ones included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def with_defaults(recipe, **fields):
    """A copy of a parsed recipe with some ``defaults`` fields replaced (e.g. ``calibration=...``)."""
    return recipe.model_copy(update={"defaults": recipe.defaults.model_copy(update=fields)})


def apply_recipe(model: nn.Module, recipe, *, console: Console | None = None, show_progress: bool = True,
                 ctx: PassContext | None = None, workdir: str | Path | None = None, resume: bool = False) -> nn.Module:
    """Apply ``recipe`` (a path, a bundled name, a dict or a parsed Recipe) to a copy of ``model``.

    ``model`` itself is left untouched and serves as the frozen teacher. The result carries its
    provenance (source, recipe, per-pass log, structural edits) for ``compress.save``. A ``ctx`` passed in
    is shared across calls (its recorded calibration trajectories are reused) and its calibration settings
    take the place of the recipe's ``defaults.calibration``; a pass's own ``calibration`` still wins.
    Training passes checkpoint under ``workdir`` and, with ``resume``, continue from those checkpoints.
    """
    if isinstance(recipe, str | Path):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    provenance(model)  # make sure the source has a record before copying
    teacher = model.eval().requires_grad_(False)
    d = recipe.defaults
    student = copy.deepcopy(teacher).to(d.device)
    ctx = ctx or PassContext(teacher=teacher.to(d.device), calibration_config=d.calibration, device=d.device,
                             seed=d.seed, console=console, show_progress=show_progress)
    if workdir is not None:
        ctx.workdir, ctx.resume = Path(workdir), resume
    rec = provenance(student)
    rec["recipe"] = recipe.model_dump(mode="json", by_alias=True)
    for i, cfg in enumerate(recipe.passes):
        spec = PASSES[cfg.pass_]
        before_p, before_b = sum(p.numel() for p in student.parameters()), state_bytes(student)
        ctx.notes, ctx.pass_index = [], i
        t0 = time.perf_counter()
        student = spec.apply(student, cfg, ctx)
        student.eval()
        ctx.check_finite(student, f"#{i + 1} {cfg.pass_}")
        rec = provenance(student)
        rec["passes"].append({
            "pass": cfg.pass_, "config": cfg.model_dump(mode="json", by_alias=True),
            "params_before": before_p, "params_after": sum(p.numel() for p in student.parameters()),
            "bytes_before": before_b, "bytes_after": state_bytes(student),
            "seconds": round(time.perf_counter() - t0, 3), "notes": list(ctx.notes),
        })
    return student.requires_grad_(False)
