"""Step caching as a pass: no weight changes, the result is a cache policy in the model's sampling contract.

    - pass: cache
      method: taylorseer          # fora | delta_dit | first_block | taylorseer
      calibrate: {target_speedup: 2.0}   # or {min_psnr: 30}; fields left out are searched

The policy (``compress.models.cache_policy``) is recorded with ``adapter.set_contract``, so ``compress.save``
writes it into the manifest and every sampler and runner applies it (``compress.cache``). Calibration runs
on the model the pass is applied to, along its own contract: after a quantization pass it calibrates the
quantized model, on a few-step student the student's schedule. A calibrated policy records what it
was chosen for in ``calibration``; the searched curve goes to the pass log (manifest ``passes[i].curve``
notes) and to ``provenance(model)["cache_search"]``.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from compress.cache import check_policy
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.cache_policy import CachePolicy, CacheSettings
from compress.models.provenance import provenance
from compress.passes.base import PassConfig, PassContext, register_pass
from compress.passes.cache_search import CalibrateConfig, _NoPolicy, search


@register_pass("cache")
class CacheConfig(PassConfig, CacheSettings):
    """Step caching: reuse or forecast block outputs across sampling steps (a policy, no weight change)."""

    pass_: Literal["cache"] = Field("cache", alias="pass")
    calibrate: CalibrateConfig | None = Field(
        None, description="Search the fields left out for a target speed-up or a quality floor, on the model's own "
                          "trajectories (None: the policy exactly as given).")

    @model_validator(mode="after")
    def _complete_unless_searched(self):
        if self.calibrate is None:
            try:
                self.policy()
            except ValueError as e:  # pydantic wraps the policy's message; keep its "field: why" form
                msg = str(e).split("\n")[1 if "\n" in str(e) else 0].strip()
                raise ValueError(msg.removeprefix("Value error, ") + " (or add 'calibrate' to search it)") from None
        return self

    def policy(self) -> CachePolicy:
        """The policy exactly as configured (no search)."""
        fields = self.model_dump(include=set(CacheSettings.model_fields), exclude_unset=True)
        return CachePolicy(**{**fields, "method": self.method})


def _block_views(model: nn.Module) -> int:
    adapter = get_adapter(model)
    try:
        views = adapter.blocks()
    except NotImplementedError:
        views = []
    if not views:
        raise DitCompressError(f"pass 'cache': the {adapter.family} adapter gives no transformer block views "
                               f"(blocks()), so there is nothing to skip or reuse; caching needs a family whose "
                               f"adapter lists its blocks.")
    return len(views)


@CacheConfig.applies
def apply_cache(model: nn.Module, config: CacheConfig, ctx: PassContext) -> nn.Module:
    depth = _block_views(model)
    adapter = get_adapter(model)
    contract = adapter.contract()
    if contract.cache is not None:
        raise DitCompressError(f"pass #{ctx.run.pass_index + 1} 'cache': the model already samples with a "
                               f"'{contract.cache.method}' cache policy; one recipe sets at most one.")
    curve = None
    if config.calibrate is None:
        policy = config.policy()
    else:
        goal = config.calibrate
        what = f"{goal.target_speedup:g}x" if goal.target_speedup is not None else f">= {goal.min_psnr:g} dB"
        with ctx.run.progress(f"calibrating the {config.method} cache policy ({what})", None) as advance:
            try:
                policy, curve = search(model.eval(), contract, config, goal, seed=ctx.run.seed, progress=advance)
            except _NoPolicy as e:
                provenance(model)["cache_search"] = e.curve
                config.nothing_to_do(ctx, f"{e}: caching does not pay on this model's {contract.steps}-step "
                                          f"schedule")
                return model
        provenance(model)["cache_search"] = curve
        cal = policy.calibration
        ctx.run.note(f"calibrated on {cal['samples']} samples of the model this pass was applied to "
                     f"({cal['steps']} steps, guidance {cal['guidance_scale']:g}): {cal['speedup']:.3g}x in block "
                     f"evaluations, {cal['psnr_db']:.2f} dB against its uncached samples, {cal['candidates']} "
                     f"candidates scored")
        ctx.run.note("searched curve: " + json.dumps(curve, separators=(",", ":")))
    check_policy(policy, contract.steps, depth)
    adapter.set_contract(contract.model_copy(update={"cache": policy}))
    ctx.run.note(f"policy: {policy.model_dump_json(exclude={'calibration'}, exclude_none=True)}")
    return model
