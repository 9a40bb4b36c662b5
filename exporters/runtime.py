"""Runners: one ``(x, t, cond) -> prediction`` interface over every runtime, registered in one place.

A runner carries the sampling contract of what it runs, so the sampler, the benchmark and ``sample``
drive PyTorch models, ONNX Runtime sessions, TensorRT engines and OpenVINO models identically, and an
exported model needs nothing but its export directory.

A new runtime is one module that subclasses ``Runner`` and calls ``register_runtime`` (see
``exporters/onnx.py``), imported in ``exporters/__init__.py``. ``open_runner(path)`` asks each registered
runtime whether it recognises ``path`` (its marker file) and falls back to loading a PyTorch model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.models.contract import Cond, SamplingContract


class Runner:
    """What every runtime provides. Subclasses set the attributes in ``__init__`` and implement ``__call__``."""

    runtime: str = ""  # registered runtime name
    contract: SamplingContract
    device: torch.device = torch.device("cpu")
    module: nn.Module | None = None  # the PyTorch module, when there is one (MACs are counted on it)
    params: int | None = None
    size_bytes: int | None = None  # bytes of the weights on disk (or in memory for a PyTorch model)
    recipe: str | None = None  # recipe that produced it, when known
    description: str = ""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError


def graph_inputs(x: torch.Tensor, t, cond: Cond, keys: list[str]) -> list[torch.Tensor]:
    """The positional inputs of an exported denoiser graph: the latent (float32), one float32 timestep per
    row (a scalar ``t`` is broadcast) and the condition tensors in ``keys`` order."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    return [x.float(), t, *[cond[k] for k in keys]]


def numpy_feeds(names, values, wanted=None) -> dict:
    """``{name: contiguous CPU numpy array}`` for a session's inputs (only the ``wanted`` names, if given)."""
    return {n: v.detach().cpu().contiguous().numpy() for n, v in zip(names, values) if wanted is None or n in wanted}


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    detect: Callable[[Path], bool]  # does this directory hold something this runtime runs?
    open: Callable[..., Runner]


RUNTIMES: dict[str, RuntimeSpec] = {}


def register_runtime(name: str, detect: Callable[[Path], bool], open: Callable[..., Runner]) -> None:
    """Make ``open_runner`` recognise a runtime's output directories (``detect``) and open them (``open``)."""
    RUNTIMES[name] = RuntimeSpec(name, detect, open)


def export_meta(d: Path, marker: str) -> dict:
    """The JSON marker of an export directory, or a clear error."""
    p = Path(d) / marker
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DitCompressError(f"{p}: unreadable export metadata ({e}); export again.") from None
    if not isinstance(meta, dict) or "sampling" not in meta:
        raise DitCompressError(f"{p}: does not record its sampling contract (an export from an older version); "
                               f"export again.")
    return meta


def contract_of(meta: dict, where: Path) -> SamplingContract:
    from pydantic import ValidationError

    try:
        return SamplingContract.model_validate(meta["sampling"])
    except ValidationError as e:
        from compress.yamlio import describe_errors

        raise DitCompressError(f"{where}: field 'sampling': {describe_errors(e, meta['sampling'])}.") from None


class TorchRunner(Runner):
    """A PyTorch model in eager mode (its adapter's forward), or ``torch.compile``d with ``compile=True``."""

    runtime = "torch"

    def __init__(self, model: nn.Module, compile: bool = False, recipe: str | None = None,
                 size_bytes: int | None = None):
        from compress.models.adapters import get_adapter
        from compress.models.size import param_count, state_bytes

        self.module = model.eval()
        self.adapter = get_adapter(model)
        self.contract = self.adapter.contract()
        self.call = torch.compile(self.adapter.forward) if compile else self.adapter.forward
        self.device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        self.params = param_count(model)
        self.size_bytes = size_bytes if size_bytes is not None else state_bytes(model)
        self.recipe = recipe
        self.description = "PyTorch" + (" (torch.compile)" if compile else " eager")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.device.type != "cpu":  # the sampler keeps noise and scheduler on the CPU
            out = self.call(x.to(self.device), t.to(self.device), {k: v.to(self.device) for k, v in cond.items()})
            return out.float().cpu()
        return self.call(x, t, cond)


def open_runner(source: str | Path, **options) -> Runner:
    """A runner for an export / engine directory (by its marker), else a PyTorch model loaded from ``source``.

    ``options`` go to the runtime (e.g. ``threads`` for ONNX Runtime).
    """
    p = Path(source)
    if p.is_dir():
        for spec in RUNTIMES.values():
            if spec.detect(p):
                return spec.open(p, **options)
    from compress.sources import load_model

    model = load_model(source)
    recipe, size = None, None
    from compress.models.provenance import provenance

    rec = provenance(model)
    if rec.get("recipe"):
        recipe = rec["recipe"].get("name")
    if p.is_dir() and (p / "model.safetensors").is_file():
        size = (p / "model.safetensors").stat().st_size
    elif p.is_file():
        size = p.stat().st_size
    elif p.is_dir():
        files = [f for d in (p, p / "transformer") if d.is_dir() for f in d.iterdir()
                 if f.suffix in (".safetensors", ".bin") and f.is_file()]
        size = sum(f.stat().st_size for f in files) or None
    else:
        from compress.models.reference import REFERENCES

        if str(source) in REFERENCES:
            size = REFERENCES[str(source)][1].stat().st_size
    return TorchRunner(model, recipe=recipe, size_bytes=size)
