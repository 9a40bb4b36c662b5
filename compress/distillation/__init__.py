"""Few-step and guidance distillation on the shared trainer: one entry point per objective, one contract out.

``distill_steps(model, config, ctx)`` is what the ``distill`` pass calls for every objective but recovery.
It gives the student a guidance input when asked, runs the objective's trainer (a ``compress.training.Trainer``
subclass per objective, in this package), and records how the student must be sampled.
"""

from __future__ import annotations

from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.contract import ConditionSpec, SamplingContract
from compress.nn.guidance import GUIDANCE_INPUT, GuidanceEmbedding


def add_guidance_input(model: nn.Module, hidden: int, scale: float) -> None:
    """Give ``model`` a zero-initialised guidance-scale input (no-op if it has one): it still computes exactly
    what it did, until training teaches the embedding."""
    adapter = get_adapter(model)
    contract = adapter.contract()
    if contract.guidance_input is not None:
        return
    try:
        embedders = adapter.conditioning_embedders()
    except NotImplementedError:
        raise DitCompressError(f"pass 'distill', field 'guidance.input': the {adapter.family} adapter does not say "
                               f"where its timestep embedding is, so the guidance scale cannot become an input; set "
                               f"guidance.input: false.") from None
    for path, dim in embedders:
        adapter.wrap(path, GuidanceEmbedding(dim, hidden))
    conds = [*contract.conditions, ConditionSpec(name=GUIDANCE_INPUT, kind="scalar", value=scale, null="same")]
    adapter.set_contract(contract.model_copy(update={"conditions": conds, "guidance_input": GUIDANCE_INPUT,
                                                     "guidance_scale": scale}))


def student_contract(source: SamplingContract, student: nn.Module, *, timesteps: list[float] | None,
                     sampler: str | None, scale: float, guidance_input: bool) -> SamplingContract:
    """How a distilled student is sampled: its own timesteps and solver, guidance as an input or baked in."""
    c = get_adapter(student).contract()
    update: dict = {"guidance_scale": scale if guidance_input else 1.0}
    if not guidance_input:
        update.update(guidance_input=None, conditions=[x for x in c.conditions if x.name != GUIDANCE_INPUT],
                      guidance_baked=scale)
    if timesteps is not None:
        update.update(timesteps=list(timesteps), steps=len(timesteps), sampler=sampler, eta=0.0)
    return c.model_copy(update=update)


def distill_steps(model: nn.Module, config, ctx) -> nn.Module:
    """Run a guidance / progressive / consistency / DMD objective on ``model`` (the pass's input, the student)."""
    from compress.distillation.consistency import distill_consistency
    from compress.distillation.dmd import distill_dmd
    from compress.distillation.guidance import distill_guidance
    from compress.distillation.progressive import distill_progressive

    run = {"guidance": distill_guidance, "progressive": distill_progressive, "consistency": distill_consistency,
           "dmd": distill_dmd}[config.objective]
    return run(model, config, ctx)
