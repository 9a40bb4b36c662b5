"""Artifacts: ``model.safetensors`` + ``manifest.json`` in a directory, written atomically.

Loading rebuilds the source architecture (through the adapter registry), replays the recorded structural
edits (pruned blocks, replaced modules, replaced attention kernels, changed attributes), then loads the weights with strict keys: one
format for pruned, quantized, MoE and linear-attention models alike.

A manifest is untrusted input: it is validated against a schema (unknown keys are errors), its weights
file must be a plain name inside the artifact directory, the architecture it declares is bounds-checked
before anything is allocated, and its edits may only use the operations and attributes the adapters
define. Bit-identical reload holds between processes using the same number of threads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file
from torch import nn

from compress.errors import DitCompressError
from compress.io import ARTIFACT, NEW_FILE_MODE, atomic_directory, write_marker
from compress.models.adapters import adapter_for_architecture, get_adapter
from compress.models.provenance import ATTR, FIELDS, file_sha256, provenance
from compress.models.size import param_count
from compress.models.weights import load_state_dict_strict, read_safetensors

FORMAT = ARTIFACT.format
VERSION = 2  # 2: the sampling contract is recorded
WEIGHTS_FILE = "model.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RemoveBlocks(_Strict):
    op: Literal["remove_blocks"]
    kind: str
    indices: list[int]


class Replace(_Strict):
    op: Literal["replace"]
    path: str = Field(min_length=1)
    spec: dict[str, Any]


class Wrap(_Strict):
    op: Literal["wrap"]
    path: str = Field(min_length=1)
    spec: dict[str, Any]


class SetAttention(_Strict):
    op: Literal["attention"]
    path: str = Field(min_length=1)
    spec: dict[str, Any]


class SetAttr(_Strict):
    op: Literal["set_attr"]
    path: str
    name: str
    value: int | float | bool | str


Edit = Annotated[Union[RemoveBlocks, Replace, Wrap, SetAttention, SetAttr], Field(discriminator="op")]  # noqa: UP007


class WeightsEntry(_Strict):
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    """The schema of ``manifest.json``."""

    format: Literal["dit-compress-artifact"]
    version: Literal[1, 2]
    created: str
    source: dict[str, Any] | None
    architecture: dict[str, Any]
    recipe: dict[str, Any] | None
    passes: list[dict[str, Any]]
    edits: list[Edit]
    sampling: dict[str, Any] | None = None
    params: int = Field(ge=0)
    weights: WeightsEntry


def save(model: nn.Module, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``model`` and its manifest to ``out_dir`` atomically (temp dir + rename).

    ``force`` replaces an existing artifact directory (and only that: any other directory is refused).
    """
    out = Path(out_dir)
    adapter = get_adapter(model)  # records the architecture if nothing has yet
    with atomic_directory(out, (ARTIFACT,), force=force) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, weights)
        os.chmod(weights, NEW_FILE_MODE)  # safetensors writes owner-only 0600
        rec = provenance(model)
        manifest = {
            "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": rec["source"], "architecture": rec["architecture"], "recipe": rec["recipe"],
            "passes": rec["passes"], "edits": rec["edits"], "sampling": adapter.contract().model_dump(mode="json"),
            "params": param_count(model),
            "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": file_sha256(weights)},
        }
        write_marker(tmp, ARTIFACT, manifest)
    return out


def read_manifest(path: str | Path) -> Manifest:
    """The validated manifest of an artifact directory (clear errors for anything else)."""
    d = Path(path)
    mpath = d / ARTIFACT.marker
    if ".partial-" in d.name or ".old-" in d.name:
        raise DitCompressError(f"{d}: an unfinished artifact (its write was interrupted); apply the recipe again.")
    if not d.is_dir():
        raise DitCompressError(f"{d}: no such artifact directory.")
    if not mpath.is_file():
        raise DitCompressError(f"{d}: not a dit-compress artifact (no manifest.json).")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DitCompressError(f"{mpath}: corrupt manifest ({e}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DitCompressError(f"{mpath}: not a dit-compress artifact manifest (format {got!r}).")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        from compress.yamlio import describe_errors

        raise DitCompressError(f"{mpath}: invalid manifest: {describe_errors(e, data)}.") from None


def rebuild(record: dict, state: dict) -> nn.Module:
    """A plain module from a provenance record (architecture + edits + sampling) and a full state dict.

    What ``load`` does after reading the files; training uses it to turn FSDP-sharded weights back into a
    normal module.
    """
    import copy

    from compress.models.contract import SamplingContract

    arch = record["architecture"]
    model = adapter_for_architecture(arch).build(arch)
    adapter = get_adapter(model)
    adapter.replay(record["edits"])
    load_state_dict_strict(model, {k: v.detach().cpu() for k, v in state.items()}, "trained weights")
    object.__setattr__(model, ATTR, copy.deepcopy({k: record.get(k) for k in FIELDS}))
    if record.get("sampling"):
        adapter.set_contract(SamplingContract.model_validate(record["sampling"]))
    return model.eval()


def load(path: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a saved artifact: source architecture + replayed edits + strict weights."""
    d = Path(path)
    m = read_manifest(d)
    weights = d / m.weights.file
    if not weights.is_file() or weights.parent != d:
        raise DitCompressError(f"{d}: manifest present but its weights file {m.weights.file} is missing.")
    if verify and (weights.stat().st_size != m.weights.bytes or file_sha256(weights) != m.weights.sha256):
        raise DitCompressError(f"{weights}: content does not match the manifest's size/sha256; the file is "
                               f"truncated or was modified after saving.")
    arch = m.architecture
    adapter_cls = adapter_for_architecture(arch)
    if adapter_cls is None:
        raise DitCompressError(f"{d / ARTIFACT.marker}: field 'architecture.class': cannot rebuild "
                               f"{arch.get('class')!r}; no registered model family handles it.")
    try:
        adapter_cls.check_architecture(arch)
    except ValueError as e:
        field, _, msg = str(e).partition(": ")
        raise DitCompressError(f"{d / ARTIFACT.marker}: field '{field}': {msg}.") from None
    try:
        model = adapter_cls.build(arch)
    except Exception as e:  # noqa: BLE001 - a config the family's constructor rejects
        raise DitCompressError(f"{d / ARTIFACT.marker}: field 'architecture': the recorded {arch.get('class')} "
                               f"configuration does not build ({str(e).splitlines()[0][:200]}).") from None
    adapter = get_adapter(model)
    adapter.replay([e.model_dump() for e in m.edits], where=str(d / ARTIFACT.marker))
    sd, _ = read_safetensors(weights)
    load_state_dict_strict(model, sd, weights)
    rec = m.model_dump(include=set(FIELDS))
    object.__setattr__(model, ATTR, {k: rec.get(k) for k in FIELDS})
    if m.sampling is not None:
        from compress.models.contract import SamplingContract

        try:
            adapter.set_contract(SamplingContract.model_validate(m.sampling))
        except ValidationError as e:
            from compress.yamlio import describe_errors

            raise DitCompressError(f"{d / ARTIFACT.marker}: field 'sampling': "
                                   f"{describe_errors(e, m.sampling)}.") from None
    return model.eval().requires_grad_(False)
