"""Noise schedules, built on diffusers' schedulers so they match what users deploy with."""

from __future__ import annotations

# The DiT paper's training schedule: 1000 steps, linear betas 1e-4 -> 0.02.
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

SAMPLERS = ("ddim", "dpm", "ddpm", "euler")


def make_scheduler(kind: str, prediction: str = "epsilon"):
    """A fresh diffusers scheduler. ``prediction`` is 'epsilon' (DDPM-trained DiT/PixArt) or 'flow' (SD3/Flux).

    diffusers is imported here, not at module level: ``import compress`` stays fast for the CLI.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    if prediction == "flow":
        if kind not in ("euler", "default"):
            raise ValueError(f"flow-matching models sample with 'euler', not {kind!r}")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    if kind in ("ddim", "default"):
        return DDIMScheduler(**DIT_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    if kind == "dpm":
        return DPMSolverMultistepScheduler(**DIT_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    if kind == "ddpm":
        return DDPMScheduler(**DIT_SCHEDULE, clip_sample=False)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


def training_scheduler():
    """The forward-noising process used to train (and recover) epsilon-prediction models (a DDPMScheduler)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(**DIT_SCHEDULE, clip_sample=False)
