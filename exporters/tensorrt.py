"""TensorRT engines from a validated ONNX export, built with the TensorRT Python API (no trtexec).

    build_engine("out/onnx", "out/trt", precision="fp16", batch=(1, 4, 16))

What needs TensorRT itself (parsing, building, running) is confined to ``build_engine`` and
``TensorRTRunner``. Everything else is plain functions with tests: optimisation-profile shapes from
the ONNX inputs, the precision plan (builder flags or strongly typed, checked against the graph's
QDQ nodes and the TensorRT version), the engine cache key and the metadata saved beside the engine.

**Untested in CI**: TensorRT is not installable on the machines this project is built on (its PyPI
packages fetch the real wheels from NVIDIA's index). Install it with ``pip install
"dit-compress[tensorrt]"`` on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compress.errors import DitCompressError
from compress.io import ONNX_EXPORT, TRT_ENGINE, atomic_directory, atomic_write_bytes, kind_of, write_marker
from compress.models.provenance import file_sha256
from exporters.runtime import Runner, contract_of, export_meta, graph_inputs, register_runtime

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
_ONNX_INT8 = {2, 3}  # TensorProto UINT8, INT8
_ONNX_FP8 = {17, 18, 19, 20}  # FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise DitCompressError(
            'TensorRT is not installed. Install it on a machine with an NVIDIA GPU: pip install "dit-compress[tensorrt]" '
            "(its wheels come from NVIDIA's package index). The ONNX export (dit-compress export onnx) runs on "
            "TensorRT through ONNX Runtime's TensorRT execution provider as well.") from None
    return trt


# --- plain logic (tested without TensorRT) ----------------------------------------------------------------

def onnx_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """Input name -> shape, symbolic dimensions as their names (e.g. ``['batch', 4, 32, 32]``)."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    init = {i.name for i in g.initializer}
    out = {}
    for i in g.input:
        if i.name in init:
            continue
        dims = i.type.tensor_type.shape.dim
        out[i.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def profile_shapes(inputs: dict[str, list[int | str]], batch: tuple[int, int, int]) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes per input for one optimisation profile over the batch axis.

    Every dimension other than the batch must be static: the export records why resolution is fixed.
    """
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise DitCompressError(f"batch profile {batch}: need 1 <= min <= opt <= max.")
    shapes = {}
    for name, dims in inputs.items():
        if not dims:  # a scalar input
            shapes[name] = [[], [], []]
            continue
        rest = dims[1:]
        bad = [d for d in rest if not isinstance(d, int) or d <= 0]
        if bad:
            raise DitCompressError(f"input {name!r} has dynamic non-batch dimensions {dims}; a profile needs them "
                                   f"fixed (re-export at the resolution you deploy).")
        shapes[name] = [[b, *rest] for b in (lo, opt, hi)]
    return shapes


def graph_quantization(onnx_path: Path) -> dict[str, object]:
    """What the graph's QuantizeLinear nodes produce: {'int8': bool, 'fp8': bool, 'zero_points': set}."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    consts = {i.name: i for i in g.initializer}
    for n in g.node:  # zero points are often Constant nodes after export
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    found = {"int8": False, "fp8": False, "uint8_activations": False}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[2] not in consts:
            continue
        zp = consts[n.input[2]]
        if zp.data_type in _ONNX_FP8:
            found["fp8"] = True
        elif zp.data_type in _ONNX_INT8:
            found["int8"] = True
            if zp.data_type == 2 or numpy_helper.to_array(zp).any():
                found["uint8_activations"] = True
    return found


@dataclass
class BuildPlan:
    """How the engine is built: builder precision flags, or strongly typed (types taken from the graph)."""

    precision: str
    strongly_typed: bool
    flags: list[str] = field(default_factory=list)  # names of trt.BuilderFlag members


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise DitCompressError(f"cannot read the TensorRT version {version!r}.") from None


def plan_precision(precision: str, quant: dict, trt_version: str, strongly_typed: bool = False) -> BuildPlan:
    """Check ``precision`` against the graph and TensorRT version; choose builder flags.

    INT8 and FP8 come only from explicit QDQ in the graph (TensorRT 10 dropped implicit INT8
    calibration), with symmetric int8 zero points; the layers around them run in FP16.
    """
    if precision not in PRECISIONS:
        raise DitCompressError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    major = _major(trt_version)
    if quant.get("uint8_activations"):
        raise DitCompressError("the ONNX graph quantizes activations to uint8 with a zero point (ONNX Runtime's CPU "
                               "form); TensorRT needs symmetric int8 QDQ: re-export with --qdq-activations int8.")
    if precision == "int8" and not quant.get("int8"):
        raise DitCompressError("precision int8 needs an ONNX export with INT8 QDQ nodes: apply a W8A8 recipe (e.g. "
                               "w8a8-int8) and export that artifact.")
    if precision == "fp8" and not quant.get("fp8"):
        raise DitCompressError("precision fp8 needs an ONNX export with FP8 QDQ nodes.")
    if precision == "fp8" and major < 9:
        raise DitCompressError(f"FP8 engines need TensorRT 9 or newer (found {trt_version}).")
    if precision == "bf16" and major < 9:
        raise DitCompressError(f"BF16 engines need TensorRT 9 or newer (found {trt_version}).")
    if strongly_typed:
        if major < 10:
            raise DitCompressError(f"strongly typed networks need TensorRT 10 or newer (found {trt_version}).")
        return BuildPlan(precision, True, [])
    flags = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]
    if quant.get("int8") and "INT8" not in flags:
        flags.append("INT8")  # QDQ nodes in a weakly typed network need the INT8 flag to be honoured
    if quant.get("fp8") and "FP8" not in flags:
        flags.append("FP8")
    return BuildPlan(precision, False, flags)


def engine_cache_key(onnx_digest: str, plan: BuildPlan, shapes: dict, trt_version: str, device: str) -> str:
    """Engines are specific to the graph, build settings, TensorRT version and GPU: a change in any rebuilds."""
    blob = json.dumps({"onnx": onnx_digest, "plan": asdict(plan), "shapes": shapes, "trt": trt_version,
                       "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_metadata(export_meta: dict, plan: BuildPlan, shapes: dict, trt_version: str, device: str, key: str,
                    seconds: float) -> dict:
    """What ``engine.json`` records beside the engine (the export's sampling contract included)."""
    return {"inputs": export_meta["inputs"], "output": export_meta["output"], "sampling": export_meta.get("sampling"),
            "source": export_meta.get("source"), "recipe": export_meta.get("recipe"),
            "params": export_meta.get("params"), "precision": plan.precision, "strongly_typed": plan.strongly_typed,
            "builder_flags": plan.flags, "profiles": [shapes], "tensorrt": trt_version, "gpu": device,
            "cache_key": key, "build_seconds": round(seconds, 1)}


# --- TensorRT itself ----------------------------------------------------------------------------------------

def build_engine(export_dir: str | Path, out_dir: str | Path, *, precision: str = "fp16",
                 batch: tuple[int, int, int] = (1, 4, 16), strongly_typed: bool = False, workspace_gb: float = 8.0,
                 timing_cache: str | Path | None = None, force: bool = False) -> Path:
    """Build ``out_dir/model.engine`` (+ ``engine.json``) from a dit-compress ONNX export; cached by key."""
    export_dir, out = Path(export_dir), Path(out_dir)
    if kind_of(export_dir) is not ONNX_EXPORT:
        raise DitCompressError(f"{export_dir}: not a dit-compress ONNX export (no export.json); run "
                               f"'dit-compress export onnx' first.")
    meta_in = export_meta(export_dir, ONNX_EXPORT.marker)
    policy = (meta_in.get("sampling") or {}).get("cache")
    if policy:
        raise DitCompressError(f"{export_dir}: the export samples with a '{policy.get('method')}' step-cache policy, "
                               f"which needs its segments run step by step; this TensorRT builder makes one engine "
                               f"of the whole graph and cannot apply it. Build from an export without the cache "
                               f"pass (ONNX Runtime runs the segmented export).")
    onnx_path = export_dir / "model.onnx"
    trt = require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise DitCompressError("building a TensorRT engine needs a CUDA GPU; none is visible.")
    device = torch.cuda.get_device_name()
    plan = plan_precision(precision, graph_quantization(onnx_path), trt.__version__, strongly_typed)
    shapes = profile_shapes(onnx_inputs(onnx_path), batch)
    key = engine_cache_key(file_sha256(*export_dir.glob("model.onnx*")), plan, shapes, trt.__version__, device)
    if kind_of(out) is TRT_ENGINE:
        old = json.loads((out / "engine.json").read_text())
        if old.get("cache_key") == key and (out / "model.engine").is_file():
            return out  # same graph, settings, TensorRT and GPU: reuse
        if not force:
            raise DitCompressError(f"{out}: exists with a different engine; pass --force to rebuild.")
    from compress.io import check_output_path

    check_output_path(out, (TRT_ENGINE,), force)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DitCompressError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for f in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DitCompressError(f"TensorRT could not build an engine from {onnx_path} ({plan}); see its log above.")
    seconds = time.perf_counter() - t0
    with atomic_directory(out, (TRT_ENGINE,), force=force) as tmp:
        (tmp / "model.engine").write_bytes(bytes(serialized))
        write_marker(tmp, TRT_ENGINE, engine_metadata(meta_in, plan, shapes, trt.__version__, device, key, seconds))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return out


class TensorRTRunner(Runner):
    """A built engine as ``(x, t, cond) -> prediction`` on CUDA tensors (the same interface as the others)."""

    runtime = "tensorrt"

    def __init__(self, engine_dir: str | Path):
        d = Path(engine_dir)
        self.meta = export_meta(d, TRT_ENGINE.marker)
        self.contract = contract_of(self.meta, d / TRT_ENGINE.marker)
        trt = require_tensorrt()
        import torch

        self.params, self.recipe = self.meta.get("params"), self.meta.get("recipe")
        self.size_bytes = (d / "model.engine").stat().st_size
        self.description = f"TensorRT {self.meta.get('tensorrt')} ({self.meta.get('precision')})"
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((d / "model.engine").read_bytes())
        if self.engine is None:
            raise DitCompressError(f"{d}: the engine does not load with this TensorRT/GPU ({self.meta.get('gpu')}, "
                                   f"TensorRT {self.meta.get('tensorrt')}); rebuild it here.")
        self.context = self.engine.create_execution_context()
        self.cond_keys = self.meta["inputs"][2:]
        self.torch = torch

    def __call__(self, x, t, cond):
        torch = self.torch
        feeds = dict(zip(self.meta["inputs"], graph_inputs(x, t, cond, self.cond_keys)))
        keep = []
        for name, v in feeds.items():
            v = v.cuda().contiguous()
            keep.append(v)
            self.context.set_input_shape(name, tuple(v.shape))
            self.context.set_tensor_address(name, v.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.meta["output"])), device="cuda")
        self.context.set_tensor_address(self.meta["output"], out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise DitCompressError("TensorRT execution failed.")
        torch.cuda.current_stream().synchronize()
        return out.to(x.device)


register_runtime("tensorrt", detect=lambda d: kind_of(d) is TRT_ENGINE, open=TensorRTRunner)
