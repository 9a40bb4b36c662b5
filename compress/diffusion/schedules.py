"""Noise schedules, built on diffusers' schedulers so they match what users deploy with."""

from __future__ import annotations

# The DiT paper's training schedule: 1000 steps, linear betas 1e-4 -> 0.02.
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

EPSILON_SAMPLERS = ("ddim", "dpm", "unipc", "ddpm", "tcd", "lcm")
FLOW_SAMPLERS = ("euler", "flow-lcm")
SAMPLERS = EPSILON_SAMPLERS + FLOW_SAMPLERS
# Samplers whose steps draw fresh noise (they take the sampler's generator).
STOCHASTIC = ("ddpm", "tcd", "lcm", "flow-lcm")
# Samplers that accept an explicit timestep list (distilled students' schedules).
CUSTOM_TIMESTEPS = ("dpm", "ddpm", "tcd", "lcm", "euler", "flow-lcm")


def make_scheduler(kind: str, prediction: str = "epsilon"):
    """A fresh diffusers scheduler. ``prediction`` is 'epsilon' (DDPM-trained DiT/PixArt) or 'flow' (SD3/Flux).

    diffusers is imported here, not at module level: ``import compress`` stays fast for the CLI.
    """
    import diffusers as d

    if prediction == "flow":
        if kind in ("euler", "default"):
            return d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        if kind == "flow-lcm":
            return d.FlowMatchLCMScheduler(num_train_timesteps=1000, shift=1.0)
        raise ValueError(f"flow-matching models sample with {' or '.join(FLOW_SAMPLERS)}, not {kind!r}")
    if kind in ("ddim", "default"):
        return d.DDIMScheduler(**DIT_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    if kind == "dpm":
        return d.DPMSolverMultistepScheduler(**DIT_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    if kind == "unipc":
        return d.UniPCMultistepScheduler(**DIT_SCHEDULE, solver_order=2)
    if kind == "ddpm":
        return d.DDPMScheduler(**DIT_SCHEDULE, clip_sample=False)
    if kind == "tcd":
        return d.TCDScheduler(**DIT_SCHEDULE, set_alpha_to_one=False, original_inference_steps=1000)
    if kind == "lcm":
        return d.LCMScheduler(**DIT_SCHEDULE, set_alpha_to_one=False, original_inference_steps=1000)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(EPSILON_SAMPLERS)}")


def set_schedule(sched, kind: str, prediction: str, steps: int, timesteps: list[float] | None) -> None:
    """``sched.set_timesteps`` for ``steps``, or for an explicit schedule (distilled students)."""
    if timesteps is None:
        sched.set_timesteps(steps)
        return
    if kind == "default":
        kind = "euler" if prediction == "flow" else "ddim"
    if kind not in CUSTOM_TIMESTEPS:
        raise ValueError(f"sampler {kind!r} cannot follow an explicit timestep schedule; use one of "
                         f"{', '.join(CUSTOM_TIMESTEPS)}")
    if prediction == "flow":
        sched.set_timesteps(sigmas=[t / 1000 for t in timesteps])
    else:
        sched.set_timesteps(timesteps=[int(round(t)) for t in timesteps])


def training_scheduler():
    """The forward-noising process used to train (and recover) epsilon-prediction models (a DDPMScheduler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DIT_SCHEDULE, clip_sample=False)
