"""The diffusion arithmetic every few-step objective shares, for epsilon and flow (velocity) sources alike.

Everything is written in terms of the clean-image estimate ``x0`` and the noise estimate, so one objective
serves both prediction types: a public DMD port that applies epsilon formulas to a flow model (or mixes
timesteps in [0, 1] with timesteps in [0, 1000]) is the known way to make flow students diverge. Timesteps
are always in [0, 1000), as every adapter takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.diffusion.sampling import cat_cond
from compress.diffusion.schedules import training_scheduler
from compress.models.adapters import Cond, ModelAdapter
from compress.models.contract import SamplingContract
from compress.nn.guidance import GUIDANCE_INPUT


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


@dataclass
class Diffusion:
    """The forward process of a source model: how clean data, noise and the model's output relate at t."""

    prediction: str  # "epsilon" | "flow"

    def __post_init__(self):
        self.alphas = training_scheduler().alphas_cumprod.double()  # epsilon sources' schedule

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) scales at t: x_t = signal * x0 + noise * eps."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        if self.prediction == "flow":
            s = t / 1000.0
            return _bcast((1 - s).float(), like), _bcast(s.float(), like)
        a = self.alphas[t.round().long().clamp(0, len(self.alphas) - 1)]
        return _bcast(a.sqrt().float(), like), _bcast((1 - a).sqrt().float(), like)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean data ``x0`` and noise at timesteps ``t``."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean estimate a model output implies at (x, t)."""
        a, s = self._coefs(t, x)
        if self.prediction == "flow":  # v = noise - x0, x = a x0 + s noise with a = 1 - s
            return x - s * out
        return (x - s * out) / a

    def noise(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise estimate a model output implies at (x, t)."""
        if self.prediction == "flow":
            a, _ = self._coefs(t, x)
            return x + a * out
        return out

    def output(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The model output that means (x0, noise): the denoising target."""
        return noise - x0 if self.prediction == "flow" else noise

    def ode_step(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM (epsilon) / Euler (flow) step from t to t_next (t_next = 0: the end)."""
        return self.noised(self.x0(out, x, t), self.noise(out, x, t), t_next)

    def output_for(self, x: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """The output whose ``ode_step`` from (x, t) lands on ``x_next`` at ``t_next`` (progressive targets)."""
        a, s = self._coefs(t, x)
        an, sn = self._coefs(t_next, x)
        if self.prediction == "flow":  # x_next = x + (s_next - s) v
            return (x_next - x) / (sn - s)
        # x_next = an (x - s eps) / a + sn eps  =>  eps = (x_next - an x / a) / (sn - an s / a)
        return (x_next - an / a * x) / (sn - an * s / a)

    def snr_weight(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Truncated SNR weighting max(noise^2 / signal^2, 1) of an output-space loss: an x0-space loss at high
        noise (Salimans & Ho's choice for few-step students), plain output MSE at low noise."""
        a, s = self._coefs(t, like)
        return torch.clamp((s / a) ** 2, min=1.0)


def guided_output(adapter: ModelAdapter, contract: SamplingContract, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                  w: torch.Tensor) -> torch.Tensor:
    """The source's classifier-free-guided prediction at per-row scales ``w`` (one call if guidance is an input)."""
    if contract.guidance_input is not None:
        return adapter.forward(x, t, {**cond, contract.guidance_input: w.to(x.device)})
    if bool((w == 1).all()):
        return adapter.forward(x, t, cond)
    both = adapter.forward(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, contract.null_cond(cond)))
    c, u = both.chunk(2)
    return u + _bcast(w, c) * (c - u)


def student_output(adapter: ModelAdapter, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                   w: torch.Tensor | None) -> torch.Tensor:
    """A student's prediction; a guidance-input student gets ``w`` as its guidance_scale condition."""
    if w is not None:
        cond = {**cond, GUIDANCE_INPUT: w.to(x.device)}
    return adapter.forward(x, t, cond)


def grid(steps: int, start: float = 999.0) -> list[float]:
    """``steps`` evenly spaced timesteps from ``start`` down ('trailing' spacing: the first is pure noise)."""
    return [round(start - i * (start + 1) / steps, 3) for i in range(steps)]


def lcm_boundary(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's consistency boundary scalings (c_skip, c_out) at t (sigma_data 0.5, timestep scaling 10), so
    a consistency student is trained with exactly the function its sampler evaluates."""
    st = torch.as_tensor(t, dtype=torch.float32).reshape(-1) * 10.0
    c_skip = 0.25 / (st**2 + 0.25)
    c_out = st / (st**2 + 0.25) ** 0.5
    return _bcast(c_skip, like), _bcast(c_out, like)


def consistency_output(diffusion: "Diffusion", out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean image a consistency-style student's sampler takes from its output: LCMScheduler's boundary form
    for epsilon sources, the plain x0 for flow sources (the flow-LCM sampler uses it as it is)."""
    x0 = diffusion.x0(out, x, t)
    if diffusion.prediction == "flow":
        return x0
    c_skip, c_out = lcm_boundary(t, x)
    return c_skip * x + c_out * x0

