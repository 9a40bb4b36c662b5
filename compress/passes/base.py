"""What a pass is: a pydantic config (``extra="forbid"``, every field documented) and one apply function.

    @register_pass("weight_only")
    class WeightOnlyConfig(PassConfig):
        pass_: Literal["weight_only"] = Field("weight_only", alias="pass")
        ...

    @WeightOnlyConfig.applies
    def apply(model, config, ctx: PassContext) -> nn.Module: ...

Passes are looked up by the recipe's ``pass:`` key. Shaped after torchao's ``quantize_(model,
Config())`` and llm-compressor's recipe modifiers. A new pass is one file in this package (copy
``distill.py``) imported in ``__init__.py``, or a registration from anywhere before the recipe is read.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compress.calibration import CalibrationSource
from compress.context import RunContext
from compress.errors import DitCompressError


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add documented fields and a ``pass_`` literal tag.

    ``changes_structure``: the pass removes or reshapes Linear layers (pruning), so it cannot run after a
    pass that replaced those layers with quantized ones; the recipe is refused before any work.
    ``replaces_linears``: the pass swaps Linear layers for other modules (quantization).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    changes_structure: ClassVar[bool] = False
    replaces_linears: ClassVar[bool] = False

    allow_empty: bool = Field(
        False, description="A pass that finds nothing to do is an error (a recipe that silently does less than it "
                           "says); set true where that is expected, e.g. an adaLN-only pass on a family whose "
                           "adaLN lives outside the blocks.")

    def nothing_to_do(self, ctx: "PassContext", why: str) -> None:
        """Raise (or, with ``allow_empty``, note) that the pass found nothing to do, and why."""
        name = getattr(self, "pass_", type(self).__name__)
        if not self.allow_empty:
            raise DitCompressError(f"pass #{ctx.run.pass_index + 1} '{name}' has nothing to do: {why}. Fix the "
                                   f"recipe, or set 'allow_empty: true' on the pass if that is expected.")
        ctx.run.note(f"nothing to do ({why}); allowed by allow_empty")


@dataclass
class PassContext:
    """What a pass receives besides the model and its config.

    ``run``: device, seed, log, progress, work directory / resume. ``teacher``: the frozen source model
    (knowledge distillation targets). ``calibration``: whose sampling trajectories calibration rows come
    from (``ctx.calibration.rows(config)``).
    """

    run: RunContext
    teacher: nn.Module
    calibration: CalibrationSource

    @classmethod
    def for_model(cls, teacher: nn.Module, calibration: "CalibrationConfig | None" = None, *, seed: int = 0,
                  device: str = "cpu", console=None, show_progress: bool = True) -> "PassContext":
        """A context whose calibration rows come from ``teacher``'s own trajectories (recorded on first use).

        Passing the same context to several ``apply_recipe`` calls shares one recording between them.
        """
        from compress.calibration import CalibrationConfig

        run = RunContext(device=device, seed=seed, console=console, show_progress=show_progress)
        return cls(run, teacher, CalibrationSource(teacher, calibration or CalibrationConfig(), run))


class LayerSelection(BaseModel):
    """Which Linear layers a pass touches: glob patterns on dotted module names ('re:' for a regex)."""

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Patterns of layers to include (fnmatch globs like 'blocks.*.mlp.*', or 're:<regex>').",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Patterns of layers to leave alone, applied after include.",
    )
    modulation: Literal["skip", "include", "only"] = Field(
        "skip", description="adaLN modulation layers: 'skip' (default; they scale every activation, so they are "
                            "sensitive), 'include' them too, or touch 'only' them (e.g. INT8 weights for adaLN "
                            "beside INT4 blocks).")

    @field_validator("include", "exclude")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"pattern {p!r} is not a valid regular expression ({e})") from None
        return v


def _match(name: str, pattern: str) -> bool:
    return bool(re.fullmatch(pattern[3:], name)) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)


def select_block_linears(model: nn.Module, sel: LayerSelection, pass_name: str) -> list[str]:
    """Dotted names of the Linear layers inside transformer blocks that ``sel`` picks.

    Embedders and the final layer stay in high precision by design (outside the blocks, or inside as the
    block's ``embedders``); adaLN modulation layers are skipped unless asked. A pattern that matches nothing
    is an error that names it.
    """
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    modulation = {id(m) for b in adapter.blocks() for m in b.modulation}
    embedded = {id(m) for b in adapter.blocks() for e in b.embedders for m in e.modules()}
    candidates = []
    for b in adapter.blocks():
        for name, mod in b.module.named_modules():
            is_mod = id(mod) in modulation
            wanted = {"skip": not is_mod, "include": True, "only": is_mod}[sel.modulation]
            if isinstance(mod, nn.Linear) and wanted and id(mod) not in embedded:
                candidates.append(f"{b.path}.{name}")
    if not candidates and sel.include == ["*"] and not sel.exclude:
        return []  # e.g. modulation 'only' on PixArt, whose adaLN lives outside the blocks: nothing to do
    for field, patterns in (("include", sel.include), ("exclude", sel.exclude)):
        for p in patterns:
            if not any(_match(c, p) for c in candidates):
                raise DitCompressError(
                    f"pass '{pass_name}', field 'layers.{field}': pattern {p!r} matches no Linear layer in the "
                    f"transformer blocks (e.g. {', '.join(candidates[:3])})."
                )
    return [c for c in candidates if any(_match(c, p) for p in sel.include)
            and not any(_match(c, p) for p in sel.exclude)]


@dataclass
class PassSpec:
    name: str
    config: type[PassConfig]
    apply: Callable
    summary: str


PASSES: dict[str, PassSpec] = {}


def register_pass(name: str) -> Callable:
    """Class decorator for a config; the apply function is attached with ``@Config.applies``."""

    def deco(cfg_cls: type[PassConfig]):
        def applies(fn: Callable) -> Callable:
            doc = (cfg_cls.__doc__ or "").strip().splitlines()[0]
            PASSES[name] = PassSpec(name, cfg_cls, fn, doc)
            return fn

        cfg_cls.applies = staticmethod(applies)
        return cfg_cls

    return deco
