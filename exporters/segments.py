"""Segmented ONNX export, so ONNX Runtime can apply a model's step-cache policy.

A graph cannot skip half of itself, so a model whose contract carries a cache policy is exported in
pieces as well as whole: the embedding (inputs -> state before block 0), one graph per block range
between the boundaries the policy skips at (inputs + state -> state), and the final layer (inputs +
state -> prediction), all from ``compress.cache.segment_modules``. The runner then drives them with the
same ``CacheEngine`` as the PyTorch sampler (``SegmentedStepCache``). The export is validated by sampling
with the policy in both runtimes: same skip decisions, samples within tolerance.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from compress.cache import SegmentedStepCache, needs_probe_input, segment_bounds, segment_modules
from compress.errors import DitCompressError
from compress.models.contract import SamplingContract
from exporters.runtime import graph_inputs, numpy_feeds

MAX_INPUTS = 8


class SegmentGraph(nn.Module):
    """Positional signature for export: ``(latent, timestep, *conditions, *state)`` -> state parts or prediction."""

    def __init__(self, segment: nn.Module, n_conds: int):
        super().__init__()
        self.segment, self.n_conds = segment, n_conds

    def forward(self, latent, timestep, i0=None, i1=None, i2=None, i3=None, i4=None, i5=None):
        rest = [i0, i1, i2, i3, i4, i5]
        conds, state = rest[: self.n_conds], rest[self.n_conds :]
        return self.segment(latent, timestep, *conds, *([None] * (4 - self.n_conds)), s_hidden=state[0],
                            s_context=state[1])


def refuse_policy(contract: SamplingContract) -> None:
    """A clear error for a policy a segmented runtime cannot apply."""
    if contract.cache is not None and needs_probe_input(contract.cache):
        raise DitCompressError(
            "export: the contract's cache policy is 'first_block' with metric 'modulated_input' (TeaCache), which "
            "reads block 0's attention input inside the block; a segmented ONNX graph only exposes block "
            "boundaries. Re-apply the cache pass with metric 'residual' (FirstBlockCache) to export.")


def _state_inputs(state) -> list[torch.Tensor]:
    return [] if state is None else [s for s in state if s is not None]


def export_segments(model: nn.Module, contract: SamplingContract, keys: list[str], out: Path, opset: int) -> list[dict]:
    """Write ``segments/seg_<start>_<stop>.onnx`` for every piece the policy needs; returns their descriptions."""
    mods = segment_modules(model, contract.cache, contract.steps, keys)
    (out / "segments").mkdir()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *contract.latent_shape), generator=g)
    t = torch.full((2,), 500.0)
    cond = contract.example_cond(2, g)
    conds = [cond[k] for k in keys]
    batch = torch.export.Dim("batch", min=1, max=4096)
    described, state = [], None
    for (start, stop), mod in mods.items():
        args = (x, t, *conds, *_state_inputs(state))
        with torch.no_grad():
            result = mod(x, t, *conds, *([None] * (4 - len(keys))),
                         s_hidden=None if state is None else state[0], s_context=None if state is None else state[1])
        final = start == stop == len(mod.forms)
        pair = isinstance(result, tuple)
        outs = ["prediction"] if final else (["out_hidden", "out_context"] if pair else ["out_hidden"])
        ins = ["latent", "timestep", *keys, *(["s_hidden", "s_context"][: len(args) - 2 - len(keys)])]
        name = f"seg_{start}_{stop}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(SegmentGraph(mod, len(keys)).eval(), args, dynamo=True, opset_version=opset,
                                     input_names=ins, output_names=outs, dynamic_shapes=tuple({0: batch} for _ in args),
                                     external_data=True, optimize=True, verbose=False)
            prog.save(str(out / "segments" / name), external_data=True)
        described.append({"start": start, "stop": stop, "file": f"segments/{name}", "inputs": ins, "outputs": outs})
        if not final:
            state = result if isinstance(result, tuple) else (result, None)
    return described


class OrtSegments:
    """ONNX Runtime sessions of a segmented export, as ``SegmentedStepCache`` segments."""

    def __init__(self, export_dir: Path, described: list[dict], keys: list[str], session):
        self.keys, self.sessions = keys, {}
        for d in described:
            self.sessions[(d["start"], d["stop"])] = (session(export_dir / d["file"]), d)

    def segment(self, key: tuple[int, int]):
        sess, d = self.sessions[key]
        wanted = {i.name for i in sess.get_inputs()}

        def run(x, t, cond, state):
            vals = [*graph_inputs(x, t, cond, self.keys), *_state_inputs(state)]
            outs = [torch.from_numpy(o) for o in sess.run(None, numpy_feeds(d["inputs"], vals, wanted))]
            if d["outputs"] == ["prediction"]:
                return outs[0]
            return (outs[0], outs[1] if len(outs) > 1 else None)

        return run

    def cached_call(self, contract: SamplingContract, depth: int) -> SegmentedStepCache:
        need = segment_bounds(contract.cache, contract.steps, depth)
        missing = [k for k in [(0, 0), *zip(need, need[1:]), (depth, depth)] if k not in self.sessions]
        if missing:
            raise DitCompressError(f"this export has the segments {sorted(self.sessions)}, but the cache policy needs "
                                   f"{missing} for {contract.steps} steps; export again with the contract you "
                                   f"sample with.")
        segs = {k: self.segment(k) for k in self.sessions}
        return SegmentedStepCache(segs, contract, depth)


def check_segments(model: nn.Module, contract: SamplingContract, segments: OrtSegments, depth: int,
                   tolerance: float) -> dict:
    """Sample 2 images with the policy in PyTorch and through the ONNX segments: decisions and samples must agree."""
    from compress.diffusion.sampling import make_noise, sample

    g = torch.Generator().manual_seed(0)
    cond = contract.example_cond(2, g)
    noise = make_noise(2, tuple(contract.latent_shape), 0)
    ref = sample(model, cond, noise, contract=contract)

    class Segmented:
        def __init__(self):
            self.contract = contract

        def cached_call(self, c):
            return segments.cached_call(c, depth)

    got = sample(Segmented(), cond, noise, contract=contract)
    err = float((got.samples - ref.samples).abs().max() / ref.samples.abs().max().clamp_min(1e-12))
    same = got.cache["decisions"] == ref.cache["decisions"]
    return {"passed": bool(same and err <= tolerance), "max_rel_err": err, "tolerance_rel": tolerance,
            "same_decisions": same, "decisions_torch": ref.cache["decisions"], "decisions_onnx": got.cache["decisions"],
            "skipped_block_fraction": ref.cache["skipped_block_fraction"]}
