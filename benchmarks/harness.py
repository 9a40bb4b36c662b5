"""The benchmark harness: variants of one source model, compared on identical seeds, labels and steps.

    from benchmarks.harness import BenchConfig, Variant, load_suite, run_bench
    baseline, variants, config = load_suite("benchmarks/suites/reference.yaml")
    report = run_bench(baseline, variants, config, Path("benchmarks/results/reference"), console=Console())

or ``python -m benchmarks.harness SUITE.yaml OUT_DIR``.

Quality: every variant samples ``config.samples`` images from the same seeded noise and balanced labels
(its own step count); FD and class accuracy come from the bundled digits evaluator when the model is of
the reference family, PSNR / SSIM compare each variant's samples with the baseline's. Speed: one
transformer call at a fixed batch, timed interleaved across variants (see ``benchmarks.speed``).
Outputs in ``out_dir``: ``report.json``, ``report.md``, ``pareto.png`` and ``grid_<name>.png`` per variant.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.models.reference import REFERENCE_CFG

from benchmarks import report as rep
from benchmarks import speed as spd


@dataclass
class Variant:
    name: str
    model: torch.nn.Module  # in eval mode
    recipe: str | None = None  # recipe name that produced it (None for the source)
    steps: int | None = None  # sampling steps for this variant (None -> suite default); few-step students use fewer
    size_bytes: int | None = None  # size on disk of its weights file if it has one, else from parameters+buffers
    denoiser: Callable | None = None  # optional (x, t, cond) -> out runner replacing the PyTorch call (ONNX Runtime etc.)


@dataclass
class BenchConfig:
    samples: int = 200
    steps: int = 50
    cfg_scale: float = REFERENCE_CFG
    seed: int = 0
    sampler: str = "default"
    speed_batch: int = 8
    warmup: int = 3
    repeats: int = 10
    quality: bool = True
    speed: bool = True
    grid: bool = True


PEAK_MEM_NOTE_CPU = ("Peak memory is the peak resident set size (RSS) of the whole benchmark process while that "
                     "variant's transformer calls ran (VmHWM, reset before each call): it includes Python, torch and "
                     "every loaded model, so compare differences between rows rather than absolute values.")
PEAK_MEM_NOTE_CUDA = "Peak memory is torch.cuda.max_memory_allocated during that variant's transformer calls."
REFERENCE_FAMILY = (10, (1, 8, 8))  # num_classes, latent_shape of the bundled digits model family


def safe_name(name: str) -> str:
    """A file-name-safe form of a variant name (``DiT-B/2 w8`` -> ``DiT-B_2_w8``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "variant"


def is_reference_family(adapter) -> bool:
    return (adapter.num_classes, tuple(adapter.latent_shape)) == REFERENCE_FAMILY


def machine_info(devices: set[torch.device]) -> dict:
    cuda = next((d for d in devices if d.type == "cuda"), None)
    device = torch.cuda.get_device_name(cuda) if cuda is not None else "cpu"
    cpu = platform.processor() or platform.machine()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": device, "load_avg_at_start": load,
    }
    info["summary"] = (f"{device if cuda is not None else cpu} ({os.cpu_count()} cpu, {torch.get_num_threads()} torch "
                       f"threads), torch {torch.__version__}")
    return info


def _finite(x: float | None, nd: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _quality_of(v: Variant, adapter, s, base_images: torch.Tensor | None) -> dict:
    """FD / class accuracy (digits family) and PSNR / SSIM against the baseline's samples."""
    q = {"fd": None, "class_acc": None, "psnr_db": None, "ssim": None, "fd_to_source": None}
    images = s.images.detach().float().cpu()
    pixels = is_reference_family(adapter)
    if pixels and s.labels is not None and len(images) >= 2:
        from compress.metrics import reference_quality

        r = reference_quality(images, s.labels)
        q["fd"], q["class_acc"] = _finite(r["fd"], 5), _finite(r["class_acc"], 5)
    if base_images is not None and base_images.shape == images.shape:
        from compress.metrics import psnr, ssim

        if pixels:  # images in [-1, 1], compared as they are saved and scored
            a, b, data_range = images.clamp(-1, 1), base_images.clamp(-1, 1), 2.0
        else:  # latents: unclamped, peak-to-peak range of the baseline's latents
            a, b = images, base_images
            data_range = float(b.max() - b.min()) or 1.0
        q["psnr_db"] = _finite(psnr(a, b, data_range), 3)
        if a.dim() == 4 and min(a.shape[-2:]) >= 3:  # image-shaped latents only
            q["ssim"] = _finite(ssim(a, b, data_range), 5)
        if pixels and len(a) >= 2:  # distribution-level fidelity: FD between variant and source samples
            from compress.metrics import evaluator_features, frechet_distance

            q["fd_to_source"] = _finite(frechet_distance(evaluator_features(a), evaluator_features(b)), 5)
    return q


def _sampling_call(v: Variant, adapter) -> Callable | None:
    """The variant's denoiser; for a PyTorch model off the CPU, a call that moves inputs there and back.

    The sampler keeps its noise and scheduler on the CPU, so an accelerator-resident model needs this.
    """
    if v.denoiser is not None:
        return v.denoiser
    device = spd.model_device(v.model)
    if device.type == "cpu":
        return None

    def call(x, t, cond):
        out = adapter.forward(x.to(device), t.to(device), {k: c.to(device) for k, c in cond.items()})
        return out.float().cpu()

    return call


def run_bench(baseline: Variant, variants: list[Variant], config: BenchConfig, out_dir: Path,
              console=None) -> dict:
    """Benchmark ``baseline`` (the source, speed-up 1.0) and ``variants``; write and return the report.

    Every file in ``out_dir`` is written atomically. Metrics that do not apply or were not run are None.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from compress.evaluation import generate
    from compress.viz import save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    allv = [baseline, *variants]
    names = [v.name for v in allv]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DitCompressError(f"benchmark variants must have distinct names; {', '.join(map(repr, dupes))} "
                               f"appear more than once (give each a 'name').")
    adapters = {v.name: get_adapter(v.model) for v in allv}
    for v in allv:
        v.model.eval()
    guided = config.cfg_scale != 1.0
    steps = {v.name: v.steps or config.steps for v in allv}
    nfe = {v.name: steps[v.name] * (2 if guided else 1) for v in allv}
    devices = {spd.model_device(v.model) for v in allv}

    quality: dict[str, dict] = {v.name: {"fd": None, "class_acc": None, "psnr_db": None, "ssim": None,
                                         "fd_to_source": None} for v in allv}
    speed: dict[str, dict] = {v.name: {"ms_per_call": None, "p90_ms_per_call": None, "ms_per_image": None,
                                       "images_per_s": None, "speedup": None, "peak_mem_mb": None} for v in allv}
    grids: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

    if config.quality:
        base_images = None
        with Progress(*columns, console=console, transient=True) as bar:
            tasks = {v.name: bar.add_task(f"sampling {v.name} ({steps[v.name]} steps)", total=config.samples)
                     for v in allv}
            for v in allv:
                task = tasks[v.name]
                s = generate(v.model, config.samples, steps=steps[v.name], cfg_scale=config.cfg_scale,
                             seed=config.seed, sampler=config.sampler, denoiser=_sampling_call(v, adapters[v.name]),
                             progress=lambda k, task=task: bar.advance(task, k))
                nfe[v.name] = s.nfe
                a = adapters[v.name]
                quality[v.name] = _quality_of(v, a, s, base_images if v is not baseline else None)
                if v is baseline:
                    base_images = s.images.detach().float().cpu()
                if config.grid and len(a.latent_shape) == 3:
                    fname = f"grid_{safe_name(v.name)}.png"
                    save_grid(s.images[:100].detach().cpu(), out_dir / fname, nrow=10)
                    grids[v.name] = fname
                del s

    macs: dict[str, int | None] = {v.name: None for v in allv}
    if config.speed:
        entries = []
        for v in allv:
            a = adapters[v.name]
            inputs = spd.speed_inputs(v.model, config.speed_batch, config.seed, config.sampler, config.steps)
            entries.append(spd.SpeedEntry(v.name, v.denoiser or a.forward, inputs, spd.model_device(v.model)))
        total = (config.warmup + config.repeats) * len(entries)
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"timing {len(entries)} variants, interleaved", total=total)
            stats = spd.time_interleaved(entries, config.warmup, config.repeats, on_call=lambda: bar.advance(task))
        base_ms = stats[baseline.name].median_ms
        for v in allv:
            st = stats[v.name]
            ms_img = st.median_ms / config.speed_batch * nfe[v.name]
            speed[v.name] = {
                "ms_per_call": _finite(st.median_ms, 4), "p90_ms_per_call": _finite(st.p90_ms, 4),
                "ms_per_image": _finite(ms_img, 4), "images_per_s": _finite(1000.0 / ms_img, 3),
                "speedup": _finite(base_ms / st.median_ms, 3), "peak_mem_mb": _finite(st.peak_mem_mb, 1),
            }
        for v in allv:
            macs[v.name] = spd.macs_per_call(v.model, config.seed, config.sampler)

    cuda = any(d.type == "cuda" for d in devices)
    report: dict[str, Any] = {
        "config": asdict(config),
        "machine": machine_info(devices),
        "baseline": baseline.name,
        "variants": [
            {
                "name": v.name, "recipe": v.recipe, "steps": steps[v.name], "nfe": nfe[v.name],
                "quality": quality[v.name], "speed": speed[v.name],
                "params": spd.param_count(v.model),
                "size_mb": round((v.size_bytes if v.size_bytes is not None else spd.tensor_bytes(v.model)) / 2**20, 4),
                "macs_per_call": macs[v.name],
            }
            for v in allv
        ],
        "notes": {
            "speed": rep.SPEED_NOTE.format(**asdict(config)) if config.speed else "speed not measured",
            "peak_mem": PEAK_MEM_NOTE_CUDA if cuda else PEAK_MEM_NOTE_CPU,
            "peak_mem_kind": "CUDA max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
            "size_mb": "MB = 2^20 bytes; the weights file's size on disk when the variant has one, else "
                       "parameters + buffers.",
            "macs_per_call": "analytic MACs (FLOPs / 2, torch FlopCounterMode) of one PyTorch call at batch 1.",
            "fd_to_source": "FD in the evaluator's feature space between the variant's samples and the "
                            "baseline's (same seeds): distribution-level fidelity; null for the baseline.",
            "psnr_ssim": f"against {baseline.name}'s samples (same seeds, labels, noise); null for the baseline. "
                         f"Digits-family images are clamped to [-1, 1] (data range 2); other models' latents are "
                         f"compared unclamped with the baseline's peak-to-peak range as data range.",
        },
        "files": {"report_json": "report.json", "report_md": "report.md", "pareto": None, "grids": grids},
    }
    if rep.plot_pareto(report, out_dir / "pareto.png") is not None:
        report["files"]["pareto"] = "pareto.png"
    rep.write_json(report, out_dir / "report.json")
    rep.write_markdown(report, out_dir / "report.md")
    if console is not None:
        rep.print_table(report, console)
        console.print(f"wrote {out_dir / 'report.json'}, report.md"
                      + (", pareto.png" if report["files"]["pareto"] else "")
                      + (f" and {len(grids)} sample grids" if grids else ""))
    return report


# ---- suite files ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(_Strict):
    """One model of a suite: a saved artifact dir, a checkpoint, a diffusers dir or a name (``reference``)."""

    path: str = Field(min_length=1)
    name: str | None = None
    steps: int | None = Field(default=None, ge=1)
    recipe: str | None = None


def _source_to_spec(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


class BenchConfigSpec(_Strict):
    samples: int = Field(200, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = REFERENCE_CFG
    seed: int = 0
    sampler: str = "default"
    speed_batch: int = Field(8, ge=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)
    quality: bool = True
    speed: bool = True
    grid: bool = True

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        from compress.diffusion.schedules import SAMPLERS

        if v != "default" and v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; choose default, {', '.join(SAMPLERS)}")
        return v


class SuiteSpec(_Strict):
    baseline: VariantSpec
    variants: list[VariantSpec] = Field(default_factory=list)
    config: BenchConfigSpec = Field(default_factory=BenchConfigSpec)

    @field_validator("baseline", mode="before")
    @classmethod
    def _baseline_str(cls, v):
        return _source_to_spec(v)

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_str(cls, v):
        return [_source_to_spec(x) for x in v] if isinstance(v, list) else v


assert {f.name for f in fields(BenchConfig)} == set(BenchConfigSpec.model_fields)  # the two stay in sync

_ALLOWED = {
    (): "baseline, variants, config",
    ("baseline",): ", ".join(VariantSpec.model_fields),
    ("variants",): ", ".join(VariantSpec.model_fields),
    ("config",): ", ".join(BenchConfigSpec.model_fields),
}


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    where = _loc(loc)
    if err["type"] == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
        allowed = _ALLOWED.get(parent, "")
        return f"unknown field '{where}'" + (f" (allowed here: {allowed})" if allowed else "")
    if err["type"] == "missing":
        return f"required field '{where}' is missing"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    msg = err["msg"].removeprefix("Value error, ")
    return f"field '{where}': {msg} (got {got})"


def _weights_size(path: Path) -> int | None:
    """Bytes of the weights file(s) behind a model source, if it has any on disk."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return (path / "model.safetensors").stat().st_size
        files = [f for d in (path, path / "transformer") if d.is_dir() for f in d.iterdir()
                 if f.suffix in (".safetensors", ".bin") and f.is_file()]
        return sum(f.stat().st_size for f in files) or None
    return None


def _resolve_source(source: str, suite_dir: Path) -> str | Path:
    """Names stay names; relative paths are taken from the suite file's folder when they exist there."""
    from compress.models.dit import DIT_CONFIGS

    if source == "reference" or source.removeprefix("preset:") in DIT_CONFIGS:
        return source
    p = Path(source).expanduser()
    if not p.is_absolute() and (suite_dir / p).exists():
        return suite_dir / p
    return p


def _exported_variant(d: Path, spec: VariantSpec, field: str, suite: Path) -> Variant:
    """An ONNX export (run by ONNX Runtime) or a TensorRT engine dir as a variant.

    Its PyTorch source model (recorded at export) supplies what the sampler needs besides the runner
    (conditions, latent shape, scheduler kind); every transformer call goes to the runner.
    """
    from compress.models.loading import load_model

    onnx_meta, trt_meta = d / "export.json", d / "engine.json"
    meta = json.loads((onnx_meta if onnx_meta.is_file() else trt_meta).read_text())
    source = meta.get("source")
    if not source:
        raise DitCompressError(f"{suite}: {field}: {d} does not record its source model; export it again with "
                               f"'dit-compress export onnx' to benchmark it.")
    try:
        model = load_model(source)
    except DitCompressError as e:
        raise DitCompressError(f"{suite}: {field}: the source of {d} ({source}) does not load: {e}") from None
    if onnx_meta.is_file():
        from exporters.runtime import OnnxRunner

        runner, kind = OnnxRunner(d), "ONNX Runtime"
    else:
        from exporters.tensorrt import TensorRTRunner

        runner, kind = TensorRTRunner(d), "TensorRT"
    size = sum(f.stat().st_size for f in d.iterdir() if f.name.startswith(("model.onnx", "model.engine")))
    recipe = spec.recipe or f"{kind} export of {Path(source).name}"
    return Variant(name=spec.name or d.name, model=model, recipe=recipe, steps=spec.steps, size_bytes=size,
                   denoiser=runner)


def _load_variant(spec: VariantSpec, field: str, suite: Path) -> Variant:
    from compress.models.loading import load_model

    src = _resolve_source(spec.path, suite.parent)
    if isinstance(src, Path) and src.is_dir() and ((src / "export.json").is_file() or (src / "engine.json").is_file()):
        return _exported_variant(src, spec, field, suite)
    try:
        model = load_model(src)
    except DitCompressError as e:
        raise DitCompressError(f"{suite}: {field}.path = {spec.path!r} does not load: {e}") from None
    recipe, size = spec.recipe, None
    if src == "reference":
        from compress.models.reference import WEIGHTS

        size = WEIGHTS.stat().st_size
    elif isinstance(src, Path):
        size = _weights_size(src)
        manifest = src / "manifest.json"
        if src.is_dir() and manifest.is_file() and recipe is None:
            try:
                recipe = (json.loads(manifest.read_text()).get("recipe") or {}).get("name")
            except (json.JSONDecodeError, AttributeError, OSError) as e:
                raise DitCompressError(f"{suite}: {field}: {manifest} is not a readable manifest ({e}).") from None
    if spec.name:
        name = spec.name
    elif isinstance(src, Path):
        name = src.name or str(src)
    else:
        name = str(src)
    return Variant(name=name, model=model, recipe=recipe, steps=spec.steps, size_bytes=size)


def variant_from_source(source: str, name: str | None = None, steps: int | None = None) -> Variant:
    """A Variant from anything ``compress.load_model`` accepts (artifact dirs give their recipe and size)."""
    return _load_variant(VariantSpec(path=source, name=name, steps=steps), "variant", Path.cwd() / "<command line>")


def load_suite(path: str | Path) -> tuple[Variant, list[Variant], BenchConfig]:
    """Read and validate a suite YAML; load its baseline and variants. Errors are ``DitCompressError``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DitCompressError(f"{path}: no such benchmark suite file. A suite is a YAML file with 'baseline' (a "
                               f"model source such as 'reference'), 'variants' (a list of {{name, path, steps}}) "
                               f"and 'config' (BenchConfig fields).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DitCompressError(f"{path}: not valid YAML{where}: {problem}. Fix the syntax of the suite file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DitCompressError(f"{path}: cannot read the suite file ({e}).") from None
    if not isinstance(data, dict):
        raise DitCompressError(f"{path}: a benchmark suite must be a YAML mapping with 'baseline', 'variants' and "
                               f"'config', found {'an empty file' if data is None else type(data).__name__}.")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise DitCompressError(
            f"{path}: invalid benchmark suite: {problems}. Expected 'baseline' (a model source or "
            f"{{path, name, steps, recipe}}), 'variants' (a list of those) and 'config' "
            f"({', '.join(BenchConfigSpec.model_fields)})."
        ) from None
    config = BenchConfig(**spec.config.model_dump())
    baseline = _load_variant(spec.baseline, "baseline", path)
    variants = [_load_variant(v, f"variants[{i}]", path) for i, v in enumerate(spec.variants)]
    return baseline, variants, config


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness", description="Run a benchmark suite.")
    ap.add_argument("suite", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    console = Console()
    try:
        baseline, variants, config = load_suite(args.suite)
        run_bench(baseline, variants, config, args.out_dir, console=console)
    except DitCompressError as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
