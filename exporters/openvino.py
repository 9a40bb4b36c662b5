"""OpenVINO: a validated ONNX export converted to OpenVINO IR, and a runner that compiles it for the CPU.

    export_openvino(model, "out/ov")          # PyTorch model -> ONNX (validated) -> model.xml / model.bin
    export_openvino(Path("out/onnx"), "out/ov")  # or from an existing dit-compress ONNX export
    OpenVinoRunner("out/ov", threads=2)       # (x, t, cond) -> prediction, like every runner

Why OpenVINO beside ONNX Runtime: on x86 CPUs it runs the same graphs faster, and it executes this
project's INT8 QDQ layers as integer kernels (the quantization issue measured 1.3x over ONNX Runtime on
the same QDQ export of DiT-B/2). Its CPU plugin defaults to bf16 inference on CPUs with AMX/AVX-512 bf16
(slower and less exact there for these models), so the runner always sets an explicit precision hint:
``f32`` unless the export (or the caller) asks for ``bf16`` / ``f16``.

``quantizer="nncf"`` converts a float model and quantizes the IR with NNCF's post-training INT8
(``nncf.quantize``, ModelType.TRANSFORMER) on the model's own calibration trajectories: the deployable
form of NNCF's quantizer, side by side with this project's (``w8a8-cpu`` exported as QDQ). Its INT8 has no
PyTorch twin, so its gate bounds the error against the float model (``NNCF_TOLERANCE``) instead.

The gate is the one every exporter uses (``exporters.onnx.validate_outputs``): the compiled IR is run on
seeded inputs at three timesteps, both guidance branches, against PyTorch (when exporting a model) or
against ONNX Runtime on the export it was converted from (itself validated against PyTorch when it was
written); a larger error or any non-finite output fails and nothing is left at the destination.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from compress.errors import DitCompressError
from compress.io import ONNX_EXPORT, OPENVINO_EXPORT, atomic_directory, check_output_path, kind_of, write_marker
from compress.nn.quant import under_fake_quant_arithmetic
from exporters.runtime import Runner, contract_of, export_meta, graph_inputs, numpy_feeds, register_runtime

# inference precision hint -> default validation tolerance (relative to the output's max magnitude)
PRECISIONS = {"f32": 1e-4, "bf16": 5e-2, "f16": 1e-2}
FAKE_QUANT_TOLERANCE = 2e-2  # as the ONNX gate: a rounding flipping at a bin edge moves a value by one step
# NNCF INT8 vs the float model: a sanity gate (non-finite or output-sized errors), not a quality bar; measured max
# errors 0.09-0.26 of the output's magnitude on the reference (this project's QDQ: ~1e-2). Quality is bench's job.
NNCF_TOLERANCE = 0.5
QUANTIZERS = ("nncf",)


def require_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise DitCompressError('OpenVINO is not installed: pip install "dit-compress[openvino]".') from None
    return ov


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise DitCompressError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)} (the CPU "
                               f"plugin's inference precision hint).")


def _refuse_cache_policy(sampling: dict) -> None:
    policy = sampling.get("cache")
    if policy:
        raise DitCompressError(
            f"the model samples with a '{policy.get('method')}' step-cache policy, which needs the export's segments "
            f"run step by step; the OpenVINO exporter converts the whole graph and cannot apply it. Export the model "
            f"without its cache pass, or run its segmented ONNX export on ONNX Runtime.")


def compile_ir(xml: Path, precision: str, threads: int | None = None):
    """``model.xml`` compiled for the CPU with an explicit inference precision (and thread count)."""
    ov = require_openvino()
    check_precision(precision)
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    try:
        return core.compile_model(core.read_model(str(xml)), "CPU", config)
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own RuntimeError subclasses
        raise DitCompressError(f"{xml}: OpenVINO cannot load or compile it ({str(e).strip().splitlines()[0][:200]}); "
                               f"the files are damaged or from another exporter. Export again.") from None


def compiled_call(compiled, input_names: list[str], cond_keys: list[str]):
    """A compiled OpenVINO model of a dit-compress export as ``(x, t, cond) -> prediction``."""
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x, t, cond):
        feeds = numpy_feeds(input_names, graph_inputs(x, t, cond, cond_keys))
        return torch.from_numpy(request.infer(feeds)[output].copy())

    return run


def check_quantizer_name(quantizer: str | None) -> None:
    if quantizer is not None and quantizer not in QUANTIZERS:
        raise DitCompressError(f"--quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)}.")


def check_quantizer(quantizer: str | None, source) -> None:
    """``quantizer`` needs a float PyTorch model (it calibrates on the model's trajectories) and NNCF."""
    check_quantizer_name(quantizer)
    if quantizer is None:
        return
    from exporters.onnx import _is_quantized

    if not isinstance(source, nn.Module):
        raise DitCompressError("--quantizer nncf calibrates on the model's own sampling trajectories: give a model or "
                               "artifact, not an ONNX export.")
    if _is_quantized(source):
        raise DitCompressError("--quantizer nncf quantizes a float model; this one already holds quantized layers "
                               "(export it as it is, or give its float source).")
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise DitCompressError('NNCF is not installed: pip install "dit-compress[nncf]".') from None


def nncf_quantize(graph, model: nn.Module, calibration=None, batch: int = 4):
    """NNCF's post-training INT8 (TRANSFORMER preset) of ``graph``, calibrated on ``model``'s trajectories."""
    import nncf

    from compress.calibration import CalibrationConfig, record_trajectories
    from compress.context import RunContext

    rows = record_trajectories(model, calibration or CalibrationConfig(), RunContext(show_progress=False))
    names = [i.get_any_name() for i in graph.inputs]
    data = [numpy_feeds(names, graph_inputs(x, t, cond, names[2:])) for x, t, cond in rows.batches(batch)]
    return nncf.quantize(graph, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(data))


def export_openvino(source: nn.Module | str | Path, out_dir: str | Path, *, precision: str = "f32",
                    force: bool = False, tolerance: float | None = None, console=None,
                    qdq_activations: str = "uint8", source_id: str | None = None,
                    quantizer: str | None = None, calibration=None) -> Path:
    """Write ``out_dir/model.xml`` + ``model.bin`` + ``export.json`` from a model or an ONNX export; atomic.

    ``source`` is a PyTorch model (exported to ONNX first, in a temporary directory, with ``qdq_activations``
    for W8A8 layers) or a dit-compress ONNX export directory. ``precision`` is the inference precision hint
    recorded in ``export.json`` and used by ``OpenVinoRunner`` unless it is given another. ``force``
    replaces an existing OpenVINO export (and nothing else). ``quantizer="nncf"`` quantizes a float model's
    IR with NNCF, calibrated on ``calibration`` (a ``CalibrationConfig``; default: the calibration defaults).
    """
    ov = require_openvino()
    check_precision(precision)
    check_quantizer(quantizer, source)
    from exporters.onnx import OnnxRunner, export_onnx, failed_validation, validate_outputs

    out = Path(out_dir)
    check_output_path(out, (OPENVINO_EXPORT,), force)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dit-compress-ov-") as scratch:
        if isinstance(source, nn.Module):
            from compress.models.adapters import get_adapter

            _refuse_cache_policy(get_adapter(source).contract().model_dump(mode="json"))  # before any export work
            onnx_dir = export_onnx(source, Path(scratch) / "onnx", qdq_activations=qdq_activations, source=source_id)
            meta_in = export_meta(onnx_dir, ONNX_EXPORT.marker)
            reference = under_fake_quant_arithmetic(source, get_adapter(source.eval()).forward)
            against = "PyTorch"
        else:
            onnx_dir = Path(source)
            if kind_of(onnx_dir) is not ONNX_EXPORT:
                raise DitCompressError(f"{onnx_dir}: not a dit-compress ONNX export (no export.json); export a "
                                       f"model or run 'dit-compress export onnx' first.")
            meta_in = export_meta(onnx_dir, ONNX_EXPORT.marker)
            _refuse_cache_policy(meta_in.get("sampling") or {})
            reference = OnnxRunner(onnx_dir)
            against = "ONNX Runtime on the export (validated against PyTorch when written)"
        contract = contract_of(meta_in, onnx_dir / ONNX_EXPORT.marker)
        quantized = (meta_in.get("validation") or {}).get("precision") == "fake-quant" or quantizer is not None
        floor = NNCF_TOLERANCE if quantizer else FAKE_QUANT_TOLERANCE if quantized else 0.0
        tol = tolerance if tolerance is not None else max(PRECISIONS[precision], floor)
        try:
            graph = ov.convert_model(str(onnx_dir / "model.onnx"))
        except Exception as e:  # noqa: BLE001
            raise DitCompressError(f"{onnx_dir / 'model.onnx'}: OpenVINO cannot convert it "
                                   f"({str(e).strip().splitlines()[0][:200]}).") from None
        if quantizer == "nncf":
            graph = nncf_quantize(graph, source, calibration)
        with atomic_directory(out, (OPENVINO_EXPORT,), force=force) as tmp:
            ov.save_model(graph, str(tmp / "model.xml"), compress_to_fp16=False)  # weights stay fp32 on disk
            compiled = compile_ir(tmp / "model.xml", precision)
            names = [i.get_any_name() for i in compiled.inputs]
            if names != meta_in["inputs"]:
                raise DitCompressError(f"{onnx_dir}: the converted graph has inputs {names}, the export records "
                                       f"{meta_in['inputs']}. Nothing was written to {out}.")
            run = compiled_call(compiled, names, meta_in["inputs"][2:])
            report = validate_outputs(run, reference, contract, quantized=quantized, tolerance=tol)
            report |= {"against": against, "inference_precision": precision}
            if quantizer:
                report["precision"] = f"{quantizer} int8"
            if not report["passed"]:
                raise failed_validation(report, f"OpenVINO export ({precision}, vs {against})", out)
            meta = {"inputs": names, "output": meta_in.get("output", "prediction"), "precision": precision,
                    "openvino": ov.__version__.split("-")[0], "converted_from": {k: meta_in.get(k) for k in
                                                                   ("opset", "qdq_layers", "qdq_activations", "log")},
                    "source": meta_in.get("source") or source_id, "recipe": meta_in.get("recipe"),
                    "params": meta_in.get("params"), "sampling": meta_in["sampling"], "validation": report,
                    "quantizer": None if quantizer is None else {"name": quantizer,
                                                                 "version": __import__(quantizer).__version__},
                    "seconds": round(time.perf_counter() - t0, 1)}
            write_marker(tmp, OPENVINO_EXPORT, meta)
    if console is not None:
        console.print(f"exported {out / 'model.xml'} (OpenVINO {meta['openvino']}, {precision}): max rel err "
                      f"{report['max_rel_err']:.2e} vs {against} (tolerance {tol:.0e}) over {len(report['cases'])} "
                      f"cases")
    return out


class OpenVinoRunner(Runner):
    """An OpenVINO export compiled for the CPU, at the export's precision hint unless ``precision`` is given."""

    runtime = "openvino"

    def __init__(self, export_dir: str | Path, threads: int | None = None, precision: str | None = None):
        d = Path(export_dir)
        self.meta = export_meta(d, OPENVINO_EXPORT.marker)
        self.contract = contract_of(self.meta, d / OPENVINO_EXPORT.marker)
        self.precision = precision or self.meta.get("precision", "f32")
        compiled = compile_ir(d / "model.xml", self.precision, threads)
        names = [i.get_any_name() for i in compiled.inputs]
        if names != self.meta["inputs"]:
            raise DitCompressError(f"{d}: model.xml has inputs {names} but export.json records {self.meta['inputs']}; "
                                   f"the files do not belong together. Export again.")
        latent = compiled.inputs[0].get_partial_shape()
        dims = [int(v.get_length()) if v.is_static else None for v in list(latent)[1:]]
        if dims != list(self.contract.latent_shape):
            raise DitCompressError(f"{d}: model.xml takes latents {dims} but export.json records "
                                   f"{self.contract.latent_shape}; the files do not belong together. Export again.")
        self._run = compiled_call(compiled, names, names[2:])
        self.params = self.meta.get("params")
        self.size_bytes = sum((d / f).stat().st_size for f in ("model.xml", "model.bin") if (d / f).is_file())
        self.recipe = self.meta.get("recipe")
        q = self.meta.get("quantizer")
        self.description = (f"OpenVINO {self.meta.get('openvino', '')} CPU ({self.precision}"
                            f"{', ' + q['name'].upper() + ' INT8' if q else ''})")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self._run(x, t, cond)


register_runtime("openvino", detect=lambda d: kind_of(d) is OPENVINO_EXPORT, open=OpenVinoRunner)
