"""The sampling contract: everything needed to sample a denoiser, carried by every model, artifact and export.

A contract says what the denoiser's inputs are (latent shape, each condition tensor and how its
unconditional form is made), what it predicts, and how it must be sampled (scheduler, step count,
guidance). ``sample``, ``bench``, calibration recording and every runner read it instead of flags, so an
exported model samples correctly without its PyTorch source, and a distilled student is sampled the
way it was trained.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import DitCompressError
from compress.models.cache_policy import CachePolicy

Cond = dict[str, torch.Tensor]


class ConditionSpec(BaseModel):
    """One condition tensor of the denoiser (besides latent and timestep)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Input name, e.g. 'y' (class labels) or 'encoder_hidden_states'.")
    kind: Literal["label", "embedding", "scalar"] = Field(
        ..., description="'label': int64 class indices; 'embedding': float tensor per sample (text embeddings); "
                         "'scalar': one float per sample (e.g. an embedded guidance scale).")
    shape: list[int] = Field(default_factory=list, description="Per-sample shape (embeddings), [] otherwise.")
    num_classes: int | None = Field(None, ge=1, description="label: classes 0..num_classes-1.")
    null: Literal["null_label", "zeros", "same"] = Field(
        "same", description="The unconditional branch: 'null_label' (index num_classes), 'zeros', or 'same'.")
    value: float | None = Field(None, description="scalar: the value every sample gets unless set otherwise.")


class SamplingContract(BaseModel):
    """How a denoiser is called and sampled (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    family: str = Field(..., description="Adapter family the denoiser came from (informational for exports).")
    prediction: Literal["epsilon", "flow"] = Field(..., description="What the denoiser predicts.")
    latent_shape: list[int] = Field(..., min_length=1, description="Per-sample latent shape.")
    conditions: list[ConditionSpec] = Field(default_factory=list, description="Condition inputs, in input order.")
    sampler: str = Field("default", description="Scheduler: ddim | dpm | unipc | ddpm | tcd | lcm (epsilon), euler | "
                                                "flow-lcm (flow); 'default' is ddim / euler. tcd with eta 0 is "
                                                "deterministic DDIM on any timesteps, lcm / flow-lcm multistep "
                                                "consistency sampling (re-noising between steps).")
    steps: int = Field(50, ge=1, le=10_000, description="Sampling steps.")
    timesteps: list[float] | None = Field(
        None, description="An explicit, descending schedule in [0, 1000) that a distilled student was trained on "
                          "(len = steps); None: the scheduler's own spacing for 'steps'.")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="tcd: 0 deterministic, 1 full re-noising between steps.")
    guidance_scale: float = Field(1.0, ge=0.0, le=100.0, description="Classifier-free guidance scale (1 = no "
                                                                     "unconditional branch), or the value fed to "
                                                                     "'guidance_input'.")
    guidance_input: str | None = Field(
        None, description="Guidance baked into the denoiser: the scalar condition that takes the guidance scale. "
                          "One call per step, no unconditional branch.")
    guidance_baked: float | None = Field(
        None, description="A distilled student with this guidance scale trained in: it samples without guidance and "
                          "has no guidance input (informational; distillation uses it as a teacher as it is).")
    cache: CachePolicy | None = Field(None, description="Step-cache policy every sampler and runner applies (None: "
                                                        "off); see compress.models.cache_policy.")

    @model_validator(mode="after")
    def _schedule(self):
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) != self.steps:
                raise ValueError(f"timesteps: {len(ts)} timesteps for {self.steps} steps")
            if any(not 0 <= t < 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError("timesteps: must be strictly descending, in [0, 1000)")
        if self.guidance_input is not None and self.guidance_input not in {c.name for c in self.conditions}:
            raise ValueError(f"guidance_input: {self.guidance_input!r} is not one of the conditions")
        if self.cache is not None:
            try:
                self.cache.check_schedule(self.steps)
            except ValueError as e:
                raise ValueError(f"cache.{e}") from None
        return self

    # -- conditions ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        labels = [c for c in self.conditions if c.kind == "label"]
        return labels[0].num_classes if labels else None

    def example_cond(self, batch: int, generator: torch.Generator | None = None,
                     labels: torch.Tensor | None = None) -> Cond:
        """Seeded conditions of the right shapes: the given (or random) labels, random embeddings."""
        out: Cond = {}
        for c in self.conditions:
            if c.kind == "label":
                out[c.name] = (labels.long() if labels is not None
                               else torch.randint(0, c.num_classes or 1, (batch,), generator=generator))
            elif c.kind == "embedding":
                out[c.name] = torch.randn((batch, *c.shape), generator=generator)
            else:
                value = self.guidance_scale if c.name == self.guidance_input else c.value
                out[c.name] = torch.full((batch,), float(value if value is not None else 0.0))
        return out

    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional branch of ``cond`` for classifier-free guidance."""
        specs = {c.name: c for c in self.conditions}
        out: Cond = {}
        for k, v in cond.items():
            how = specs[k].null if k in specs else "same"
            if how == "null_label":
                out[k] = torch.full_like(v, specs[k].num_classes)
            elif how == "zeros":
                out[k] = torch.zeros_like(v)
            else:
                out[k] = v
        return out

    @property
    def guided(self) -> bool:
        """True when sampling batches a conditional and an unconditional branch (two evaluations per step)."""
        return self.guidance_scale != 1.0 and self.guidance_input is None

    @property
    def nfe(self) -> int:
        """Transformer evaluations per image."""
        return self.steps * (2 if self.guided else 1)

    @property
    def fixed(self) -> bool:
        """A distilled student's schedule: trained for its own timesteps and solver, which overrides cannot change."""
        return self.timesteps is not None

    def with_overrides(self, *, steps: int | None = None, guidance_scale: float | None = None,
                       sampler: str | None = None, strict: bool = True) -> "SamplingContract":
        """A copy with the given sampling settings replaced (None keeps the contract's).

        A fixed (distilled) schedule keeps its steps and sampler: with ``strict`` asking to change them is an
        error, otherwise the request is ignored. The guidance scale stays adjustable either way.
        """
        if self.fixed and ((steps is not None and steps != self.steps) or (sampler is not None and
                                                                            sampler != self.sampler)):
            if strict:
                raise DitCompressError(f"this model is a distilled student that samples with its own {self.steps} "
                                       f"{self.sampler} steps ({self.timesteps}); its steps and sampler cannot be "
                                       f"changed (leave --steps / --sampler out).")
            steps = sampler = None
        update = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale), ("sampler", sampler))
                  if v is not None}
        if self.fixed:
            update.pop("steps", None)
        return self.model_copy(update=update) if update else self
