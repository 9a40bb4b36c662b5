"""ONNX export of a (compressed) denoiser, with validation against PyTorch as a hard gate.

    export_onnx(model, "out/onnx")  # -> out/onnx/model.onnx (+ model.onnx.data), export.json

The graph has the denoiser's real signature: ``latent``, ``timestep`` and the condition tensors of the
family (``y`` class labels; ``encoder_hidden_states`` / ``pooled_projections`` / ``guidance`` for text
models), every one with a dynamic batch axis; CFG batching is left to the caller. Weights go to an
external-data file, so models over the 2 GB protobuf limit export too.

Validation runs ONNX Runtime and PyTorch on seeded inputs at several timesteps, for the conditional and
the unconditional branch, and reports the max absolute and relative error. Beyond the tolerance, or with
any non-finite output on either side, the export fails and nothing is left at the destination (it is
written to a temporary directory first).

``export.json`` records the sampling contract, so ``OnnxRunner`` (registered as the ``onnxruntime``
runtime) samples and benchmarks the export without its PyTorch source.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.io import ONNX_EXPORT, atomic_directory, kind_of, write_marker
from compress.models.adapters import get_adapter
from compress.models.size import param_count
from compress.nn.quant import under_fake_quant_arithmetic
from exporters.qdq import lower_for_export, qdq_translations, weight_forms
from exporters.runtime import Runner, contract_of, export_meta, graph_inputs, numpy_feeds, register_runtime
from exporters.segments import OrtSegments, check_segments, export_segments, refuse_policy

MAX_CONDS = 4


class Denoiser(nn.Module):
    """``(latent, timestep, *condition tensors) -> prediction`` around any family's adapter."""

    def __init__(self, model: nn.Module, cond_keys: list[str]):
        super().__init__()
        if len(cond_keys) > MAX_CONDS:
            raise ValueError(f"at most {MAX_CONDS} condition tensors, got {cond_keys}")
        self.model = model
        self.cond_keys = list(cond_keys)

    def forward(self, latent, timestep, c0=None, c1=None, c2=None, c3=None):
        conds = dict(zip(self.cond_keys, (c0, c1, c2, c3)))
        return get_adapter(self.model).forward(latent, timestep, conds)


def _inputs(contract, batch: int, t: float, seed: int, null: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *contract.latent_shape), generator=g)
    cond = contract.example_cond(batch, g)
    if null:
        cond = contract.null_cond(cond)
    return x, torch.full((batch,), float(t)), cond


def fix_noop_squeeze(path: Path) -> int:
    """Turn Squeeze nodes on a dimension that is not 1 into Identity; returns how many were rewritten.

    ``x.squeeze(1)`` on a dimension of size > 1 is a no-op in PyTorch (diffusers' PixArt does this), but the
    exporter emits an unconditional Squeeze that ONNX shape inference rejects.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    wanted = {n.input[1] for n in m.graph.node if n.op_type == "Squeeze" and len(n.input) > 1}
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer
              if i.name in wanted and i.data_location != onnx.TensorProto.EXTERNAL}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.output[0] in wanted:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    fixed = 0
    for n in m.graph.node:
        if n.op_type != "Squeeze" or len(n.input) < 2 or n.input[1] not in consts or n.input[0] not in shapes:
            continue
        shape, axes = shapes[n.input[0]], consts[n.input[1]].reshape(-1).tolist()
        if all(-len(shape) <= a < len(shape) and shape[a] not in (None, 1) for a in axes):
            n.op_type = "Identity"
            del n.input[1:]
            fixed += 1
    if fixed:
        onnx.save(m, str(path))
    return fixed


def _is_quantized(model: nn.Module) -> bool:
    from compress.nn.quant import QuantLinear, WeightOnlyLinear

    return any(isinstance(m, (QuantLinear, WeightOnlyLinear)) for m in model.modules())


def validate_outputs(run: Callable, reference: Callable, contract, *, quantized: bool, tolerance: float | None = None,
                     timesteps=(50.0, 500.0, 950.0), batch: int = 2, seed: int = 0) -> dict:
    """``run`` vs ``reference`` (both ``(x, t, cond) -> prediction``) on seeded inputs at several timesteps, for
    the conditional and the unconditional branch; returns the report (``passed`` is the gate).

    Every exporter's gate: a non-finite or mis-shaped output fails outright, whatever the tolerance.
    """
    # fp32: tight; fake-quant models: a rounding that flips at a bin edge moves one value by one step
    tol = tolerance if tolerance is not None else (2e-2 if quantized else 1e-4)
    cases, worst = [], 0.0
    for t in timesteps:
        for null in (False, True):
            x, tt, cond = _inputs(contract, batch, t, seed, null)
            with torch.no_grad():
                ref = reference(x, tt, cond)
            out = run(x, tt, cond)
            case = {"timestep": t, "branch": "uncond" if null else "cond"}
            if out.shape != ref.shape or not out.numel():
                finite = False
                case.update(error=f"output shape {tuple(out.shape)}, reference {tuple(ref.shape)}")
            else:
                finite = bool(torch.isfinite(out).all() and torch.isfinite(ref).all())
            if not finite:  # a max over NaN would drop it: non-finite or empty output fails outright
                case.update(max_abs_err=None, max_rel_err=None, finite=False)
                worst = float("inf")
            else:
                abs_err = float((out - ref).abs().max())
                rel = abs_err / max(float(ref.abs().max()), 1e-12)
                worst = max(worst, rel)
                case.update(max_abs_err=abs_err, max_rel_err=rel, finite=True)
            cases.append(case)
    passed = worst <= tol and all(c["finite"] for c in cases)
    return {"passed": passed, "tolerance_rel": tol, "max_rel_err": worst if passed or worst != float("inf") else None,
            "precision": "fake-quant" if quantized else "fp32", "cases": cases}


def failed_validation(report: dict, what: str, out: Path) -> DitCompressError:
    """The one-paragraph error for a failed ``validate_outputs`` report."""
    lines = "; ".join(
        f"t={c['timestep']:.0f} {c['branch']}: " + (f"max abs {c['max_abs_err']:.3g}, rel {c['max_rel_err']:.3g}"
                                                    if c["finite"] else c.get("error", "non-finite output"))
        for c in report["cases"])
    return DitCompressError(f"{what} failed validation (tolerance {report['tolerance_rel']:.1g} relative, "
                            f"{report['precision']}): {lines}. Nothing was written to {out}.")


def session_call(sess, keys: list[str]) -> Callable:
    """An ONNX Runtime session of a dit-compress export as ``(x, t, cond) -> prediction``."""
    names = [i.name for i in sess.get_inputs()]

    def run(x, t, cond):
        return torch.from_numpy(sess.run(None, numpy_feeds(names, graph_inputs(x, t, cond, keys)))[0])

    return run


def validate_onnx(onnx_path: Path, model: nn.Module, *, timesteps=(50.0, 500.0, 950.0), batch: int = 2,
                  seed: int = 0, tolerance: float | None = None) -> dict:
    """ONNX Runtime vs PyTorch on seeded inputs; returns the report (``passed`` is the gate)."""
    import onnxruntime as ort

    adapter = get_adapter(model)
    contract = adapter.contract()
    keys = sorted(c.name for c in contract.conditions)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = under_fake_quant_arithmetic(model, adapter.forward)  # what the graph's QDQ ops stand for
    report = validate_outputs(session_call(sess, keys), reference, contract, quantized=_is_quantized(model),
                              tolerance=tolerance, timesteps=timesteps, batch=batch, seed=seed)
    return {**report, "provider": sess.get_providers()[0]}


def export_onnx(model: nn.Module, out_dir: str | Path, *, opset: int = 20, force: bool = False,
                tolerance: float | None = None, console=None, qdq_activations: str = "uint8",
                qdq_weights: str = "auto", source: str | None = None) -> Path:
    """Export ``model``'s denoiser to ``out_dir/model.onnx`` and validate it; atomic, fails loudly.

    INT8 W8A8 layers go out as QDQ with ``qdq_activations`` "uint8" (zero point 128: ONNX Runtime on x86)
    or "int8" (zero point 0: TensorRT), and ``qdq_weights`` "int8", or "uint8" (zero point 128: ONNX Runtime's
    U8U8 kernels, exact on x86 CPUs without VNNI); "auto" is int8 except for 8-bit weights with uint8
    activations on a host CPU without VNNI (``qdq_weight_dtype``). They are swapped for explicit export modules
    on a copy, ``model``
    is never modified. ``source`` (a model name or artifact path) is recorded for the reader's information;
    the sampling contract in ``export.json`` is what runners use. ``force`` replaces an existing ONNX export
    (and nothing else).
    """
    if qdq_activations not in ("uint8", "int8"):
        raise DitCompressError(f"qdq_activations must be 'uint8' (ONNX Runtime CPU) or 'int8' (TensorRT), "
                               f"not {qdq_activations!r}.")
    if qdq_weights not in ("auto", "int8", "uint8"):
        raise DitCompressError(f"qdq_weights must be 'auto', 'int8' or 'uint8' (ONNX Runtime on x86 CPUs without "
                               f"VNNI), not {qdq_weights!r}.")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise DitCompressError('ONNX export needs onnx, onnxscript and onnxruntime: pip install "dit-compress[onnx]".'
                               ) from None
    from compress.io import check_output_path

    out = Path(out_dir)
    check_output_path(out, (ONNX_EXPORT,), force)
    model = model.eval()
    adapter = get_adapter(model)
    contract = adapter.contract()
    refuse_policy(contract)
    traced, n_qdq = lower_for_export(model, qdq_activations, qdq_weights)
    x, t, cond = _inputs(contract, 2, 500.0, 0)
    keys = sorted(cond)
    wrapper = Denoiser(traced, keys).eval()
    args = (x, t, *[cond[k] for k in keys])
    names = ["latent", "timestep", *keys]
    batch = torch.export.Dim("batch", min=1, max=4096)
    dyn = tuple({0: batch} for _ in args)
    t0 = time.perf_counter()
    log = []
    # torch.onnx logs one warning per torchvision op it cannot register; torchvision is never needed here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with atomic_directory(out, (ONNX_EXPORT,), force=force) as tmp:
        path = tmp / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                                         output_names=["prediction"], dynamic_shapes=dyn, external_data=True,
                                         optimize=True, verbose=False,
                                         custom_translation_table=qdq_translations() if n_qdq else None)
                prog.save(str(path), external_data=True)
                log.append(f"torch.onnx dynamo exporter, opset {opset}, graph optimised")
                if n_qdq:
                    log.append(f"{n_qdq} INT8 layers as QuantizeLinear/DequantizeLinear ({qdq_activations} "
                               f"activations, per-channel weights: {weight_forms(traced)}); other quantized "
                               f"layers as fake-quant float ops")
                if n_fixed := fix_noop_squeeze(path):
                    log.append(f"rewrote {n_fixed} no-op Squeeze node(s) to Identity")
            except Exception as e:  # noqa: BLE001 - fall back, and say so
                log.append(f"dynamo exporter failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                           f"fell back to the TorchScript exporter (opset 17)")
                for f in tmp.iterdir():
                    f.unlink()
                torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17, input_names=names,
                                  output_names=["prediction"],
                                  dynamic_axes={n: {0: "batch"} for n in [*names, "prediction"]})
        report = validate_onnx(path, model, tolerance=tolerance)
        if not report["passed"]:
            raise failed_validation(report, f"ONNX export of {type(model).__name__} (ONNX Runtime vs PyTorch)", out)
        segments = None
        if contract.cache is not None:  # the policy's pieces, checked by sampling with it in both runtimes
            import onnxruntime as ort

            segments = export_segments(traced, contract, keys, tmp, opset)
            depth = len(adapter.blocks())
            ort_segs = OrtSegments(tmp, segments, keys, lambda p: ort.InferenceSession(
                str(p), providers=["CPUExecutionProvider"]))
            check = check_segments(model, contract, ort_segs, depth, 1e-3 if report["precision"] == "fp32" else 5e-2)
            report["cache"] = check
            if not check["passed"]:
                raise DitCompressError(
                    f"segmented ONNX export for the '{contract.cache.method}' cache policy failed validation: sampling "
                    f"with the policy, ONNX Runtime {'made the same' if check['same_decisions'] else 'made other'} "
                    f"skip decisions and differs by {check['max_rel_err']:.3g} relative (tolerance "
                    f"{check['tolerance_rel']:.0e}). Nothing was written to {out}.")
            log.append(f"{len(segments)} segments for the {contract.cache.method} cache policy (embedding, block "
                       f"ranges, final layer), validated by sampling with the policy")
        meta = {"inputs": names, "output": "prediction", "segments": segments, "dynamic": {"batch": True, "resolution": False,
                                                                     "resolution_reason": "position embeddings are "
                                                                     "fixed-size tables in every supported family"},
                "opset": opset, "log": log, "qdq_layers": n_qdq,
                "qdq_activations": qdq_activations if n_qdq else None,
                "qdq_weights": weight_forms(traced) if n_qdq else None, "source": source,
                "recipe": (provenance_recipe(model) or None), "params": param_count(model),
                "sampling": contract.model_dump(mode="json"), "validation": report,
                "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
        write_marker(tmp, ONNX_EXPORT, meta)
    if console is not None:
        console.print(f"exported {out / 'model.onnx'}: max rel err {report['max_rel_err']:.2e} "
                      f"(tolerance {report['tolerance_rel']:.0e}) over {len(report['cases'])} cases; {log[0]}")
    return out


def provenance_recipe(model: nn.Module) -> str | None:
    """Name of the recipe that produced ``model`` (None for a source model)."""
    from compress.models.provenance import provenance

    rec = provenance(model).get("recipe")
    return rec.get("name") if isinstance(rec, dict) else None


class OnnxRunner(Runner):
    """An exported ``model.onnx`` on ONNX Runtime (CPU, or the CUDA / TensorRT providers where installed)."""

    runtime = "onnxruntime"

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        d = Path(export_dir)
        self.meta = export_meta(d, ONNX_EXPORT.marker)
        self.contract = contract_of(self.meta, d / ONNX_EXPORT.marker)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(d / "model.onnx"), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DitCompressError(f"{d / 'model.onnx'}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                   f"the file is damaged or from another exporter. Export again.") from None
        self.names = [i.name for i in self.session.get_inputs()]
        if self.names != self.meta["inputs"]:
            raise DitCompressError(f"{d}: model.onnx has inputs {self.names} but export.json records "
                                   f"{self.meta['inputs']}; the files do not belong together. Export again.")
        latent = self.session.get_inputs()[0].shape[1:]
        if [d for d in latent] != list(self.contract.latent_shape):
            raise DitCompressError(f"{d}: model.onnx takes latents {latent} but export.json records "
                                   f"{self.contract.latent_shape}; the files do not belong together. Export again.")
        self.cond_keys = self.meta["inputs"][2:]
        self._run = session_call(self.session, self.cond_keys)
        self.provider = self.session.get_providers()[0]  # the one actually used (see ENVIRONMENT notes)
        self.segments = None
        if self.meta.get("segments"):  # a segmented export: the runner applies the cache policy
            self.segments = OrtSegments(d, self.meta["segments"], self.cond_keys, lambda p: ort.InferenceSession(
                str(p), options, providers=providers or ["CPUExecutionProvider"]))
        self.params = self.meta.get("params")
        self.size_bytes = sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))
        self.recipe = self.meta.get("recipe")
        self.description = f"ONNX Runtime ({self.provider})"

    def cached_call(self, contract):
        """The call for one sampling run under ``contract.cache``, through the export's segments."""
        if self.segments is None:
            raise DitCompressError("this ONNX export has no segments, so ONNX Runtime cannot apply the "
                                   f"'{contract.cache.method}' cache policy; export the artifact that carries it.")
        depth = max(d["stop"] for d in self.meta["segments"])
        return self.segments.cached_call(contract, depth)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self._run(x, t, cond)


register_runtime("onnxruntime", detect=lambda d: kind_of(d) is ONNX_EXPORT, open=OnnxRunner)
