"""Dense-to-MoE conversion: split each MLP's hidden channels into routed experts (Dense2MoE / MoEfication).

For every chosen block, each MLP the adapter exposes (gated ones included) becomes a
``compress.nn.moe.MoEFeedForward``:

1. **Channel scores** on calibration trajectories (``importance``: activation or Taylor, the width-pruning
   scores of ``prune_width``); the ``shared`` most important channels form an always-on shared expert.
2. **Partition** of the other channels into ``experts`` equal groups: ``cluster`` (balanced k-means of
   the channels' activation patterns over calibration tokens: channels that fire on the same tokens share
   an expert, so a token's work concentrates in few experts) or ``importance`` (contiguous runs of the
   importance ranking). On the reference model clustering wins (benchmarks/results/moe).
3. **Router** initialised by least squares from the MLP input (and, with ``timestep_router``, sinusoidal
   timestep features) onto the norm of each expert's contribution to the MLP output on calibration
   tokens; top-k selection; selected experts are summed with weight 1 (the dense function when all are
   selected).
4. **Balance**: a selection-only bias per expert, set on calibration tokens so that no expert is much
   busier than the mean (auxiliary-loss-free balancing).
5. Optional **recovery** (``training``): the shared ``Trainer`` (output KD + masked feature KD + diffusion
   loss) on the MoE layers (``trainable``), plus router distillation (each router keeps predicting the size
   of its experts' contributions as they train, at its own learning rate) and a Switch-Transformer
   load-balancing loss; checkpoints, resume and DDP as for every training pass. The balance bias keeps
   being adjusted from each step's own routing (``balance_rate``) and is never reset afterwards: experts
   are only right for the routing they were trained under.

What was measured on the reference model (300 recovery steps, held-out trajectories, relative output MSE
against the dense model; conversion alone 0.108): training every parameter with the old straight-through
router gradient reached 0.021, and re-balancing afterwards undid it (0.108); that gradient, with the bias
adjusted each step, still drove the routing onto one expert's tokens (busiest / mean 4.0, error 0.97);
training every parameter drifts the MLPs' inputs (the adaLN shift moves every token of a sample
alike), which collapses block 0's routing onto one expert within 30 steps even with the router frozen,
and chasing that drift with the balance bias diverges (0.78-9.2). Training only the MoE layers keeps the
inputs the routers were fitted on, and the loads stay within 1.6x of the mean batch by batch.

What is converted per family: native DiT ``blocks.N.mlp``; diffusers DiT and PixArt ``ff``; SD3 ``ff``
and ``ff_context``; Flux joint blocks ``ff`` and ``ff_context``; Flux single blocks, whose ``proj_out`` is
shared between attention and MLP: ``proj_mlp`` becomes the experts (which project their own output with
their columns of ``proj_out``), ``act_mlp`` an identity and ``proj_out`` a ``SplitProjection`` keeping
the attention columns.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.calibration import CalibrationConfig, CalibrationSet
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.adapters.base import MLPView
from compress.nn.moe import ACTIVATIONS, Expert, MoEFeedForward, SplitProjection, timestep_features
from compress.nn.timestep import current_timestep
from compress.passes.base import PassConfig, PassContext, register_pass
from compress.passes.prune_width import PruneWidthConfig, _data_scores, _units
from compress.training import Trainer, TrainingConfig

PASS = "pass 'moe'"


@register_pass("moe")
class MoEConfig(PassConfig):
    """Dense-to-MoE: split each MLP into routed experts (+ a shared one), router from calibration, recovery."""

    changes_structure: ClassVar[bool] = True  # MLP Linears become experts: quantize afterwards, not before

    pass_: Literal["moe"] = Field("moe", alias="pass")
    experts: int = Field(8, ge=2, le=256, description="Routed experts per MLP (E). They must divide the MLP "
                                                      "channels left after the shared expert evenly (a "
                                                      "fractional 'shared' is rounded so that they do).")
    top_k: int = Field(2, ge=1, le=256, description="Experts each token runs (k <= E).")
    shared: int | float = Field(0.125, ge=0, description="Always-on shared expert of the most important channels: a "
                                                         "fraction of the MLP width (float < 1, rounded to the "
                                                         "nearest count leaving the experts equal slices) or a "
                                                         "channel count (int); 0 for none.")
    partition: Literal["cluster", "importance"] = Field(
        "cluster", description="How routed channels are grouped: 'cluster' (balanced k-means of their activation "
                               "patterns) or 'importance' (contiguous runs of the importance ranking).")
    importance: Literal["activation", "taylor"] = Field(
        "activation", description="Channel scores choosing the shared expert (and the 'importance' grouping): mean "
                                  "|activation| x output-weight norm, or Taylor |a dL/da| on the denoising loss.")
    timestep_router: bool = Field(False, description="Add a timestep-dependent router bias (sinusoidal features of "
                                                     "the step being run), fitted and trained with the router.")
    blocks: dict[str, list[int]] | None = Field(
        None, description="Blocks to convert, per kind (e.g. {block: [2, 3]}); None: every block with an MLP.")
    balance: bool = Field(True, description="Set the per-expert selection bias on calibration tokens so that "
                                            "experts receive about equal numbers of tokens.")
    calibration: CalibrationConfig | None = Field(
        None, description="Trajectories for scores, clustering and the router fit (default: the recipe's).")
    max_rows: int = Field(256, ge=8, le=65536, description="Calibration rows (transformer inputs) used.")
    max_tokens: int = Field(4096, ge=64, le=1_000_000, description="Tokens per MLP kept for clustering, the router "
                                                                   "fit and balancing (sampled evenly).")
    training: TrainingConfig | None = Field(
        None, description="Recovery and router training on the shared trainer (None: none; the converted model "
                          "is then only as good as its least-squares router).")
    trainable: Literal["moe", "all"] = Field(
        "moe", description="What recovery trains: 'moe' (experts, shared expert, output bias and routers; the rest "
                           "stays the source's, so the MLP inputs the routers were fitted and balanced on do not "
                           "drift) or 'all' (every parameter).")
    router_distill: float = Field(1.0, ge=0, description="Weight of router distillation during training: the router's "
                                                         "logits regressed onto its experts' output norms per token "
                                                         "(scale-free); 0 leaves the routers as fitted.")
    load_balance: float = Field(0.01, ge=0, description="Weight of the Switch load-balancing loss during training.")
    balance_rate: float = Field(0.01, ge=0, le=1, description="Per-step adjustment of the selection bias during "
                                                               "training, in units of the router logits' spread, "
                                                               "from the step's own expert loads (keeps experts "
                                                               "balanced under the routing being trained; 0: the "
                                                               "bias set at conversion stays).")
    router_lr: float | None = Field(None, gt=0, le=1, description="Learning rate of the routers (None: the "
                                                                  "training lr).")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} experts per token but only {self.experts} experts ('experts')")
        if isinstance(self.shared, float) and not self.shared < 1:
            raise ValueError(f"shared: a fraction must be below 1 (the shared expert cannot be the whole MLP), got "
                             f"{self.shared}")
        return self


# --- calibration tokens ------------------------------------------------------------------------------

@torch.no_grad()
def module_inputs(model: nn.Module, modules: dict[str, nn.Module], rows: CalibrationSet, max_tokens: int,
                  seed: int, device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (tokens (n, dim), their timesteps (n,)) of its input over ``rows``, at most ``max_tokens``."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    batches = list(rows.batches(32))
    per_batch = -(-max_tokens // max(len(batches), 1))
    got: dict[str, list] = {n: [] for n in modules}

    def hook(name):
        def fn(_m, args):
            x = args[0].detach()
            t = current_timestep()
            t = torch.zeros(x.shape[0]) if t is None else t.reshape(-1).float().cpu().expand(x.shape[0])
            tok = x.reshape(-1, x.shape[-1]).float().cpu()
            tt = t.repeat_interleave(tok.shape[0] // x.shape[0])
            pick = torch.randperm(tok.shape[0], generator=gen)[:per_batch]
            got[name].append((tok[pick], tt[pick]))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for x, t, c in batches:
            adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in c.items()})
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat([a for a, _ in v])[:max_tokens], torch.cat([b for _, b in v])[:max_tokens])
            for n, v in got.items()}


def _hidden(view: MLPView, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden activations for tokens ``x`` (value * act(gate) for gated MLPs)."""
    lin = view.fc_in
    pre = F.linear(x, lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().float())
    act = ACTIVATIONS[view.activation]
    if view.gated:
        value, gate = pre.chunk(2, dim=-1)
        return value * act(gate)
    return act(pre)


def _out_columns(view: MLPView) -> torch.Tensor:
    """(out, hidden) columns of ``fc_out`` that read the MLP's channels."""
    return view.fc_out.weight.detach().float()[:, view.fc_out_offset: view.fc_out_offset + view.hidden]


# --- partition ----------------------------------------------------------------------------------------

def balanced_kmeans(features: torch.Tensor, groups: int, seed: int, iters: int = 25) -> list[torch.Tensor]:
    """Rows of ``features`` (unit vectors) into ``groups`` clusters of equal size (cosine k-means, greedy
    capacity-limited assignment); returns the row indices of each cluster, sorted."""
    n = features.shape[0]
    size = n // groups
    gen = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=gen)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = features @ centroids.T  # (n, groups)
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        assign.fill_(-1)
        room = [size] * groups
        left = n
        for flat in order:
            i, g = divmod(flat, groups)
            if assign[i] < 0 and room[g]:
                assign[i] = g
                room[g] -= 1
                left -= 1
                if not left:
                    break
        new = torch.stack([features[assign == g].mean(0) for g in range(groups)])
        new = F.normalize(new, dim=-1)
        if torch.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return [torch.nonzero(assign == g).squeeze(-1) for g in range(groups)]


def _shared_width(view: MLPView, config: MoEConfig) -> int:
    """The shared expert's channels: a count as given, or a fraction of the width rounded to the nearest count
    that leaves the experts equal slices (a fraction is approximate by nature: 7/24 is 112 of 384 channels but
    40, not 37, of 128), so one recipe fits every width; a count the experts do not divide is an error."""
    s = config.shared
    width = round(s * view.hidden) if isinstance(s, float) else s
    if isinstance(s, float) and width > 0:
        fits = [w for w in range(1, view.hidden) if (view.hidden - w) % config.experts == 0]
        width = min(fits, key=lambda w: (abs(w - s * view.hidden), w)) if fits else width
    if width >= view.hidden:
        raise DitCompressError(f"{PASS}, field 'shared': a shared expert of {width} channels is not smaller than the "
                               f"MLP of {view.path} ({view.hidden} channels); use a fraction below 1 or fewer "
                               f"channels.")
    rest = view.hidden - width
    if rest % config.experts:
        fits = [e for e in range(2, min(rest, 256) + 1) if rest % e == 0][:12]
        raise DitCompressError(f"{PASS}, field 'experts': {config.experts} experts do not divide the {rest} routed "
                               f"channels of {view.path} ({view.hidden} hidden - {width} shared); experts are equal "
                               f"slices, so choose a divisor (e.g. {', '.join(map(str, fits))}) or change 'shared'.")
    return width


def partition(view: MLPView, x: torch.Tensor, score: torch.Tensor, config: MoEConfig, seed: int
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(shared channel indices, routed channel indices per expert) for one MLP."""
    width = _shared_width(view, config)
    ranked = torch.argsort(score, descending=True)
    shared, rest = ranked[:width].sort().values, ranked[width:]
    if config.partition == "importance":
        return shared, [g.sort().values for g in rest.chunk(config.experts)]
    contrib = _hidden(view, x)[:, rest].abs() * _out_columns(view)[:, rest].norm(dim=0)  # (tokens, channels)
    feats = F.normalize(contrib.T - contrib.T.mean(1, keepdim=True), dim=-1)
    return shared, [rest[g].sort().values for g in balanced_kmeans(feats, config.experts, seed)]


# --- router ---------------------------------------------------------------------------------------------

def _expert(view: MLPView, idx: torch.Tensor, out_dim: int, with_out: bool = True) -> Expert:
    """An expert holding channels ``idx`` of ``view`` (both halves of a gated MLP's rows)."""
    rows = torch.cat([idx, idx + view.hidden]) if view.gated else idx
    lin_in = view.fc_in
    e = Expert(lin_in.in_features, len(idx), out_dim, view.activation, view.gated, lin_in.bias is not None)
    with torch.no_grad():
        e.fc_in.weight.copy_(lin_in.weight.detach()[rows])
        if lin_in.bias is not None:
            e.fc_in.bias.copy_(lin_in.bias.detach()[rows])
        e.fc_out.weight.copy_(view.fc_out.weight.detach()[:, view.fc_out_offset + idx])
    return e.to(lin_in.weight.device, lin_in.weight.dtype)


@torch.no_grad()
def fit_router(moe: MoEFeedForward, x: torch.Tensor, t: torch.Tensor) -> float:
    """Least squares from the input (and timestep features) onto each expert's output norm; returns R^2."""
    feats = [x]
    if moe.t_router is not None:
        feats.append(timestep_features(t))
    a = torch.cat([*feats, torch.ones(len(x), 1)], dim=1).double()
    w = moe.router.weight  # the experts run in the model's device and dtype; the fit is in float64 on the CPU
    target = moe.expert_sizes(x.to(w.device, w.dtype)).double().cpu()  # (n, E)
    gram = a.T @ a
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge, a.T @ target)  # (features + 1, E)
    d = x.shape[1]
    moe.router.weight.copy_(w[:d].T.float())
    moe.router.bias.copy_(w[-1].float())
    if moe.t_router is not None:
        moe.t_router.weight.copy_(w[d:-1].T.float())
    resid = (a @ w - target).pow(2).sum()
    return float(1 - resid / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12))


def load_excess(load: torch.Tensor) -> torch.Tensor:
    """How much busier than the mean each expert is (tokens per expert / mean - 1), clipped to [-1, 1]: the
    direction and size of one balancing step on the selection bias."""
    return (load / load.mean().clamp_min(1e-12) - 1).clamp(-1, 1)


@torch.no_grad()
def balance_router(moe: MoEFeedForward, x: torch.Tensor, t: torch.Tensor, iters: int = 400) -> float:
    """Set ``balance_bias`` so top-k selection spreads tokens ``x`` evenly; returns busiest / mean load."""
    w = moe.router.weight
    logits = moe.router(x.to(w.device, w.dtype))
    if moe.t_router is not None:
        logits = logits + moe.t_router(timestep_features(t).to(w.device, w.dtype))
    logits = logits.float().cpu()
    e, k = moe.num_experts, moe.top_k
    mean = len(x) * k / e
    bias = torch.zeros(e, dtype=logits.dtype)
    step = 0.05 * float(logits.std().clamp_min(1e-6))
    best, best_ratio = bias.clone(), float("inf")
    for i in range(iters):
        load = torch.bincount((logits + bias).topk(k, dim=-1).indices.reshape(-1), minlength=e).float()
        ratio = float(load.max() / mean)
        if ratio < best_ratio:
            best, best_ratio = bias.clone(), ratio
        bias -= step * load_excess(load) * (0.99 ** i)
    moe.balance_bias.copy_(best - best.mean())
    return best_ratio


def rebalance(model: nn.Module, rows: CalibrationSet, config: MoEConfig, seed: int, device: str,
              rounds: int = 3) -> None:
    """Balance every MoE layer on the tokens it sees in the converted model (its inputs depend on the routing
    of the layers before it, so a few rounds of collect-then-balance)."""
    layers = moe_layers(model)
    for r in range(rounds):
        inputs = module_inputs(model, layers, rows, config.max_tokens, seed + r, device)
        for n, m in layers.items():
            balance_router(m, *inputs[n])


# --- building ------------------------------------------------------------------------------------------

def chosen_mlps(model: nn.Module, config: MoEConfig) -> list[MLPView]:
    """The dense MLP views of the chosen blocks (clear errors for unknown kinds / indices, or none at all)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    counts = {k: len(model.get_submodule(p)) for k, p in adapter.block_lists.items()}
    if config.blocks is not None:
        for kind, idx in config.blocks.items():
            if kind not in counts or any(not 0 <= i < counts[kind] for i in idx):
                raise DitCompressError(f"{PASS}, field 'blocks.{kind}': {adapter.family} has block kinds "
                                       f"{', '.join(f'{k} (0..{n - 1})' for k, n in counts.items())}; got {idx}.")
        blocks = [b for b in blocks if b.index in set(config.blocks.get(b.kind, []))]
    views = [m for b in blocks for m in b.mlps]
    if not views:
        raise DitCompressError(f"{PASS}: the {adapter.family} model exposes no dense MLP in the chosen blocks (its "
                               f"adapter gives no MLP view, or they were converted already); nothing to turn into "
                               f"experts.")
    for v in views:
        if v.activation not in ACTIVATIONS:
            raise DitCompressError(f"{PASS}: the MLP of {v.path} has an activation the experts cannot reproduce "
                                   f"({v.activation!r}; supported: {', '.join(ACTIVATIONS)}).")
    return views


def convert(view: MLPView, shared: torch.Tensor, groups: list[torch.Tensor], config: MoEConfig) -> MoEFeedForward:
    """The MoE layer computing ``view``'s MLP as experts (exactly, with every expert selected)."""
    fc_in, fc_out = view.fc_in, view.fc_out
    split = view.fc_out_offset > 0  # Flux single: the output bias stays in the shared projection
    moe = MoEFeedForward(fc_in.in_features, fc_out.out_features, [len(g) for g in groups], config.top_k,
                         view.activation, view.gated, len(shared), fc_in.bias is not None,
                         out_bias=fc_out.bias is not None and not split, timestep_router=config.timestep_router)
    moe = moe.to(fc_in.weight.device, fc_in.weight.dtype)
    moe.experts = nn.ModuleList(_expert(view, g, fc_out.out_features) for g in groups)
    if len(shared):
        moe.shared = _expert(view, shared, fc_out.out_features)
    with torch.no_grad():
        if moe.out_bias is not None:
            moe.out_bias.copy_(fc_out.bias.detach())
        if moe.t_router is not None:
            moe.t_router.weight.zero_()
    return moe


def install(model: nn.Module, view: MLPView, moe: MoEFeedForward) -> str:
    """Put ``moe`` in place of ``view``'s MLP (recorded edits); returns the MoE module's path."""
    adapter = get_adapter(model)
    if not view.fc_out_offset:
        adapter.replace(view.path, moe)
        return view.path
    names = {id(m): n for n, m in model.named_modules()}
    in_path, out_path = names[id(view.fc_in)], names[id(view.fc_out)]
    if view.act_path is None:
        raise DitCompressError(f"{PASS}: {view.path} shares its output projection with attention but its adapter "
                               f"names no activation module to bypass.")
    off, fc_out = view.fc_out_offset, view.fc_out
    proj = SplitProjection(off, fc_out.out_features, fc_out.bias is not None).to(fc_out.weight.device,
                                                                                 fc_out.weight.dtype)
    with torch.no_grad():
        proj.linear.weight.copy_(fc_out.weight.detach()[:, :off])
        if fc_out.bias is not None:
            proj.linear.bias.copy_(fc_out.bias.detach())
    adapter.replace(in_path, moe)
    adapter.replace(view.act_path, nn.Identity())
    adapter.replace(out_path, proj)
    return in_path


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}


# --- statistics -----------------------------------------------------------------------------------------

@torch.no_grad()
def routing_statistics(model: nn.Module, rows: CalibrationSet, t_edges: list[float] | None = None,
                       device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tokens per expert of every MoE layer over ``rows``: name -> (timestep bins, experts) counts.

    ``t_edges`` splits [0, 1000] into timestep ranges (default: one range).
    """
    adapter = get_adapter(model)
    layers = moe_layers(model)
    edges = torch.tensor(t_edges or [], dtype=torch.float32)
    counts = {n: torch.zeros(len(edges) + 1, m.num_experts) for n, m in layers.items()}
    for m in layers.values():
        m.record_routing = True
    try:
        for x, t, c in rows.batches(32):
            adapter.forward(x.to(device), t.to(device), {k: v.to(device) for k, v in c.items()})
            bins = torch.bucketize(t.float().reshape(-1).expand(x.shape[0]), edges)
            for n, m in layers.items():
                r = m.last_routing
                top = r["top"].cpu()
                row_bin = bins.repeat_interleave(top.shape[0] // x.shape[0])
                for b in row_bin.unique().tolist():
                    counts[n][b] += torch.bincount(top[row_bin == b].reshape(-1), minlength=m.num_experts).float()
    finally:
        for m in layers.values():
            m.record_routing, m.last_routing = False, None
    return counts


def load_ratio(counts: torch.Tensor) -> float:
    """Busiest expert's token count over the mean (over all timestep bins)."""
    total = counts.sum(0)
    return float(total.max() / total.mean().clamp_min(1e-12))


def mlp_params(view: MLPView) -> int:
    """Parameters of one dense MLP view (its rows of ``fc_in``, its columns of ``fc_out``, the output bias)."""
    rows = view.hidden * (2 if view.gated else 1)
    n = rows * view.fc_in.in_features + (rows if view.fc_in.bias is not None else 0)
    return n + view.hidden * view.fc_out.out_features + (view.fc_out.out_features if view.fc_out.bias is not None
                                                         else 0)


def activated_fraction(model: nn.Module, dense_params: int) -> float:
    """Activated MLP parameters per token of ``model``'s MoE layers over ``dense_params`` (the MLPs they replaced:
    ``sum(mlp_params(v))`` over the source's MLP views)."""
    return sum(m.activated_params() for m in moe_layers(model).values()) / max(dense_params, 1)


# --- training -------------------------------------------------------------------------------------------

ROUTER_TOKENS = 1024  # tokens per layer and step that router distillation runs every expert on


def router_distill_loss(moe: MoEFeedForward) -> torch.Tensor:
    """Scale-free MSE of the router's logits to its experts' output norms, on evenly spaced tokens of the step."""
    r = moe.last_routing
    logits, x = r["logits"], r["x"]
    idx = torch.arange(0, x.shape[0], max(1, x.shape[0] // ROUTER_TOKENS), device=x.device)[:ROUTER_TOKENS]
    with torch.no_grad():
        target = moe.expert_sizes(x.index_select(0, idx)).to(logits.dtype)
    return F.mse_loss(logits.index_select(0, idx), target) / target.pow(2).mean().clamp_min(1e-12)


def switch_balance_loss(moe: MoEFeedForward) -> torch.Tensor:
    """E * sum_e f_e P_e (Switch Transformer): f_e share of routed slots, P_e mean router probability."""
    r = moe.last_routing
    prob, top = r["logits"].softmax(-1), r["top"]
    share = torch.bincount(top.reshape(-1), minlength=moe.num_experts).to(prob.dtype) / top.numel()
    return moe.num_experts * (share * prob.mean(0)).sum()


class MoETrainer(Trainer):
    """The shared loop, with routers at their own learning rate and the load-balancing loss added."""

    def __init__(self, model: nn.Module, config: MoEConfig, ctx: PassContext):
        super().__init__(model, ctx.teacher, config.training, ctx.run, ctx.calibration,
                         tag=f"pass{ctx.run.pass_index + 1}-moe")
        self.moe_config = config
        self.layers = list(moe_layers(model).values())

    def resume_key(self) -> str:
        c = self.moe_config
        return (f"{super().resume_key()} {c.trainable} balance {c.balance} {c.balance_rate} router {c.router_distill} "
                f"{c.router_lr} switch {c.load_balance}")

    def param_groups(self) -> list[dict]:
        routers = {id(p) for m in self.layers for r in (m.router, m.t_router) if r is not None for p in r.parameters()}
        pool = (self.student.parameters() if self.moe_config.trainable == "all"
                else (p for m in self.layers for p in m.parameters()))
        rest = [p for p in pool if id(p) not in routers]
        router = [p for p in self.student.parameters() if id(p) in routers]
        return [{"params": rest, "lr": self.cfg.lr},
                {"params": router, "lr": self.moe_config.router_lr or self.cfg.lr, "weight_decay": 0.0}]

    def before_step(self, step: int) -> None:
        for m in self.layers:
            m.record_routing = True

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Auxiliary-loss-free balancing on the step's routing: busier experts' selection bias goes down."""
        rate = self.moe_config.balance_rate if self.moe_config.balance else 0.0
        live = [m for m in self.layers if m.last_routing is not None]
        if not rate or not live:
            return
        loads = torch.stack([torch.bincount(m.last_routing["top"].reshape(-1), minlength=m.num_experts).float()
                             for m in live])
        scale = torch.stack([m.last_routing["logits"].detach().float().std() for m in live])
        if self.world > 1:  # every rank applies the same update: the loads and spreads of the global batch
            both = torch.cat([loads, scale[:, None]], dim=1).to(self.device)
            dist.all_reduce(both)
            loads, scale = both[:, :-1].cpu(), both[:, -1].cpu() / self.world
        for m, load, s in zip(live, loads, scale):
            bias = m.balance_bias - rate * float(s) * load_excess(load).to(m.balance_bias)
            m.balance_bias.copy_(bias - bias.mean())

    def extra_loss(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        c, live = self.moe_config, [m for m in self.layers if m.last_routing is not None]
        total = loss.new_zeros(())
        if c.load_balance and live:
            total = total + c.load_balance * sum(switch_balance_loss(m) for m in live) / len(live)
        if c.router_distill and live:
            total = total + c.router_distill * sum(router_distill_loss(m) for m in live) / len(live)
        return total

    def run(self) -> nn.Module:
        try:
            return super().run()
        finally:
            for m in self.layers:
                m.record_routing, m.last_routing = False, None


# --- the pass -------------------------------------------------------------------------------------------

def _scores(model: nn.Module, views: list[MLPView], config: MoEConfig, ctx: PassContext) -> dict[str, torch.Tensor]:
    """Channel importance per MLP, with ``prune_width``'s activation / Taylor scores."""
    units = [u for u in _units(model) if u.kind == "mlp"]
    scoring = PruneWidthConfig(mlp=0.5, importance=config.importance, calibration=config.calibration,
                               max_rows=config.max_rows)
    _data_scores(model, units, scoring, ctx)
    by_path = {u.path: u.score for u in units}
    return {v.path: by_path[v.path] for v in views}


@MoEConfig.applies
def apply_moe(model: nn.Module, config: MoEConfig, ctx: PassContext) -> nn.Module:
    views = chosen_mlps(model, config)
    for v in views:
        _shared_width(v, config)  # every size error before any work
    dense_params = sum(mlp_params(v) for v in views)
    rows = ctx.calibration.rows(config.calibration).spread(config.max_rows)
    device, seed = ctx.run.device, ctx.run.seed
    scores = _scores(model, views, config, ctx)
    names = {id(m): n for n, m in model.named_modules()}
    inputs = module_inputs(model, {names[id(v.fc_in)]: v.fc_in for v in views}, rows, config.max_tokens, seed, device)
    fits = []
    for i, v in enumerate(views):
        x, t = inputs[names[id(v.fc_in)]]
        shared, groups = partition(v, x, scores[v.path], config, seed + i)
        moe = convert(v, shared, groups, config)
        fits.append(fit_router(moe, x, t))
        install(model, v, moe)
    layers = moe_layers(model)
    if config.balance:
        rebalance(model, rows, config, seed, device)
    ctx.run.note(f"converted {len(layers)} MLPs to {config.experts} experts (top-{config.top_k}, shared "
                 f"{layers[next(iter(layers))].shared_width} channels, {config.partition} partition, "
                 f"{config.importance} scores); router least-squares R^2 mean {sum(fits) / len(fits):.3f}")
    if config.training is not None:
        model = MoETrainer(model, config, ctx).run()
    counts = routing_statistics(model, rows, device=device)
    ratios = {n: load_ratio(c) for n, c in counts.items()}
    worst = max(ratios, key=ratios.get)
    ctx.run.note(f"activated MLP parameters per token: {activated_fraction(model, dense_params):.1%} of dense; "
                 f"busiest expert / mean tokens on calibration rows: max {ratios[worst]:.2f} ({worst}), mean "
                 f"{sum(ratios.values()) / len(ratios):.2f}")
    return model
