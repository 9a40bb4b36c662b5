"""Distillation as a pass: one configuration surface for every objective the shared trainer runs.

- ``recovery`` (default): train a pruned / quantized model back toward the frozen source (output KD + masked
  feature KD + diffusion loss);
- ``guidance`` (Meng et al.): the student takes the guidance scale as an input and matches the source's
  classifier-free-guided output in one call: half the calls at any step count;
- ``progressive`` (Salimans & Ho): halve the step count repeatedly, each student matching two DDIM steps of
  its teacher in one;
- ``consistency`` (LCM): map any point of the source's (guided) ODE trajectory to its end, trained against
  an EMA target across skipped solver steps; multistep consistency sampling;
- ``dmd`` (DMD2): a few-step generator whose samples are pushed toward the source's distribution by the
  difference between the source's score and a fake score trained on the generator's own samples (two
  time-scale updates), optionally with a regression loss on source pairs and a GAN head; multi-step students
  train on their own earlier steps (backward simulation).

A few-step objective records the student's sampling contract (timesteps, solver, guidance input) in the
model, so ``sample``, ``bench``, export and later passes use it with no flags.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator
from torch import nn

from compress.distillation.settings import (ConsistencySettings, DMDSettings, GuidanceSettings, ProgressiveSettings,
                                            StepSchedule)
from compress.passes.base import PassContext, register_pass
from compress.distillation import distill_steps
from compress.training import Trainer, TrainingConfig

OBJECTIVES = ("recovery", "guidance", "progressive", "consistency", "dmd")
__all__ = ["DistillConfig", "GuidanceSettings", "StepSchedule", "ProgressiveSettings", "ConsistencySettings",
           "DMDSettings", "OBJECTIVES"]


@register_pass("distill")
class DistillConfig(TrainingConfig):
    """Distillation on the shared trainer: recovery, guidance, progressive, consistency or DMD (see module docs)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pass_: Literal["distill"] = Field("distill", alias="pass")
    objective: Literal["recovery", "guidance", "progressive", "consistency", "dmd"] = Field(
        "recovery", description="What is distilled (module docstring); 'loss' weights apply to 'recovery' only.")
    guidance: GuidanceSettings | None = Field(
        None, description="Guidance distillation settings (guidance objective, and optionally progressive / "
                          "consistency / dmd students that take the scale as an input).")
    student: StepSchedule | None = Field(None, description="The student's own sampling steps (progressive, "
                                                             "consistency, dmd).")
    progressive: ProgressiveSettings | None = Field(None, description="progressive: its rounds.")
    consistency: ConsistencySettings | None = Field(None, description="consistency: its solver and target.")
    dmd: DMDSettings | None = Field(None, description="dmd: fake score, regression, GAN, backward simulation.")

    @model_validator(mode="after")
    def _objective_fields(self):
        o = self.objective
        few_step = o in ("progressive", "consistency", "dmd")
        if few_step and self.student is None:
            raise ValueError(f"student: objective '{o}' needs the student's steps (student: {{steps: 4}})")
        if not few_step and self.student is not None:
            raise ValueError(f"student: only for the few-step objectives (progressive, consistency, dmd), not '{o}'")
        if o == "recovery" and self.guidance is not None:
            raise ValueError("guidance: not used by the recovery objective")
        for name in ("progressive", "consistency", "dmd"):
            if getattr(self, name) is not None and o != name:
                raise ValueError(f"{name}: settings for objective '{name}', but the objective is '{o}'")
        if o == "dmd" and self.dmd is None:
            raise ValueError("dmd: objective 'dmd' needs its settings, at least dmd.fake_lr_ratio")
        if o == "progressive":
            start = (self.progressive or ProgressiveSettings()).start_steps
            steps = self.student.steps
            if start <= steps or start % steps or (start // steps) & (start // steps - 1):
                raise ValueError(f"progressive.start_steps: {start} must be student.steps ({steps}) times a power of "
                                 f"two (each round halves the steps)")
            if self.student.timesteps is not None:
                raise ValueError("student.timesteps: progressive students take every other step of their teacher's "
                                 "evenly spaced grid; give steps only")
            if self.progressive is not None and self.progressive.one_step_timestep is not None and steps != 1:
                raise ValueError(f"progressive.one_step_timestep: only for one-step students (student.steps: 1), "
                                 f"not {steps} steps")
        return self

    def training(self) -> TrainingConfig:
        """The shared trainer's settings (everything but the objective's own)."""
        return TrainingConfig.model_validate(self.model_dump(include=set(TrainingConfig.model_fields)))


@DistillConfig.applies
def apply_distill(model: nn.Module, config: DistillConfig, ctx: PassContext) -> nn.Module:
    if config.objective == "recovery":
        return Trainer(model, ctx.teacher, config.training(), ctx.run, ctx.calibration,
                       tag=f"pass{ctx.run.pass_index + 1}-distill").run()
    return distill_steps(model, config, ctx)
