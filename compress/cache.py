"""Running a step-cache policy (``compress.models.cache_policy``) during one sampling run, in any runtime.

Three parts, so PyTorch and ONNX Runtime apply a policy identically:

- ``CacheEngine``: the decisions and stored features of one run, runtime-agnostic. Per step it names the
  block range ``[a, b)`` that may be skipped; at boundary ``a`` it decides (static schedule, or per guidance
  branch from the probe) and either forecasts the state at ``b`` from the stored features or, after the
  range ran, stores the new ones.
- ``TorchStepCache``: the denoiser call with every block's ``forward`` wrapped for the call (blocks come from
  the adapter's ``blocks()`` views, in execution order), so skipping costs no extra model pass.
- ``SegmentedStepCache``: the same engine over separately callable segments (embedding, block ranges,
  final layer): what a runner that cannot hook into a graph does (``exporters/onnx.py``), and what
  ``segment_modules`` builds in PyTorch for export.

A block "state" is the pair (image tokens, context tokens or None) at a boundary between blocks: the
input of block ``i``, or the output of the last block for boundary ``depth``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.models.adapters import Cond, ModelAdapter, get_adapter
from compress.models.cache_policy import CachePolicy
from compress.models.contract import SamplingContract

State = tuple[torch.Tensor, torch.Tensor | None]


# ---- block states, the same for every family ------------------------------------------------------
@dataclass(frozen=True)
class BlockForm:
    """What a block returns: a tensor, or a (context, image) tuple whose context may be None (SD3's last)."""

    pair: bool
    context: bool


def form_of(output) -> BlockForm:
    return BlockForm(isinstance(output, tuple), isinstance(output, tuple) and output[0] is not None)


def input_state(args: tuple, kwargs: dict, form: BlockForm) -> State:
    """The state a block receives (its image stream, and its context stream for two-stream blocks)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not form.pair:
        return hidden, None
    return hidden, kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]


def output_state(output) -> State:
    return (output[1], output[0]) if isinstance(output, tuple) else (output, None)


def as_output(state: State, form: BlockForm):
    """``state`` in the shape a block of ``form`` returns."""
    return (state[1] if form.context else None, state[0]) if form.pair else state[0]


def with_input(args: tuple, kwargs: dict, state: State) -> tuple[tuple, dict]:
    """A block's arguments with its input state replaced by ``state``."""
    args, kwargs = list(args), dict(kwargs)
    for pos, name, value in ((0, "hidden_states", state[0]), (1, "encoder_hidden_states", state[1])):
        if value is None:
            continue
        if name in kwargs:
            kwargs[name] = value
        else:
            args[pos] = value
    return tuple(args), kwargs


def _sub(a: State, b: State) -> State:
    return a[0] - b[0], None if a[1] is None or b[1] is None else a[1] - b[1]


def _add(a: State, b: State) -> State:
    return a[0] + b[0], None if a[1] is None or b[1] is None else a[1] + b[1]


def _rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean |x - ref| / mean |ref| (FirstBlockCache's and TeaCache's distance)."""
    return float((x - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


# ---- Taylor forecasting (diffusers' TaylorSeerState arithmetic; order 0 is plain reuse) -----------
class Forecast:
    """Finite-difference Taylor factors of a state, updated on full steps, evaluated on cached ones."""

    def __init__(self, order: int):
        self.order = order
        self.factors: list[State] = []
        self.last: int | None = None

    def update(self, step: int, value: State) -> None:
        new = [value]
        if self.last is not None:
            dt = step - self.last
            for j in range(min(self.order, len(self.factors))):
                d = _sub(new[j], self.factors[j])
                new.append((d[0] / dt, None if d[1] is None else d[1] / dt))
        self.factors, self.last = new, step

    def predict(self, step: int) -> State:
        k = step - self.last
        out = self.factors[0]
        for j in range(1, len(self.factors)):
            c = k**j / math.factorial(j)
            f = self.factors[j]
            out = (out[0] + f[0] * c, None if out[1] is None else out[1] + f[1] * c)
        return out


# ---- decisions ---------------------------------------------------------------------------------------
@dataclass
class BranchState:
    """One guidance branch's decision state (FirstBlockCache reference / TeaCache accumulator)."""

    ref: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    acc: float = 0.0


def block_ranges(policy: CachePolicy, steps: int, depth: int) -> list[tuple[int, int]]:
    """Every block range the policy may skip during a run (a runner needs a segment boundary at each end)."""
    if policy.method == "first_block":
        return [(policy.probe_blocks, depth)]
    if policy.method == "delta_dit":
        k = min(policy.delta_blocks, depth)
        return [r for r, used in (((depth - k, depth), policy.delta_boundary > 0),
                                  ((0, k), policy.delta_boundary < steps)) if used]
    return [(0, depth)]


def check_policy(policy: CachePolicy, steps: int, depth: int) -> None:
    """A one-paragraph error naming the field when ``policy`` cannot run on ``steps`` steps and ``depth`` blocks."""
    try:
        policy.check_schedule(steps, depth)
    except ValueError as e:
        field, _, why = str(e).partition(": ")
        raise DitCompressError(f"cache policy '{policy.method}', field '{field}': {why}.") from None
    if depth < 1:
        raise DitCompressError("cache policy: the model has no transformer blocks to cache.")


class CacheEngine:
    """Decisions and stored features of one sampling run (see the module docstring)."""

    def __init__(self, policy: CachePolicy, steps: int, depth: int, branches: int):
        check_policy(policy, steps, depth)
        self.policy, self.steps, self.depth = policy, steps, depth
        self.branch = [BranchState() for _ in range(branches)]
        self.forecasts: dict[tuple[int, int], Forecast] = {}
        self.step = -1
        self.cached_run = 0  # consecutive cached steps so far
        self.skipped_blocks = 0
        self.total_blocks = 0
        self.decisions: list[bool] = []  # per step: True = the range ran

    # -- per step --
    def begin(self) -> tuple[int, int]:
        """Start the next call; returns the block range ``(a, b)`` it may skip."""
        self.step += 1
        if self.step >= self.steps:
            raise DitCompressError(f"cache policy: call {self.step + 1} of a run planned for {self.steps} steps; a "
                                   f"step cache serves one sampling run of the contract's steps.")
        p, i = self.policy, self.step
        if p.method == "delta_dit":
            k = min(p.delta_blocks, self.depth)
            self.range = (self.depth - k, self.depth) if i < p.delta_boundary else (0, k)
        else:
            self.range = block_ranges(p, self.steps, self.depth)[0]
        self.total_blocks += self.depth
        return self.range

    def _forced(self) -> bool:
        p, i = self.policy, self.step
        return (i < p.warmup or i >= self.steps - p.cooldown or self.range not in self.forecasts
                or (p.max_cached is not None and self.cached_run >= p.max_cached))

    def decide(self, probe: torch.Tensor | None = None) -> bool:
        """At boundary ``a``: True if the range must run this step. ``probe``: the first_block metric's input."""
        p, i = self.policy, self.step
        forced = self._forced()
        if p.method != "first_block":
            compute = forced or (i - p.warmup - p.phase) % p.interval == 0
        else:
            rows = probe.chunk(len(self.branch)) if probe is not None else [None] * len(self.branch)
            wants = [self._branch_wants(br, r) for br, r in zip(self.branch, rows)]
            compute = forced or any(wants)
            for br, r in zip(self.branch, rows):
                if compute:
                    br.acc = 0.0
                    if p.metric == "residual":
                        br.ref = r
        self.compute = compute
        self.cached_run = 0 if compute else self.cached_run + 1
        self.decisions.append(compute)
        if not compute:
            self.skipped_blocks += self.range[1] - self.range[0]
        return compute

    def _branch_wants(self, br: BranchState, r: torch.Tensor) -> bool:
        p = self.policy
        if p.metric == "residual":  # FirstBlockCache: change of the probe residual since the last full step
            return br.ref is None or _rel_l1(r, br.ref) > p.threshold
        prev, br.prev = br.prev, r  # TeaCache: accumulated rescaled step-to-step change of the modulated input
        if prev is None:
            return True
        d = _rel_l1(r, prev)
        if p.rescale is not None:
            d = sum(c * d ** (len(p.rescale) - 1 - k) for k, c in enumerate(p.rescale))
        br.acc += d
        return br.acc >= p.threshold

    def reuse(self, state_a: State) -> State:
        """The forecast state at ``b`` on a cached step, from the state at ``a``."""
        f = self.forecasts[self.range].predict(self.step)
        return f if self._output_forecast else _add(state_a, f)

    def store(self, state_a: State, state_b: State) -> None:
        """After the range ran: update its stored features."""
        value = state_b if self._output_forecast else _sub(state_b, state_a)
        order = self.policy.order if self.policy.method == "taylorseer" else 0
        self.forecasts.setdefault(self.range, Forecast(order)).update(self.step, value)

    @property
    def _output_forecast(self) -> bool:
        return self.policy.method == "taylorseer" and self.policy.forecast == "output"

    def stats(self) -> dict:
        return {"method": self.policy.method, "steps": self.step + 1,
                "cached_steps": sum(not d for d in self.decisions),
                "skipped_block_fraction": self.skipped_blocks / max(self.total_blocks, 1),
                "decisions": [int(d) for d in self.decisions]}


def branches_of(contract: SamplingContract) -> int:
    return 2 if contract.guided else 1


def needs_probe_input(policy: CachePolicy) -> bool:
    """TeaCache's metric reads block 0's attention input (inside block 0), not a block boundary."""
    return policy.method == "first_block" and policy.metric == "modulated_input"


@contextlib.contextmanager
def wrapped_blocks(views: list, wrap: Callable[[int, Callable], Callable]):
    """Every block's ``forward`` replaced by ``wrap(index, forward)`` inside the block (restored after)."""
    saved = [v.module.__dict__.get("forward") for v in views]
    for i, v in enumerate(views):
        v.module.forward = wrap(i, v.module.forward)
    try:
        yield
    finally:
        for v, old in zip(views, saved):
            if old is None:
                del v.module.forward
            else:
                v.module.forward = old


class CachedCall:
    """A denoiser call for one sampling run under a policy; ``stats`` says what it skipped."""

    def __init__(self, contract: SamplingContract, depth: int):
        self.engine = CacheEngine(contract.cache, contract.steps, depth, branches_of(contract))

    @property
    def stats(self) -> dict:
        return self.engine.stats()


# ---- PyTorch: one model pass with wrapped blocks ---------------------------------------------------
class TorchStepCache(CachedCall):
    """``call(x, t, cond)`` for one sampling run of ``adapter``'s model under ``contract.cache``."""

    def __init__(self, adapter: ModelAdapter, call: Callable, contract: SamplingContract):
        self.views = adapter.blocks()
        super().__init__(contract, len(self.views))
        self.call = call
        self.forms: list[BlockForm | None] = [None] * len(self.views)
        self.last_probe: torch.Tensor | None = None  # TeaCache's metric input of the last call (calibration fits)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        eng = self.engine
        a, b = eng.begin()
        run = {"compute": True, "state_a": None, "state_b": None, "state_0": None, "probe": None}
        if a == 0:  # no probe blocks: the decision is the schedule's
            run["compute"] = eng.decide()
        hooks = []
        if needs_probe_input(eng.policy):
            def grab(_m, args, kwargs):
                run["probe"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hooks.append(self.views[0].attentions[0].module.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with wrapped_blocks(self.views, lambda i, forward: self._wrapped(i, forward, run)):
                return self.call(x, t, cond)
        finally:
            self.last_probe = run["probe"]
            for h in hooks:
                h.remove()

    def _wrapped(self, i: int, forward: Callable, run: dict) -> Callable:
        eng, (a, b) = self.engine, self.engine.range

        def fwd(*args, **kwargs):
            if i == 0 and run["compute"] is False and a == 0:  # the whole range [0, b) is skipped from here
                run["state_b"] = eng.reuse(input_state(args, kwargs, self.forms[0]))
            if a <= i < b and not run["compute"]:
                if i == b - 1:
                    return as_output(run["state_b"], self.forms[i])
                return as_output(input_state(args, kwargs, self.forms[i]), self.forms[i])
            out = forward(*args, **kwargs)
            self.forms[i] = form_of(out)
            if i == 0:
                run["state_0"] = input_state(args, kwargs, self.forms[0])
                if a == 0:
                    run["state_a"] = run["state_0"]
            if i == a - 1:  # boundary a: decide from the probe blocks
                run["state_a"] = output_state(out)
                probe = run["probe"] if needs_probe_input(eng.policy) else run["state_a"][0] - run["state_0"][0]
                run["compute"] = eng.decide(probe)
                if not run["compute"]:
                    run["state_b"] = eng.reuse(run["state_a"])
            if i == b - 1 and run["compute"]:
                eng.store(run["state_a"], output_state(out))
            return out

        return fwd


# ---- segments: the same engine over separately callable pieces ------------------------------------
Segment = Callable[[torch.Tensor, torch.Tensor, Cond, State | None], State | torch.Tensor]


class SegmentedStepCache(CachedCall):
    """A cached call over segments: ``segments[(start, stop)]`` maps (x, t, cond, state at start) to the state at
    stop; ``(0, 0)`` is the embedding (no state in), ``(depth, depth)`` the final layer (returns the prediction)."""

    def __init__(self, segments: dict[tuple[int, int], Segment], contract: SamplingContract, depth: int):
        if needs_probe_input(contract.cache):
            raise DitCompressError(
                "cache policy 'first_block' with metric 'modulated_input' (TeaCache) reads block 0's attention input, "
                "which a segmented runtime does not expose; use metric 'residual' (FirstBlockCache) for this runtime.")
        super().__init__(contract, depth)
        self.segments, self.depth = segments, depth

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        eng = self.engine
        a, b = eng.begin()
        state = state0 = self.segments[(0, 0)](x, t, cond, None)
        bounds = segment_bounds(eng.policy, eng.steps, self.depth)
        state_a, j = None, 0
        while j < len(bounds) - 1:
            lo, hi = bounds[j], bounds[j + 1]
            if lo == a:
                state_a = state
                if not eng.decide(state[0] - state0[0] if a > 0 else None):
                    state, j = eng.reuse(state_a), bounds.index(b)
                    continue
            state = self.segments[(lo, hi)](x, t, cond, state)
            if hi == b:
                eng.store(state_a, state)
            j += 1
        return self.segments[(self.depth, self.depth)](x, t, cond, state)


def segment_bounds(policy: CachePolicy, steps: int, depth: int) -> list[int]:
    """Block boundaries a segmented runner needs: 0, depth and both ends of every range the policy skips."""
    return sorted({0, depth, *(e for r in block_ranges(policy, steps, depth) for e in r)})


# ---- the hook the sampler calls ------------------------------------------------------------------
def step_cache(denoiser, call: Callable, contract: SamplingContract) -> Callable:
    """``call`` for one sampling run under ``contract.cache`` (``call`` itself when there is no policy).

    PyTorch models, adapters and runners that expose ``adapter`` are wrapped by ``TorchStepCache``; a runner
    that runs in segments provides ``cached_call(contract)``; any other runner cannot apply a policy.
    """
    if contract.cache is None:
        return call
    if hasattr(denoiser, "cached_call"):
        return denoiser.cached_call(contract)
    if isinstance(denoiser, nn.Module):
        denoiser = get_adapter(denoiser)
    adapter = denoiser if isinstance(denoiser, ModelAdapter) else getattr(denoiser, "adapter", None)
    if not isinstance(adapter, ModelAdapter):
        raise DitCompressError(f"{getattr(denoiser, 'description', type(denoiser).__name__)} cannot apply the "
                               f"contract's '{contract.cache.method}' cache policy (it runs the model as one piece); "
                               f"export it with its policy (segmented) or sample the PyTorch artifact.")
    return TorchStepCache(adapter, call, contract)


# ---- PyTorch segments, for export and for checking a segmented runner ------------------------------
class SegmentModule(nn.Module):
    """``(latent, timestep, c0..c3, s_hidden, s_context) -> state at stop`` (or the prediction for the final
    segment) around any family's adapter: blocks outside ``[start, stop)`` are bypassed, the input state is
    put in at block ``start`` and the state at ``stop`` taken out. A pass of the whole model with bypassed
    blocks, so the segment needs no family-specific code; the bypassed parts are dead code in a trace."""

    def __init__(self, model: nn.Module, cond_keys: list[str], start: int, stop: int, forms: list[BlockForm]):
        super().__init__()
        self.model, self.cond_keys, self.start, self.stop, self.forms = model, list(cond_keys), start, stop, forms

    def forward(self, latent, timestep, c0=None, c1=None, c2=None, c3=None, s_hidden=None, s_context=None):
        adapter = get_adapter(self.model)
        views = adapter.blocks()
        depth, start, stop = len(views), self.start, self.stop
        conds = dict(zip(self.cond_keys, (c0, c1, c2, c3)))
        given = (s_hidden, s_context)
        taken: list[State] = []

        def wrap(i, forward):
            form = self.forms[i]

            def fwd(*args, **kwargs):
                if start == depth and i == depth - 1:  # final segment: the last block hands over the given state
                    return as_output(given, form)
                if i == start and start < depth:
                    args, kwargs = with_input(args, kwargs, given)
                if i == stop and stop < depth:
                    taken.append(input_state(args, kwargs, form))
                if not start <= i < stop:
                    return as_output(input_state(args, kwargs, form), form)
                out = forward(*args, **kwargs)
                if i == stop - 1 and stop == depth:
                    taken.append(output_state(out))
                return out

            return fwd

        with wrapped_blocks(views, wrap):
            out = adapter.forward(latent, timestep, conds)
        if start == depth:
            return out
        hidden, context = taken[0]
        return (hidden, context) if context is not None else hidden


def block_forms(model: nn.Module) -> list[BlockForm]:
    """Each block's output form, from one seeded call."""
    adapter = get_adapter(model)
    views = adapter.blocks()
    forms: list[BlockForm | None] = [None] * len(views)
    hooks = [v.module.register_forward_hook(lambda _m, _a, out, i=i: forms.__setitem__(i, form_of(out)))
             for i, v in enumerate(views)]
    contract = adapter.contract()
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            adapter.forward(torch.randn((1, *contract.latent_shape), generator=g), torch.full((1,), 500.0),
                            contract.example_cond(1, g))
    finally:
        for h in hooks:
            h.remove()
    return forms


def segment_modules(model: nn.Module, policy: CachePolicy, steps: int, cond_keys: list[str]
                    ) -> dict[tuple[int, int], SegmentModule]:
    """The PyTorch segments a segmented runner of ``policy`` needs: embedding, block ranges, final layer."""
    forms = block_forms(model)
    depth = len(forms)
    bounds = segment_bounds(policy, steps, depth)
    keys = [(0, 0), *zip(bounds, bounds[1:]), (depth, depth)]
    return {k: SegmentModule(model, cond_keys, *k, forms).eval() for k in keys}


def torch_segments(model: nn.Module, policy: CachePolicy, steps: int) -> dict[tuple[int, int], Segment]:
    """``segment_modules`` as ``SegmentedStepCache`` segments (PyTorch, eager): the reference for a runner."""
    keys = sorted(c.name for c in get_adapter(model).contract().conditions)
    mods = segment_modules(model, policy, steps, keys)

    def seg(m: SegmentModule) -> Segment:
        def run(x, t, cond, state):
            args = [cond[k] for k in keys] + [None] * (4 - len(keys))
            s = (None, None) if state is None else state
            out = m(x, t, *args, s_hidden=s[0], s_context=s[1])
            if m.start == m.stop == len(m.forms):
                return out
            return out if isinstance(out, tuple) else (out, None)
        return run

    return {k: seg(m) for k, m in mods.items()}


@dataclass
class SkipCount:
    """Skipped block evaluations of a policy over calls (for reports that aggregate several runs)."""

    skipped: int = 0
    total: int = 0
    runs: list[dict] = field(default_factory=list)

    def add(self, stats: dict | None, depth: int) -> None:
        if stats:
            self.runs.append(stats)
            self.total += stats["steps"] * depth
            self.skipped += round(stats["skipped_block_fraction"] * stats["steps"] * depth)

    @property
    def fraction(self) -> float:
        return self.skipped / max(self.total, 1)
