"""A dense MLP split into routed experts, executed with grouped dispatch (what the ``moe`` pass puts in).

    y = shared(x) + sum_{e in top_k(router(x) + bias)} expert_e(x) (+ the dense output bias)

Each expert owns a slice of the dense MLP's hidden channels: its rows of ``fc_in`` (value and gate rows
for gated MLPs) and its columns of ``fc_out``, so with every expert selected the layer is the dense MLP
exactly. Selected experts are summed with weight 1 (the dense semantics, so the conversion starts from
the dense function). The router is therefore not trained through the layer's output (a weight that is 1
in value gives it a straight-through gradient, which was measured to run away: one expert's logits grow
until it takes every token); it is trained by distillation, to predict the size of each expert's
contribution for the token (``router_distill_loss``), as its least-squares initialisation does.

Execution is grouped, not masked: per expert, the tokens routed to it are gathered (``index_select``),
run through that expert's two matmuls and scattered back (``index_add``), so the work per token is
that of ``top_k`` experts plus the shared one. Token counts per expert are data-dependent; the ONNX
export keeps them dynamic (NonZero -> Gather -> MatMul -> ScatterND per expert).

``balance_bias`` is added to the logits for *selection only* (never to weights): the pass sets it on
calibration data so that every expert receives about the same number of tokens (auxiliary-loss-free
balancing, DeepSeek-V3's). The optional timestep router adds a learned, timestep-dependent bias
(sinusoidal features of ``current_timestep()``), so routing can change along the sampling trajectory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.nn.registry import replayable
from compress.nn.timestep import current_timestep

# The elementwise activations of the MLPs adapters expose; gated MLPs apply it to the gate half.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_sigmoid": lambda x: x * torch.sigmoid(1.702 * x),  # diffusers ApproximateGELU
    "silu": F.silu,
}
_MAX_WIDTH, _MAX_HIDDEN = 65536, 1 << 20  # bounds a recorded spec must satisfy before anything is allocated
T_FREQS = 8  # sinusoidal timestep features of the timestep router: cos and sin at 8 frequencies


def _tracing() -> bool:
    """Inside torch.export / dynamo / TorchScript tracing (no data-dependent Python branches there)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """(batch,) timesteps in [0, 1000] -> (batch, 2 * T_FREQS) cos/sin features, periods 1000 ... ~8."""
    freqs = (2 * math.pi / 1000.0) * 2.0 ** torch.arange(T_FREQS, dtype=torch.float32, device=t.device)
    angle = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class Expert(nn.Module):
    """A slice of the dense MLP: ``fc_out(act(fc_in(x)))``; gated: ``fc_out(value * act(gate))``."""

    def __init__(self, dim: int, width: int, out_dim: int, activation: str, gated: bool, in_bias: bool):
        super().__init__()
        self.activation, self.gated, self.width = activation, gated, width
        self.fc_in = nn.Linear(dim, 2 * width if gated else width, bias=in_bias)
        self.fc_out = nn.Linear(width, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        act = ACTIVATIONS[self.activation]
        if self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = value * act(gate)
        else:
            h = act(h)
        return self.fc_out(h)


class MoEFeedForward(nn.Module):
    """Routed experts (+ an optional always-on shared expert) standing in for one dense MLP."""

    def __init__(self, dim: int, out_dim: int, expert_widths: list[int], top_k: int, activation: str,
                 gated: bool = False, shared_width: int = 0, in_bias: bool = True, out_bias: bool = True,
                 timestep_router: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
        if not 1 <= top_k <= len(expert_widths) or min(expert_widths, default=0) < 1 or shared_width < 0:
            raise ValueError(f"need 1 <= top_k ({top_k}) <= experts ({len(expert_widths)}) and positive widths")
        if max(dim, out_dim) > _MAX_WIDTH or sum(expert_widths) + shared_width > _MAX_HIDDEN:
            raise ValueError(f"widths out of range (dim {dim}, out_dim {out_dim}, hidden "
                             f"{sum(expert_widths) + shared_width}): at most {_MAX_WIDTH} / {_MAX_HIDDEN}")
        self.dim, self.out_dim, self.top_k = dim, out_dim, top_k
        self.expert_widths, self.shared_width = list(expert_widths), shared_width
        self.activation, self.gated = activation, gated
        self.in_bias, self.timestep_router = in_bias, timestep_router
        experts = len(expert_widths)
        self.router = nn.Linear(dim, experts)
        self.t_router = nn.Linear(2 * T_FREQS, experts, bias=False) if timestep_router else None
        self.register_buffer("balance_bias", torch.zeros(experts))
        self.experts = nn.ModuleList(Expert(dim, w, out_dim, activation, gated, in_bias) for w in expert_widths)
        self.shared = Expert(dim, shared_width, out_dim, activation, gated, in_bias) if shared_width else None
        self.out_bias = nn.Parameter(torch.zeros(out_dim)) if out_bias else None
        self.record_routing = False  # set by statistics / training code: keep the last call's routing
        self.last_routing: dict[str, torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.expert_widths)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, experts) logits for (batch, tokens, dim) inputs."""
        logits = self.router(x)
        if self.t_router is not None:
            t = current_timestep()
            if t is not None:
                if not _tracing() and t.numel() not in (1, x.shape[0]):
                    raise ValueError(f"timestep router: {t.numel()} timesteps for a batch of {x.shape[0]} rows")
                feats = timestep_features(t.to(x.device)).to(x.dtype)
                logits = logits + self.t_router(feats).reshape(-1, 1, logits.shape[-1])
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x3 = x.reshape(x.shape[0] if x.dim() > 2 else 1, -1, self.dim)
        logits = self.router_logits(x3).reshape(-1, self.num_experts)
        xf = x3.reshape(-1, self.dim)
        top = (logits + self.balance_bias.to(logits.dtype)).topk(self.top_k, dim=-1).indices  # (N, k)
        out = self.shared(xf) if self.shared is not None else xf.new_zeros(xf.shape[0], self.out_dim)
        if self.out_bias is not None:
            out = out + self.out_bias.to(out.dtype)
        for e, expert in enumerate(self.experts):
            idx = (top == e).any(dim=-1).nonzero().squeeze(-1)  # the tokens routed to expert e
            if not _tracing() and idx.shape[0] == 0:
                continue
            out = out.index_add(0, idx, expert(xf.index_select(0, idx)))
        if self.record_routing:
            self.last_routing = {"top": top.detach(), "logits": logits, "x": xf.detach(), "batch": x3.shape[0]}
            if logits.requires_grad:  # the router's gradients come from the router losses, not from ``out``; a
                out = out + 0.0 * logits.sum()  # zero-valued tie keeps DDP's used-parameter search counting it
        return out.reshape(*lead, self.out_dim)

    def expert_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, experts) norms of every expert's output for tokens ``x``: what the router predicts."""
        return torch.stack([e(x).norm(dim=-1) for e in self.experts], dim=1)

    # -- accounting -------------------------------------------------------------------------------
    def activated_params(self) -> float:
        """Parameters a token uses: router, shared expert, the mean expert times top_k, the output bias."""
        n = sum(p.numel() for p in self.router.parameters())
        n += sum(p.numel() for p in self.t_router.parameters()) if self.t_router is not None else 0
        n += sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        n += self.top_k * sum(p.numel() for e in self.experts for p in e.parameters()) / self.num_experts
        return n + (self.out_dim if self.out_bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"{self.dim} -> {self.out_dim}, experts={self.expert_widths}, top_k={self.top_k}, "
                f"shared={self.shared_width}, activation={self.activation}{' (gated)' if self.gated else ''}, "
                f"timestep_router={self.timestep_router}")


class SplitProjection(nn.Module):
    """A projection that read ``[attention | MLP hidden]`` and now reads ``[attention | MLP output]``.

    Flux single blocks share one output projection between attention and MLP. Once the MLP is routed
    experts that project their own output (its columns of that projection), the shared projection keeps
    only its attention columns (and the bias) and adds the experts' output as it arrives.
    """

    def __init__(self, attn_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.attn_features, self.out_features = attn_features, out_features
        self.linear = nn.Linear(attn_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[..., : self.attn_features]) + x[..., self.attn_features :]


replayable(
    "moe_feed_forward",
    lambda m: {"dim": m.dim, "out_dim": m.out_dim, "expert_widths": m.expert_widths, "top_k": m.top_k,
               "activation": m.activation, "gated": m.gated, "shared_width": m.shared_width, "in_bias": m.in_bias,
               "out_bias": m.out_bias is not None, "timestep_router": m.timestep_router},
    lambda s: MoEFeedForward(**s),
)(MoEFeedForward)
replayable(
    "split_projection",
    lambda m: {"attn_features": m.attn_features, "out_features": m.out_features, "bias": m.linear.bias is not None},
    lambda s: SplitProjection(**s),
)(SplitProjection)
replayable("identity", lambda m: {}, lambda s: nn.Identity())(nn.Identity)
