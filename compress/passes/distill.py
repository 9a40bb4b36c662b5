"""Recovery distillation as a pass: train the (pruned, quantized...) model toward the frozen source."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from torch import nn

from compress.passes.base import PassContext, register_pass
from compress.training import Trainer, TrainingConfig


@register_pass("distill")
class DistillConfig(TrainingConfig):
    """Recovery distillation: output KD + masked feature KD + diffusion loss against the frozen source."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pass_: Literal["distill"] = Field("distill", alias="pass")


@DistillConfig.applies
def apply_distill(model: nn.Module, config: DistillConfig, ctx: PassContext) -> nn.Module:
    training = TrainingConfig.model_validate(config.model_dump(exclude={"pass_"}))
    return Trainer(model, ctx.teacher, training, ctx.run, ctx.calibration,
                   tag=f"pass{ctx.run.pass_index + 1}-distill").run()
