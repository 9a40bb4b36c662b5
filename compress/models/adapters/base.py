"""The structural view every pass uses, whatever the model family.

Passes never touch family-specific attribute names: they ask an adapter for the transformer blocks
(both stream kinds for SD3/Flux), each block's attention projections and head layout, its MLP
projections and width, and its adaLN modulation layers; and they ask it to remove a block or
replace a sub-module. The adapter also knows how to call the denoiser (``forward(x, t, cond)``), what its
conditions are and how it is sampled by default (its ``contract``), and how to rebuild the family's
architecture from a recorded description (``architecture`` / ``build``), so one sampler, one set of
metrics and one artifact format serve every family.

A new family is one subclass registered with ``@register_adapter``: loading, provenance, artifact
rebuild, calibration, export and the benchmark all go through this registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compress.models.contract import Cond, ConditionSpec, SamplingContract
from compress.models.provenance import provenance, record_edit
from compress.nn.guidance import GUIDANCE_INPUT
from compress.nn.timestep import denoiser_call


@dataclass
class AttentionView:
    """One attention layer. Either ``qkv`` (fused, output rows ordered [3, heads, head_dim]) or q/k/v.

    ``kind``: ``self`` (image tokens attend to each other), ``cross`` (image queries, text keys) or ``joint``
    (text and image tokens in one attention: MMDiT's two projected streams, or Flux single blocks' one
    concatenated stream). ``image_tokens``: where the image tokens sit in the sequence the attention
    computation sees: ``all`` of it, ``first`` ([image | text], SD3) or ``last`` ([text | image], Flux).
    """

    path: str
    module: nn.Module
    heads: int
    head_dim: int
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None
    out: nn.Linear | None = None
    # Joint (MMDiT) attention also projects the context stream.
    context_q: nn.Linear | None = None
    context_k: nn.Linear | None = None
    context_v: nn.Linear | None = None
    context_out: nn.Linear | None = None
    kind: str = "self"  # self | cross | joint
    image_tokens: str = "all"  # all | first | last

    def projections(self) -> dict[str, nn.Linear]:
        """Every present projection by role name."""
        names = ("q", "k", "v", "qkv", "out", "context_q", "context_k", "context_v", "context_out")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class MLPView:
    """One feed-forward layer: ``fc_in`` expands to ``hidden`` channels, ``fc_out`` projects back.

    ``fc_out_offset`` is where the MLP's channels start among ``fc_out``'s input features (Flux
    single blocks share one output projection between attention and MLP: [attn | mlp]).
    ``activation`` names the elementwise activation (``compress.nn.moe.ACTIVATIONS``; for gated MLPs the
    one applied to the gate), None when the adapter does not know it. ``act_path`` is the activation's own
    module when it sits outside ``path`` (Flux single blocks), so a pass replacing the MLP can reach it.
    """

    path: str
    fc_in: nn.Linear
    fc_out: nn.Linear
    hidden: int
    fc_out_offset: int = 0
    # Gated MLPs (GEGLU) have fc_in rows = 2 * hidden: [value | gate].
    gated: bool = False
    activation: str | None = None
    act_path: str | None = None


@dataclass
class BlockView:
    """One transformer block and its parts."""

    kind: str  # "block" (single-stream DiT/PixArt), "joint" (SD3/Flux double-stream), "single" (Flux)
    index: int
    path: str
    module: nn.Module
    attentions: list[AttentionView] = field(default_factory=list)
    mlps: list[MLPView] = field(default_factory=list)
    modulation: list[nn.Linear] = field(default_factory=list)
    # Condition embedders the block owns (diffusers' DiT keeps a copy of the timestep/label embedder in every
    # block): not transformer compute, so layer selection leaves their Linears alone, like the model's embedders.
    embedders: list[nn.Module] = field(default_factory=list)


class ModelAdapter:
    """Base class: one subclass per family, registered in ``ADAPTERS`` by ``@register_adapter``.

    A subclass sets ``family``, ``prediction``, ``block_lists`` and ``default_guidance`` and implements
    ``matches``, ``block_view``, ``denoise``, ``conditions``, ``architecture`` and ``build``.
    """

    family: ClassVar[str] = ""
    prediction: ClassVar[str] = "epsilon"  # epsilon (DDPM) or flow (rectified flow / flow matching)
    block_lists: ClassVar[dict[str, str]] = {}  # block kind -> dotted path of its ModuleList
    default_guidance: ClassVar[float] = 1.0  # the family's usual CFG scale (its pipeline's default)
    # plain attributes an edit may change (head counts after head pruning); nothing else is settable
    settable_attrs: ClassVar[frozenset[str]] = frozenset({"num_heads", "heads", "inner_dim", "head_dim"})

    def __init__(self, model: nn.Module):
        self.model = model
        rec = provenance(model)
        if rec["architecture"] is None:  # recorded before any edit, so an artifact can rebuild the source
            rec["architecture"] = self.architecture()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Is ``model`` of this family?"""
        raise NotImplementedError

    # --- rebuilding the source architecture (artifacts) ---------------------------------------------
    def architecture(self) -> dict:
        """``{"class": ..., "config": {...}}``: enough to rebuild the un-edited module with ``build``."""
        raise NotImplementedError

    @classmethod
    def handles(cls, architecture: dict) -> bool:
        """Can ``build`` rebuild this recorded architecture?"""
        return False

    @classmethod
    def check_architecture(cls, architecture: dict) -> None:
        """Raise ``ValueError`` naming the field if a recorded architecture is out of bounds (checked before
        anything is allocated, so a manifest cannot make the loader allocate for minutes)."""

    @classmethod
    def build(cls, architecture: dict) -> nn.Module:
        """A freshly initialised module of the recorded architecture."""
        raise NotImplementedError

    # --- structure -------------------------------------------------------------------------
    def blocks(self) -> list[BlockView]:
        """Every transformer block of every kind, in execution order."""
        views = []
        for kind, path in self.block_lists.items():
            for i, blk in enumerate(self.model.get_submodule(path)):
                views.append(self.block_view(kind, i, f"{path}.{i}", blk))
        return views

    def block_view(self, kind: str, index: int, path: str, block: nn.Module) -> BlockView:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return sum(len(self.model.get_submodule(p)) for p in self.block_lists.values())

    def remove_blocks(self, kind: str, indices: list[int]) -> None:
        """Drop blocks of one kind (indices into that kind's list); the rest keep their order."""
        if kind not in self.block_lists:
            raise KeyError(f"{self.family} has no block kind {kind!r}; it has {', '.join(self.block_lists)}")
        path = self.block_lists[kind]
        blocks = self.model.get_submodule(path)
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            raise IndexError(f"{path} has {len(blocks)} blocks; cannot remove {bad}")
        keep = [b for i, b in enumerate(blocks) if i not in set(indices)]
        self.model.set_submodule(path, nn.ModuleList(keep))
        self.after_structure_change()
        record_edit(self.model, {"op": "remove_blocks", "kind": kind, "indices": sorted(set(indices))})

    def replace(self, path: str, module: nn.Module) -> None:
        """Swap the sub-module at ``path`` (e.g. a Linear for a quantized Linear); recorded for replay."""
        from compress.nn import module_spec

        self.model.get_submodule(path)  # raises AttributeError naming the path if absent
        self.model.set_submodule(path, module)
        record_edit(self.model, {"op": "replace", "path": path, "spec": module_spec(module)})

    def wrap(self, path: str, wrapper: nn.Module) -> None:
        """Put ``wrapper`` around the sub-module at ``path`` (it becomes ``wrapper.inner``); recorded for replay."""
        from compress.nn import module_spec

        inner = self.model.get_submodule(path)
        wrapper.inner = inner
        self.model.set_submodule(path, wrapper)
        record_edit(self.model, {"op": "wrap", "path": path, "spec": module_spec(wrapper)})

    # --- the attention seam: what an attention computes between its projections ----------------------------
    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(rows, columns) of the image-token grid of latents of this shape (None: the family has no grid)."""
        return None

    def attention_view(self, path: str) -> AttentionView:
        """The attention at ``path`` (KeyError if the adapter exposes none there)."""
        for b in self.blocks():
            for a in b.attentions:
                if a.path == path:
                    return a
        raise KeyError(f"{path!r} is not an attention layer the {self.family} adapter exposes")

    def attention_kernel(self, view: AttentionView) -> nn.Module | None:
        """The kernel ``view`` computes with (None: the family's own softmax attention)."""
        return None

    def install_kernel(self, view: AttentionView, kernel: nn.Module | None) -> None:
        """Family hook: make ``view`` compute with ``kernel`` (None: its own softmax attention again)."""
        from compress.errors import DitCompressError

        raise DitCompressError(f"the {self.family} adapter does not expose its attention computation; its attention "
                               f"cannot be replaced.")

    def _kernel_target(self, view: AttentionView, kernel: nn.Module) -> None:
        from compress.errors import DitCompressError
        from compress.nn.attention import AttentionKernel

        if view.kind == "cross":
            raise DitCompressError(f"{view.path}: cross-attention keeps its softmax attention (its keys are the text "
                                   f"tokens: its cost is already linear in image tokens).")
        if not isinstance(kernel, AttentionKernel):
            raise TypeError(f"{type(kernel).__name__} is not an attention kernel (compress.nn.attention)")
        if (kernel.heads, kernel.head_dim, kernel.image) != (view.heads, view.head_dim, view.image_tokens):
            raise ValueError(f"{view.path}: has {view.heads} heads of {view.head_dim} (image tokens: "
                             f"{view.image_tokens}); the kernel was built for {kernel.heads} of {kernel.head_dim} "
                             f"({kernel.image})")

    def set_attention_kernel(self, view: AttentionView, kernel: nn.Module) -> None:
        """Replace ``view``'s softmax attention by ``kernel`` (its projections stay); recorded for replay."""
        from compress.nn import module_spec

        self._kernel_target(view, kernel)
        self.install_kernel(view, kernel)
        record_edit(self.model, {"op": "attention", "path": view.path, "spec": module_spec(kernel)})

    @contextlib.contextmanager
    def trial_attention_kernel(self, view: AttentionView, kernel: nn.Module) -> Iterator[None]:
        """``view`` computes with ``kernel`` inside the block only (not recorded): for measuring sensitivity."""
        self._kernel_target(view, kernel)
        previous = self.attention_kernel(view)
        self.install_kernel(view, kernel)
        try:
            yield
        finally:
            self.install_kernel(view, previous)

    def conditioning_embedders(self) -> list[tuple[str, int]]:
        """(path, width) of the modules whose output is the (batch, width) conditioning vector every block's
        adaLN reads (the timestep embedder, or the combined timestep + label / pooled-text embedder)."""
        raise NotImplementedError

    def set_attr(self, path: str, name: str, value) -> None:
        """Change a plain attribute (e.g. a head count after head pruning); recorded for replay."""
        setattr(self.model.get_submodule(path) if path else self.model, name, value)
        record_edit(self.model, {"op": "set_attr", "path": path, "name": name, "value": value})

    def replay(self, edits: list[dict], where: str = "edits") -> None:
        """Re-apply recorded structural edits to a freshly built source model (artifact loading).

        Edits come from a file: each is checked against what the adapter defines (known block kinds, existing
        sub-modules, registered module types, the attributes in ``settable_attrs``) before it is applied.
        """
        from compress.errors import DitCompressError
        from compress.nn import build_module

        for i, e in enumerate(edits):
            what = f"{where}: edit #{i + 1} ({e.get('op')!r})"
            try:
                if e["op"] == "remove_blocks":
                    self.remove_blocks(e["kind"], e["indices"])
                elif e["op"] == "replace":
                    if not isinstance(self.model.get_submodule(e["path"]), nn.Module):
                        raise AttributeError(f"{e['path']} is not a sub-module")
                    self.replace(e["path"], build_module(e["spec"]))
                elif e["op"] == "wrap":
                    if not isinstance(self.model.get_submodule(e["path"]), nn.Module) or not e["spec"].get("wraps"):
                        raise AttributeError(f"{e['path']}: a 'wrap' edit needs a wrapper module type")
                    self.wrap(e["path"], build_module(e["spec"]))
                elif e["op"] == "attention":
                    self.set_attention_kernel(self.attention_view(e["path"]), build_module(e["spec"]))
                elif e["op"] == "set_attr":
                    target = self.model.get_submodule(e["path"]) if e["path"] else self.model
                    old = getattr(target, e["name"], None)
                    if e["name"] not in self.settable_attrs or type(old) is not type(e["value"]):
                        raise AttributeError(f"attribute {e['name']!r} of {e['path'] or 'the model'} is not one an "
                                             f"edit may set (settable: {', '.join(sorted(self.settable_attrs))})")
                    self.set_attr(e["path"], e["name"], e["value"])
                else:
                    raise ValueError(f"unknown edit operation {e['op']!r}")
            except (KeyError, IndexError, AttributeError, TypeError, ValueError, DitCompressError) as err:
                msg = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise DitCompressError(f"{what}: {msg}; the manifest does not describe this model.") from None

    def after_structure_change(self) -> None:
        """Hook for families that cache layer counts in their config."""

    def summary(self) -> dict:
        """Family, depth, width, heads, parameters — what ``dit-compress inspect`` prints."""
        blocks = self.blocks()
        attn = blocks[0].attentions[0] if blocks and blocks[0].attentions else None
        from compress.models.size import param_count, state_bytes

        params, size = param_count(self.model), state_bytes(self.model)
        kinds = {k: len(self.model.get_submodule(p)) for k, p in self.block_lists.items()}
        return {
            "family": self.family,
            "depth": self.depth,
            "blocks": kinds,
            "hidden": self.hidden_size,
            "heads": attn.heads if attn else None,
            "head_dim": attn.head_dim if attn else None,
            "mlp_hidden": blocks[0].mlps[0].hidden if blocks and blocks[0].mlps else None,
            "params": params,
            "size_mb": round(size / 2**20, 3),
            "prediction": self.prediction,
            "latent_shape": list(self.latent_shape),
            "num_classes": self.num_classes,
        }

    # --- calling the denoiser ----------------------------------------------------------------
    hidden_size: int
    latent_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int | None:
        labels = [c for c in self.conditions() if c.kind == "label"]
        return labels[0].num_classes if labels else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's prediction (epsilon or velocity), with learned-sigma channels dropped.

        ``t`` is in [0, 1000] for every family; it is the current timestep (``compress.nn.timestep``) for
        the layers of this call.
        """
        with denoiser_call(t, cond.get(GUIDANCE_INPUT), self.token_grid(tuple(x.shape[1:]))):
            return self.denoise(x, t, cond)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The family-specific call behind ``forward``."""
        raise NotImplementedError

    def conditions(self) -> list[ConditionSpec]:
        """The condition inputs (class labels, text embeddings...) and how their null form is made."""
        raise NotImplementedError

    # --- how it is sampled ------------------------------------------------------------------------
    def default_contract(self) -> SamplingContract:
        """The family's defaults: its scheduler, 50 steps, its pipeline's usual guidance."""
        return SamplingContract(family=self.family, prediction=self.prediction, latent_shape=list(self.latent_shape),
                                conditions=self.conditions(), guidance_scale=self.default_guidance)

    def contract(self) -> SamplingContract:
        """How this model is sampled: recorded on the model (by loading or a pass), else the defaults."""
        rec = provenance(self.model).get("sampling")
        return SamplingContract.model_validate(rec) if rec else self.default_contract()

    def set_contract(self, contract: SamplingContract) -> None:
        """Record how this model must be sampled (saved in the artifact manifest and every export)."""
        provenance(self.model)["sampling"] = contract.model_dump(mode="json")


ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    ADAPTERS.append(cls)
    return cls


def adapter_for_architecture(architecture: dict) -> type[ModelAdapter] | None:
    """The registered adapter class that can rebuild ``architecture`` (None if none can)."""
    return next((cls for cls in ADAPTERS if cls.handles(architecture)), None)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family; a clear error for an unsupported module."""
    from compress.errors import DitCompressError

    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise DitCompressError(
        f"{type(model).__name__} is not a supported DiT family; supported: {', '.join(c.family for c in ADAPTERS)}."
    )


# --- block inputs and outputs, the same for every family -------------------------------------------
# Single-stream blocks take ``hidden_states`` (or ``x``) first and return it; joint and Flux single blocks
# take ``hidden_states, encoder_hidden_states`` and return ``(encoder_hidden_states, hidden_states)``.


def block_hidden(output) -> torch.Tensor:
    """The image-token stream a block returned (the last element of a joint block's tuple)."""
    return output[-1] if isinstance(output, tuple) else output


def block_identity_output(args: tuple, kwargs: dict, output):
    """What a block would return if it were removed: its inputs, in the shape of its output."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not isinstance(output, tuple):
        return hidden
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return (context if output[0] is not None else None, hidden)
