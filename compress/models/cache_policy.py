"""The step-cache policy a sampling contract carries: which block outputs are reused or forecast, and when.

Consecutive sampling steps compute nearly the same features, so a policy lets some steps skip a range of
transformer blocks and take that range's output from earlier steps instead:

- ``fora``: every ``interval`` steps a full step; in between, every block is skipped and its residual
  (output minus input of the block range) from the last full step is added to the current input (FORA,
  at block granularity).
- ``delta_dit``: the same reuse on a stage-dependent range (Δ-DiT): the back ``delta_blocks`` blocks before
  step ``delta_boundary`` (outline stage), the front ``delta_blocks`` after it (detail stage).
- ``first_block``: the first ``probe_blocks`` blocks always run; the rest is skipped while the probe
  changes little (FirstBlockCache: the probe blocks' residual relative to the last full step, compared with
  ``threshold``; TeaCache: the block-0 attention input's (the modulated input's) step-to-step relative L1,
  rescaled by the ``rescale`` polynomial and accumulated until it reaches ``threshold``).
- ``taylorseer``: full steps every ``interval``; in between the range's output (``forecast: output``, as
  diffusers' TaylorSeer hooks on blocks) or its residual (``forecast: residual``) is extrapolated by a
  Taylor series of order ``order`` built from finite differences of the last full steps.

Every method computes the first ``warmup`` and the last ``cooldown`` steps in full and never skips more
than ``max_cached`` consecutive steps. Each guidance branch keeps its own decision state; a batched
call skips only when every branch may skip. Lives beside the contract (the bottom layer) so every
artifact, export and runner validates the same policy; ``compress.cache`` runs it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CacheMethod = Literal["fora", "delta_dit", "first_block", "taylorseer"]

# The fields each method reads (besides warmup, cooldown and max_cached, which every method reads).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "fora": ("interval", "phase"),
    "delta_dit": ("interval", "phase", "delta_blocks", "delta_boundary"),
    "first_block": ("threshold", "probe_blocks", "metric", "rescale"),
    "taylorseer": ("interval", "phase", "order", "forecast"),
}
# Method fields with a default when left out (the others must be given, or searched by calibration).
METHOD_DEFAULTS: dict[str, Any] = {"phase": 0, "probe_blocks": 1, "metric": "residual", "order": 1,
                                   "forecast": "output"}
REQUIRED: dict[str, tuple[str, ...]] = {"fora": ("interval",), "delta_dit": ("interval", "delta_blocks",
                                                                            "delta_boundary"),
                                        "first_block": ("threshold",), "taylorseer": ("interval",)}


class CacheSettings(BaseModel):
    """The tunable fields of a policy, all optional (a calibration search fills the ones left out)."""

    model_config = ConfigDict(extra="forbid")

    method: CacheMethod = Field(..., description="fora | delta_dit | first_block | taylorseer (see "
                                                 "compress.models.cache_policy).")
    interval: int | None = Field(None, ge=1, le=10_000, description="fora / delta_dit / taylorseer: a full step "
                                                                    "every `interval` steps after the warm-up "
                                                                    "(1: every step).")
    phase: int | None = Field(None, ge=0, le=10_000, description="fora / delta_dit / taylorseer: steps after the "
                                                                 "warm-up before the first full step of the interval "
                                                                 "pattern (0; diffusers' TaylorSeer uses 1).")
    warmup: int = Field(0, ge=0, le=10_000, description="The first `warmup` steps always run in full.")
    cooldown: int = Field(0, ge=0, le=10_000, description="The last `cooldown` steps always run in full.")
    max_cached: int | None = Field(None, ge=1, le=10_000, description="Cap on consecutive cached steps (None: no "
                                                                      "cap).")
    threshold: float | None = Field(None, ge=0.0, le=100.0, description="first_block: skip while the probe's change "
                                                                        "is at most this.")
    probe_blocks: int | None = Field(None, ge=1, le=10_000, description="first_block: leading blocks that always "
                                                                        "run and decide (1).")
    metric: Literal["residual", "modulated_input"] | None = Field(
        None, description="first_block: 'residual' (FirstBlockCache: relative mean-abs change of the probe blocks' "
                          "residual since the last full step) or 'modulated_input' (TeaCache: accumulated, rescaled "
                          "step-to-step relative L1 of block 0's attention input).")
    rescale: list[float] | None = Field(None, min_length=1, max_length=8,
                                        description="first_block with modulated_input: polynomial coefficients "
                                                    "(highest power first) mapping the raw distance to the output "
                                                    "change (TeaCache's rescaling; None: the identity).")
    order: int | None = Field(None, ge=0, le=2, description="taylorseer: Taylor order (1 or 2; 0 is plain reuse).")
    forecast: Literal["output", "residual"] | None = Field(
        None, description="taylorseer: extrapolate the block range's output (diffusers' block-level TaylorSeer) or "
                          "its residual added to the current input.")
    delta_blocks: int | None = Field(None, ge=1, le=10_000, description="delta_dit: blocks in the cached range.")
    delta_boundary: int | None = Field(None, ge=0, le=10_000, description="delta_dit: first step of the detail "
                                                                          "stage (front blocks cached from here on, "
                                                                          "back blocks before).")

    @model_validator(mode="after")
    def _fields_fit_method(self):
        bad = self.misplaced_fields()
        if bad:
            raise ValueError(f"{bad[0]}: does not apply to method {self.method!r} (it reads "
                             f"{', '.join(METHOD_FIELDS[self.method])}, warmup, cooldown, max_cached)")
        return self

    def misplaced_fields(self) -> list[str]:
        """Fields that were set but the method does not read."""
        own = set(METHOD_FIELDS[self.method])
        return [f for f in sorted(set(METHOD_FIELDS["delta_dit"]) | set(METHOD_FIELDS["first_block"])
                                  | set(METHOD_FIELDS["taylorseer"]))
                if f not in own and getattr(self, f) is not None]


class CachePolicy(CacheSettings):
    """A complete step-cache policy (see the module docstring); recorded in the sampling contract."""

    calibration: dict[str, Any] | None = Field(
        None, description="What the calibration search chose it for and predicted (target, skipped fraction, "
                          "error on the calibration samples); informational.")

    @model_validator(mode="after")
    def _complete(self):
        for f in REQUIRED[self.method]:
            if getattr(self, f) is None:
                raise ValueError(f"{f}: method {self.method!r} needs it")
        for f in METHOD_FIELDS[self.method]:
            if getattr(self, f) is None and f in METHOD_DEFAULTS:
                setattr(self, f, METHOD_DEFAULTS[f])
        if self.phase is not None and self.interval is not None and self.phase >= self.interval:
            raise ValueError(f"phase: {self.phase} must be below the interval ({self.interval})")
        if self.rescale is not None and self.metric != "modulated_input":
            raise ValueError("rescale: only the 'modulated_input' metric is rescaled")
        return self

    def check_schedule(self, steps: int, depth: int | None = None) -> None:
        """Raise ``ValueError`` naming the field if the policy cannot run on ``steps`` steps (and ``depth`` blocks)."""
        if self.interval is not None and self.interval > steps:
            raise ValueError(f"interval: {self.interval} is larger than the {steps} sampling steps (nothing would "
                             f"ever be cached)")
        if self.warmup + self.cooldown > steps:
            raise ValueError(f"warmup: warmup ({self.warmup}) + cooldown ({self.cooldown}) exceed the {steps} "
                             f"sampling steps")
        if self.delta_boundary is not None and self.delta_boundary > steps:
            raise ValueError(f"delta_boundary: step {self.delta_boundary} is past the {steps} sampling steps")
        if depth is not None and self.probe_blocks is not None and self.probe_blocks >= depth:
            raise ValueError(f"probe_blocks: {self.probe_blocks} of the model's {depth} blocks leaves none to cache")
        if depth is not None and self.delta_blocks is not None and self.delta_blocks > depth:
            raise ValueError(f"delta_blocks: {self.delta_blocks} blocks but the model has {depth}")
