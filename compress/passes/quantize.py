"""Post-training quantization of the Linear layers inside transformer blocks.

Weights are quantized round-to-nearest, per output channel or per group, symmetric or asymmetric,
and stored in their compact form (int8, or two int4 values per byte) with fp32 scales.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.nn.quant import WeightOnlyLinear
from compress.passes.base import LayerSelection, PassConfig, register_pass, select_block_linears


class WeightQuant(BaseModel):
    """Integer weight format."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["int8", "int4"] = Field("int8", description="Integer width of stored weights.")
    group_size: int | None = Field(
        None, ge=8, le=4096,
        description="Input channels sharing one scale (e.g. 32/64/128); None = one scale per output channel.")
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric (uint with zero point).")


@register_pass("quantize")
class QuantizeConfig(PassConfig):
    """Post-training quantization of transformer-block Linear layers (weights stored packed)."""

    pass_: Literal["quantize"] = Field("quantize", alias="pass")
    weights: WeightQuant = Field(default_factory=WeightQuant, description="Weight format.")
    layers: LayerSelection = Field(default_factory=LayerSelection,
                                   description="Which block Linear layers to quantize (embedders, adaLN and the "
                                               "final layer stay in full precision by default).")


@QuantizeConfig.applies
def apply_quantize(model: nn.Module, config: QuantizeConfig, ctx) -> nn.Module:
    adapter = get_adapter(model)
    names = select_block_linears(model, config.layers, "quantize")
    bits = 8 if config.weights.dtype == "int8" else 4
    g = config.weights.group_size
    with ctx.progress("quantizing weights", len(names)) as advance:
        for name in names:
            lin = model.get_submodule(name)
            if g and lin.in_features % g:
                raise DitCompressError(
                    f"pass 'quantize', field 'weights.group_size': {g} does not divide layer '{name}' "
                    f"(in_features={lin.in_features}); choose a divisor or exclude the layer."
                )
            adapter.replace(name, WeightOnlyLinear.from_linear(lin, bits, g, config.weights.symmetric))
            advance()
    ctx.note(f"{len(names)} Linear layers -> {config.weights.dtype} weights "
             f"({'group ' + str(g) if g else 'per channel'}, {'sym' if config.weights.symmetric else 'asym'})")
    return model
