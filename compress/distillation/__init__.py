"""Few-step and guidance distillation on the shared trainer: one entry point per objective, one contract out.

``distill_steps(model, config, ctx)`` is what the ``distill`` pass calls for every objective but recovery.
It gives the student a guidance input when asked, runs the objective's trainer (a ``compress.training.Trainer``
subclass per objective, in this package), and records how the student must be sampled.
"""

from __future__ import annotations

from torch import nn

from compress.distillation.consistency import distill_consistency
from compress.distillation.dmd import distill_dmd
from compress.distillation.guidance import distill_guidance
from compress.distillation.progressive import distill_progressive
from compress.distillation.student import add_guidance_input, student_contract

__all__ = ["distill_steps", "add_guidance_input", "student_contract"]


def distill_steps(model: nn.Module, config, ctx) -> nn.Module:
    """Run a guidance / progressive / consistency / DMD objective on ``model`` (the pass's input, the student)."""
    run = {"guidance": distill_guidance, "progressive": distill_progressive, "consistency": distill_consistency,
           "dmd": distill_dmd}[config.objective]
    return run(model, config, ctx)
