"""Per-layer input statistics gathered along the calibration trajectories, in bounded memory.

Calibration rows are run step by step (every batch holds rows of one sampling step), and forward
pre-hooks on the chosen Linear layers keep only what quantization needs:

* ``absmax[step, channel]``: per-input-channel max |x| for every recorded step (tiny: steps x in);
* ``rows`` / ``row_step``: a fixed-size random sample of input rows (tokens) with the step each came
  from, used to search smoothing strengths and clipping ratios against the layer's real outputs.

Peak memory is therefore the model, one batch's activations and ``max_rows`` rows per layer, whatever
the number of samples or steps in the trajectory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from compress.models.adapters import get_adapter
from compress.calibration import CalibrationSet
from compress.diffusion.sampling import slice_cond


@dataclass
class LayerInputStats:
    absmax: torch.Tensor  # (steps, in_features)
    rows: torch.Tensor  # (k, in_features) sampled input rows
    row_step: torch.Tensor  # (k,) index into ``step_ids`` of each row


@dataclass
class InputStats:
    step_ids: list[int]  # sampling-step index of each absmax row
    step_t: torch.Tensor  # (steps,) the timestep value each step runs at
    layers: dict[str, LayerInputStats]


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], calib: CalibrationSet, *, max_rows: int = 512,
                        batch_size: int = 64, seed: int = 0, progress=None) -> InputStats:
    """Run ``calib`` through ``model`` and summarise the inputs of each layer in ``names``."""
    step_ids = sorted(set(calib.step.tolist()))
    pos = {s: i for i, s in enumerate(step_ids)}
    batches = step_batches(calib, batch_size)
    step_t = torch.stack([calib.t[(calib.step == s).nonzero()[0, 0]].float() for s in step_ids])
    gen = torch.Generator().manual_seed(seed)
    layers = {n: model.get_submodule(n) for n in names}
    absmax = {n: torch.zeros(len(step_ids), m.in_features) for n, m in layers.items()}
    rows: dict[str, list] = {n: [] for n in names}
    row_step: dict[str, list] = {n: [] for n in names}
    current = {"step": 0}

    def hook(name):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            i = current["step"]
            absmax[name][i] = torch.maximum(absmax[name][i], x.abs().amax(0))
            k = min(x.shape[0], -(-max_rows // len(batches)))
            pick = torch.randperm(x.shape[0], generator=gen)[:k]
            rows[name].append(x[pick])
            row_step[name].append(torch.full((k,), i))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for b in run_batches(model, calib, batches, progress):
            current["step"] = pos[int(calib.step[b[0]])]
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        r, rs = torch.cat(rows[n]), torch.cat(row_step[n])
        if r.shape[0] > max_rows:
            keep = torch.randperm(r.shape[0], generator=gen)[:max_rows]
            r, rs = r[keep], rs[keep]
        out[n] = LayerInputStats(absmax[n], r, rs)
    return InputStats(step_ids, step_t, out)


def run_batches(model: nn.Module, calib: CalibrationSet, batches: list[torch.Tensor], progress=None):
    """Run each batch of ``calib`` rows through ``model``'s denoiser; yields the batch's indices just before its
    forward (so a caller can set per-batch state its hooks read), then calls ``progress``."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    for b in batches:
        yield b
        x = calib.x[b].to(device)
        adapter.forward(x, calib.t[b].to(device), slice_cond(calib.cond, b))
        if progress:
            progress()


def step_batches(calib: CalibrationSet, batch_size: int) -> list[torch.Tensor]:
    """Row indices of ``calib`` in batches of at most ``batch_size`` rows, each from a single sampling step."""
    batches = []
    for s in sorted(set(calib.step.tolist())):
        idx = (calib.step == s).nonzero().flatten()
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return batches


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two vectors."""
    ra = a.argsort().argsort().float()
    rb = b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def activation_salience(stats: LayerInputStats, weight: torch.Tensor, timestep_aware: bool) -> torch.Tensor:
    """Per-input-channel activation salience used by smoothing.

    Plain SmoothQuant takes the max over all calibration steps. The timestep-aware variant (after
    PTQ4DiT) weights each step's salience by how complementary it is to the weight salience: steps
    whose activation outlier channels are *not* the weight's outlier channels (low Spearman rho) are the
    ones where migrating difficulty into the weights pays off, so they count more.
    """
    if not timestep_aware:
        return stats.absmax.amax(0)
    w_sal = weight.detach().float().abs().amax(0)
    rho = torch.tensor([spearman(a, w_sal) for a in stats.absmax])
    eta = (1 - rho).clamp_min(0)
    eta = eta / eta.sum().clamp_min(1e-12)
    return (eta[:, None] * stats.absmax).sum(0)


@dataclass
class AttentionStats:
    amax: dict[str, float]  # max |q|, |k|, |v| and the largest softmax probability seen
    q: torch.Tensor  # (slices, tokens, head_dim): sampled (image, head) slices of the attention's inputs
    k: torch.Tensor
    v: torch.Tensor


@torch.no_grad()
def collect_attention_stats(model: nn.Module, paths: list[str], calib: CalibrationSet, *, samples: int = 32,
                            batch_size: int = 64, seed: int = 0, progress=None) -> dict[str, AttentionStats]:
    """Run ``calib`` through ``model`` with each attention in ``paths`` computed by a recording kernel (exact
    softmax attention, through the adapter's attention seam) that keeps the ranges of q, k, v and the
    probabilities and a random sample of (image, head) slices of q, k, v for the clipping search."""
    from compress.nn.attention import AttentionKernel

    adapter = get_adapter(model)
    batches = step_batches(calib, batch_size)
    gen = torch.Generator().manual_seed(seed)
    per_call = -(-samples // len(batches))

    class Recording(AttentionKernel):
        def __init__(self, view):
            super().__init__(view.heads, view.head_dim, (1, 1), view.image_tokens)
            self.amax = dict.fromkeys(("q", "k", "v", "p"), 0.0)
            self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def attend(self, q, k, v, scale):
            q, k, v = q.float(), k.float(), v.float()
            s = scale if scale is not None else q.shape[-1] ** -0.5
            for r, x in (("q", q), ("k", k), ("v", v)):
                self.amax[r] = max(self.amax[r], float(x.abs().amax()))
            out = torch.empty_like(q)
            rows = max(1, (1 << 26) // max(1, q.shape[1] * q.shape[2] * k.shape[2]))  # bound the probability tensor
            for i in range(0, q.shape[0], rows):
                p = (q[i:i + rows] @ k[i:i + rows].transpose(-2, -1) * s).softmax(-1)
                self.amax["p"] = max(self.amax["p"], float(p.amax()))
                out[i:i + rows] = p @ v[i:i + rows]
            flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  (image x head slices)
            pick = torch.randperm(q.shape[0] * q.shape[1], generator=gen)[:per_call]
            self.kept.append((flat(q)[pick].cpu(), flat(k)[pick].cpu(), flat(v)[pick].cpu()))
            return out

    views = [adapter.attention_view(p) for p in paths]
    kernels = [Recording(v) for v in views]
    with contextlib.ExitStack() as stack:
        for view, kernel in zip(views, kernels):
            stack.enter_context(adapter.trial_attention_kernel(view, kernel))
        for _ in run_batches(model, calib, batches, progress):
            pass
    out = {}
    for path, kernel in zip(paths, kernels):
        q, k, v = (torch.cat(parts) for parts in zip(*kernel.kept))
        keep = torch.randperm(q.shape[0], generator=gen)[:samples]
        out[path] = AttentionStats(kernel.amax, q[keep], k[keep], v[keep])
    return out
