"""The few-step objectives' own settings (nested sections of the ``distill`` pass config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GuidanceSettings(_Strict):
    """How classifier-free guidance is distilled."""

    input: bool = Field(True, description="The student takes the guidance scale as an input (a zero-initialised "
                                          "embedding added to its timestep embedding). False: one fixed scale is "
                                          "baked in and the student samples without guidance.")
    scale: float | None = Field(None, ge=1, le=50, description="The scale recorded in the student's contract (its "
                                                               "default at sampling), and the fixed scale when "
                                                               "input is false. Default: the source's.")
    range: tuple[float, float] | None = Field(
        None, description="Scales drawn uniformly in training when input is true (default: [1, 2 x scale]).")
    hidden: int = Field(256, ge=8, le=4096, description="Width of the guidance embedding's MLP.")

    @model_validator(mode="after")
    def _check(self):
        if self.range is not None:
            lo, hi = self.range
            if lo < 1 or hi < lo:
                raise ValueError(f"range: guidance scales must be >= 1 and ordered (low, high); got {list(self.range)}")
            if not self.input:
                raise ValueError("range: only used when the student takes the scale as an input (input: true)")
        return self


class StepSchedule(_Strict):
    """The student's own sampling schedule."""

    steps: int = Field(..., ge=1, le=256, description="Transformer calls per image the student samples with.")
    timesteps: list[float] | None = Field(
        None, description="Explicit descending timesteps in [0, 1000) (len = steps); default: evenly spaced from 999 "
                          "(the first is pure noise) or, for consistency, points of its solver grid.")

    @model_validator(mode="after")
    def _check(self):
        ts = self.timesteps
        if ts is not None:
            if len(ts) != self.steps:
                raise ValueError(f"timesteps: {len(ts)} timesteps for {self.steps} steps")
            if any(not 0 <= t < 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError("timesteps: must be strictly descending and in [0, 1000)")
        return self


class ProgressiveSettings(_Strict):
    """Progressive distillation rounds."""

    start_steps: int = Field(64, ge=2, le=1024, description="DDIM steps of the first teacher; every round halves them "
                                                            "until student.steps (start_steps = steps x 2^rounds). "
                                                            "'steps' (the trainer's) are optimiser steps per round.")
    one_step_timestep: float | None = Field(
        None, gt=0, lt=1000,
        description="One-step students of an epsilon source: the timestep label of the single call on pure noise, "
                    "whose (signal, noise) coefficients turn its epsilon output into the image (DMD2's "
                    "'conditioning timestep'); the last round trains the call at it, and the contract samples at it. "
                    "At 999 the image is (x - 0.99998 eps) / 0.0064 on the DiT schedule, which amplifies every output "
                    "error ~150x; at 399 the factor is 2. None: 999, the first point of the grid.")


class ConsistencySettings(_Strict):
    """Latent-consistency distillation."""

    solver_steps: int = Field(50, ge=2, le=1000, description="The source's DDIM grid the consistency loss skips "
                                                             "along: each training pair is one solver step apart.")
    target_ema: float = Field(0.95, ge=0, lt=1, description="EMA decay of the target network.")
    huber_c: float = Field(0.001, gt=0, description="Pseudo-Huber loss constant.")


class DMDSettings(_Strict):
    """Distribution-matching distillation (DMD2)."""

    fake_lr_ratio: float = Field(..., gt=0, le=100, description="Learning rate of the fake score as a multiple of the "
                                                                "generator's 'lr' (required: it sets the two "
                                                                "time-scale balance).")
    fake_updates: int = Field(5, ge=1, le=100, description="Fake-score updates per generator update.")
    t_range: tuple[float, float] = Field((20.0, 980.0), description="Timesteps the distribution-matching gradient is "
                                                                    "taken at.")
    regression: float = Field(0.0, ge=0, description="Weight of the regression loss on (noise, source sample) pairs "
                                                     "(DMD's; 0: off).")
    regression_pairs: int = Field(512, ge=1, le=1_000_000, description="Source samples generated for the regression "
                                                                       "loss (with the source's own contract).")
    gan: float = Field(0.0, ge=0, description="Weight of the GAN loss of a classifier on the fake score's middle-block "
                                              "features (DMD2's; 0: off).")
    backward_simulation: bool = Field(True, description="Multi-step students: train each step on inputs produced "
                                                        "by the student's own earlier steps, as sampling does.")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.t_range
        if not 0 <= lo < hi < 1000:
            raise ValueError(f"t_range: need 0 <= low < high < 1000, got {list(self.t_range)}")
        return self
