"""What distillation changes on the student itself: a guidance-scale input and its sampling contract."""

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
