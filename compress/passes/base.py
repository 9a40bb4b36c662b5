"""What a pass is: a pydantic config (``extra="forbid"``, every field documented) and one apply function.

    @register_pass("weight_only")
    class WeightOnlyConfig(PassConfig): ...
    def apply(model, config, ctx) -> model

Passes are looked up by the recipe's ``pass:`` key. Shaped after torchao's ``quantize_(model,
Config())`` and llm-compressor's recipe modifiers.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Literal
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.errors import DitCompressError


class PassConfig(BaseModel):
    """Base of every pass config; subclasses add documented fields and a ``pass_`` literal tag."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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


def _match(name: str, pattern: str) -> bool:
    return bool(re.fullmatch(pattern[3:], name)) if pattern.startswith("re:") else fnmatch.fnmatchcase(name, pattern)


def select_block_linears(model: nn.Module, sel: LayerSelection, pass_name: str) -> list[str]:
    """Dotted names of the Linear layers inside transformer blocks that ``sel`` picks.

    Embedders and the final layer are outside the blocks and stay in high precision by design; adaLN
    modulation layers are skipped unless asked. A pattern that matches nothing is an error that names it.
    """
    from compress.models.adapters import get_adapter

    adapter = get_adapter(model)
    modulation = {id(m) for b in adapter.blocks() for m in b.modulation}
    candidates = []
    for b in adapter.blocks():
        for name, mod in b.module.named_modules():
            is_mod = id(mod) in modulation
            wanted = {"skip": not is_mod, "include": True, "only": is_mod}[sel.modulation]
            if isinstance(mod, nn.Linear) and wanted:
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
