"""`dit-compress`: every subcommand calls the public API and nothing else.

Errors: every expected failure is a ``DitCompressError`` printed as one line naming the file, field or
option and the fix (exit code 2); anything unexpected prints one line and a hint to rerun with
``--debug`` for the traceback (exit code 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from compress.errors import DitCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Diffusion Transformers smaller and faster: compress, export, benchmark. "
                       "Add --debug to any command to see a traceback on unexpected errors.")
console = Console(width=None if sys.stdout.isatty() else 180)


def parse_classes(spec: str) -> list[int]:
    """'0-9' or '1,3,5' or '2-4,7' -> list of ints."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise DitCompressError(f"--classes {spec!r}: expected a list like '0-9' or '1,3,5'.") from None
    return out


@app.command()
def inspect(model: str = typer.Argument(..., help="'reference', a config name, a checkpoint file or a diffusers dir"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Family, depth, width, heads, parameters and size of a model."""
    from compress import get_adapter, load_model

    info = get_adapter(load_model(model)).summary()
    if as_json:
        print(json.dumps(info))
        return
    table = Table(title=f"{model}", show_header=False)
    for k, v in info.items():
        table.add_row(k, str(v))
    console.print(table)


@app.command()
def sample(model: str = typer.Argument(..., help="model to sample: any model source, an artifact, or an export dir"),
           classes: str = typer.Option("0-9", help="class labels, e.g. 0-9 or 1,3,5"),
           per_class: int = typer.Option(8, help="samples per class (one row each)"),
           steps: int = typer.Option(None, help="sampling steps (default: the model's sampling contract)"),
           cfg: float = typer.Option(None, help="classifier-free guidance scale (default: the model's contract)"),
           sampler: str = typer.Option(None, help="ddim | dpm | ddpm (epsilon models), euler (flow models); "
                                                  "default: the model's contract"),
           seed: int = typer.Option(0),
           out: Path = typer.Option(Path("grid.png"), help="PNG to write")) -> None:
    """Sample a grid (one row per class) and report transformer calls per image."""
    from compress.evaluation import generate
    from compress.viz import save_grid
    from exporters.runtime import open_runner

    _check_file_output(out, ".png")
    runner = open_runner(model)
    contract = runner.contract.with_overrides(steps=steps, guidance_scale=cfg, sampler=sampler)
    if len(contract.latent_shape) != 3:
        raise DitCompressError(f"{model}: latents of shape {contract.latent_shape} are not images; no grid written.")
    cls = parse_classes(classes)
    if contract.num_classes is not None:
        bad = [c for c in cls if not 0 <= c < contract.num_classes]
        if bad:
            raise DitCompressError(f"--classes: {bad} out of range for a model with {contract.num_classes} classes.")
    if per_class < 1:
        raise DitCompressError("--per-class: must be at least 1.")
    n = len(cls) * per_class
    ordered = [c for c in cls for _ in range(per_class)]
    s = generate(runner, n, contract=contract, seed=seed, classes=ordered)
    if not torch_finite(s.images):
        raise DitCompressError(f"{model}: the samples are not finite (NaN/Inf); the model is broken. No grid written.")
    save_grid(s.images, out, nrow=per_class)
    console.print(f"wrote {out}: {n} samples, {contract.steps} steps, {s.nfe} transformer evaluations per image, "
                  f"{s.seconds:.1f} s ({runner.description})")


def torch_finite(x) -> bool:
    import torch

    return bool(torch.isfinite(x).all())


def _check_file_output(out: Path, suffix: str | None = None) -> None:
    """Fail before any work if ``out`` (a file to write) cannot be written."""
    from compress.io import check_parent_writable

    if out.is_dir():
        raise DitCompressError(f"{out}: is a directory; give a file name{f' ending in {suffix}' if suffix else ''}.")
    check_parent_writable(out)


@app.command()
def apply(recipe: str = typer.Argument(..., help="recipe YAML (or the name of a bundled recipe)"),
          model: str = typer.Option("reference", "--model", help="source model (default: the bundled reference)"),
          out: Path = typer.Option(..., "--out", help="artifact directory to write"),
          force: bool = typer.Option(False, "--force", help="replace an existing artifact directory (only one "
                                                            "dit-compress wrote; anything else is refused)"),
          workdir: Path = typer.Option(None, "--workdir", help="where training passes write checkpoints (default: "
                                                                 "OUT.work). After success only what this run wrote "
                                                                 "there is removed"),
          resume: bool = typer.Option(False, "--resume", help="continue training passes from their checkpoints "
                                                              "in the workdir (after a crash or a kill)")) -> None:
    """Apply a recipe to a model and save the artifact (written atomically)."""
    import compress
    from compress.io import ARTIFACT, WorkDir, check_output_path

    check_output_path(out, (ARTIFACT,), force)  # before any long work
    r = compress.load_recipe(recipe)
    src = compress.load_model(model)
    work = WorkDir(workdir or out.with_name(out.name + ".work"))
    rank = _init_distributed()
    result = compress.apply_recipe(src, r, console=console, workdir=work, resume=resume, show_progress=rank == 0)
    if rank != 0:  # under torchrun every rank trains; rank 0 writes the artifact
        return
    compress.save(result, out, force=force)
    work.finish()
    from compress.models.provenance import provenance

    table = Table(title=f"{r.name} on {model}")
    for col in ("pass", "params before", "params after", "MB before", "MB after", "seconds", "notes"):
        table.add_column(col)
    for p in provenance(result)["passes"]:
        table.add_row(p["pass"], f"{p['params_before']:,}", f"{p['params_after']:,}", f"{p['bytes_before'] / 2**20:.2f}",
                      f"{p['bytes_after'] / 2**20:.2f}", f"{p['seconds']:.1f}", "; ".join(p["notes"]))
    console.print(table)
    console.print(f"wrote {out}")


@app.command()
def sensitivity(model: str = typer.Argument(..., help="model to analyse ('reference', a checkpoint, an artifact...)"),
                formats: str = typer.Option("w4a8,w8a8-int8",
                                            help="comma-separated quantization recipes (one quantize pass each)"),
                budget: str = typer.Option("w8a8-int8", help="size budget: MB (e.g. 5.5) or a format name, meaning "
                                                             "the size of that format applied uniformly"),
                out: Path = typer.Option(Path("mixed-precision.yaml"), help="where to write the plan as a recipe"),
                samples: int = typer.Option(16, help="calibration images (their trajectories are recorded)"),
                steps: int = typer.Option(25, help="calibration sampling steps"),
                top: int = typer.Option(15, help="rows of the ranking to print")) -> None:
    """Rank block Linears by the output error their quantization alone causes; plan mixed precision."""
    from compress import load_model
    from compress.passes import CalibrationConfig
    from compress.sensitivity import measure_sensitivity, write_recipe

    _check_file_output(out, ".yaml")
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    if not fmts:
        raise DitCompressError("--formats: give at least one quantization recipe.")
    m = load_model(model)
    sens = measure_sensitivity(m, fmts, calibration=CalibrationConfig(samples=samples, steps=steps), console=console)
    if budget in sens.formats:
        budget_bytes = sens.plan_size(sens.uniform(budget))
    else:
        try:
            budget_bytes = int(float(budget) * 1e6)
        except ValueError:
            raise DitCompressError(f"--budget {budget!r}: expected MB or one of {', '.join(sens.formats)}.") from None
    plan = sens.plan(budget_bytes)
    table = Table(title=f"{model}: relative output MSE when only this layer is quantized (worst first)")
    table.add_column("layer")
    for f in fmts:
        table.add_column(f, justify="right")
    table.add_column("plan")
    worst = sorted(sens.layers, key=lambda n: -max(sens.error[n][f] for f in fmts))
    for n in worst[:top]:
        table.add_row(n, *[f"{sens.error[n][f]:.2e}" for f in fmts], plan[n])
    console.print(table)
    counts = {f: sum(v == f for v in plan.values()) for f in sens.formats}
    est = sum(sens.error[n][plan[n]] for n in sens.layers)
    desc = (f"Mixed precision from `dit-compress sensitivity {model}`: " + ", ".join(
        f"{c} layers {f}" for f, c in counts.items() if c) + f"; {sens.plan_size(plan) / 1e6:.3f} MB "
        f"(budget {budget_bytes / 1e6:.3f} MB), summed per-layer error {est:.2e}.")
    write_recipe(sens.recipe(plan, out.stem, desc), out)
    for f in sens.formats:
        u = sens.uniform(f)
        console.print(f"uniform {f}: {sens.plan_size(u) / 1e6:.3f} MB, summed per-layer error "
                      f"{sum(sens.error[n][f] for n in sens.layers):.2e}")
    console.print(desc)
    console.print(f"wrote {out} (apply it with: dit-compress apply {out} --model {model} --out DIR)")


export_app = typer.Typer(help="Export a model or artifact to ONNX, OpenVINO (both validated against PyTorch) or "
                                "TensorRT.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_cmd(model: str = typer.Argument(..., help="artifact dir or any model source"),
                    out: Path = typer.Option(..., help="output directory (model.onnx, model.onnx.data, export.json)"),
                    opset: int = typer.Option(20, help="ONNX opset (>= 18; 20 has a fused Gelu op)"),
                    tolerance: float = typer.Option(None, help="max relative error vs PyTorch (default: 1e-4 "
                                                               "fp32, 2e-2 fake-quant)"),
                    force: bool = typer.Option(False, help="replace an existing output directory"),
                    qdq_activations: str = typer.Option("uint8", help="INT8 activations in QDQ: 'uint8' (ONNX "
                                                                      "Runtime on x86) or 'int8' (TensorRT)"),
                    qdq_weights: str = typer.Option("auto", help="INT8 weights in QDQ: 'int8', 'uint8' (zero point "
                                                                 "128: ONNX Runtime's U8U8 kernels, exact on x86 "
                                                                 "CPUs without VNNI), or 'auto' (uint8 for 8-bit "
                                                                 "weights when this CPU has no VNNI)")
                    ) -> None:
    """Export to ONNX and validate with ONNX Runtime; a failed validation leaves nothing behind."""
    from compress import load_model
    from compress.io import ONNX_EXPORT, check_output_path
    from exporters.onnx import export_onnx

    if opset < 18:
        raise DitCompressError(f"--opset {opset}: the exporter needs opset 18 or newer.")
    if tolerance is not None and not 0 < tolerance < 1:
        raise DitCompressError(f"--tolerance {tolerance}: a relative error between 0 and 1.")
    check_output_path(out, (ONNX_EXPORT,), force)
    export_onnx(load_model(model), out, opset=opset, force=force, tolerance=tolerance, console=console,
                qdq_activations=qdq_activations, qdq_weights=qdq_weights, source=_source_id(model))


@export_app.command("openvino")
def export_openvino_cmd(source: str = typer.Argument(..., help="artifact dir or any model source, or an ONNX export "
                                                                "dir (from 'export onnx')"),
                        out: Path = typer.Option(..., help="output directory (model.xml, model.bin, export.json)"),
                        precision: str = typer.Option("f32", help="CPU inference precision hint: f32 | bf16 | f16"),
                        tolerance: float = typer.Option(None, help="max relative error vs PyTorch (default: 1e-4 "
                                                                   "f32, 2e-2 fake-quant or f16, 5e-2 bf16)"),
                        force: bool = typer.Option(False, help="replace an existing OpenVINO export"),
                        qdq_activations: str = typer.Option("uint8", help="INT8 activations in QDQ when exporting "
                                                                          "a model: 'uint8' or 'int8'"),
                        quantizer: str = typer.Option(None, help="'nncf': quantize a float model's IR with NNCF "
                                                                 "INT8 (TRANSFORMER preset), calibrated on the model's "
                                                                 "own trajectories")) -> None:
    """Convert to OpenVINO IR and validate the compiled CPU model; a failed validation leaves nothing behind."""
    from compress.io import ONNX_EXPORT, OPENVINO_EXPORT, check_output_path, kind_of
    from exporters.openvino import check_precision, check_quantizer_name, export_openvino, require_openvino

    require_openvino()
    check_precision(precision)
    check_quantizer_name(quantizer)
    if tolerance is not None and not 0 < tolerance < 1:
        raise DitCompressError(f"--tolerance {tolerance}: a relative error between 0 and 1.")
    check_output_path(out, (OPENVINO_EXPORT,), force)
    if kind_of(Path(source)) is ONNX_EXPORT:
        src = Path(source)
    else:
        from compress import load_model

        src = load_model(source)
    export_openvino(src, out, precision=precision, force=force, tolerance=tolerance, console=console,
                    qdq_activations=qdq_activations, source_id=_source_id(source), quantizer=quantizer)


@export_app.command("tensorrt")
def export_tensorrt_cmd(source: str = typer.Argument(..., help="an ONNX export dir (from 'export onnx') or any model "
                                                                "source, exported to ONNX first"),
                        out: Path = typer.Option(..., help="engine directory (model.engine, engine.json)"),
                        precision: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | int8 | fp8 (int8/fp8 "
                                                                   "need QDQ from a quantized artifact)"),
                        batch: str = typer.Option("1,4,16", help="optimisation profile: min,opt,max batch"),
                        strongly_typed: bool = typer.Option(False, help="take every type from the graph "
                                                                        "(TensorRT >= 10)"),
                        workspace_gb: float = typer.Option(8.0, help="builder workspace limit"),
                        timing_cache: Path = typer.Option(None, help="timing cache file (read and updated)"),
                        force: bool = typer.Option(False, help="rebuild over a different existing engine")) -> None:
    """Build a TensorRT engine with the TensorRT Python API (needs the [tensorrt] extra and a GPU)."""
    import tempfile

    from exporters.tensorrt import build_engine, require_tensorrt

    require_tensorrt()  # fail before any export work when TensorRT is absent
    try:
        b = tuple(int(v) for v in batch.split(","))
    except ValueError:
        b = ()
    if len(b) != 3:
        raise DitCompressError(f"--batch {batch!r}: expected three integers min,opt,max (e.g. 1,4,16).")
    from compress.io import ONNX_EXPORT, kind_of

    src = Path(source)
    if kind_of(src) is not ONNX_EXPORT:
        from compress import load_model
        from exporters.onnx import export_onnx

        src = export_onnx(load_model(source), Path(tempfile.mkdtemp()) / "onnx", qdq_activations="int8",
                          source=_source_id(source), console=console)
    d = build_engine(src, out, precision=precision, batch=b, strongly_typed=strongly_typed,
                     workspace_gb=workspace_gb, timing_cache=timing_cache, force=force)
    console.print(f"wrote {d / 'model.engine'}")


def _init_distributed(timeout_s: float | None = None) -> int:
    """Under torchrun (WORLD_SIZE > 1) join the process group once; returns this process's rank.

    Training passes then wrap the student in DDP and shard their data by rank; on GPUs each rank uses
    the device of its LOCAL_RANK. ``timeout_s``: how long a collective may wait (default: torch's), for
    commands whose ranks wait on purpose while rank 0 alone works (``bench`` times on rank 0).
    """
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    return dist.get_rank()


# How long the other ranks of a torchrun `bench` may wait for rank 0's timing and report (torch's default,
# 10 min for NCCL and 30 for gloo, is shorter than the timing of a large model); a crashed rank still ends
# the run at once (torchrun stops the others).
BENCH_WAIT_S = 12 * 3600.0


def _source_id(model: str) -> str:
    """A model source that stays loadable from elsewhere: names as they are, paths made absolute."""
    p = Path(model)
    return str(p.resolve()) if p.exists() else model


@app.command()
def recipes(schema: bool = typer.Option(False, "--schema", help="print the recipe JSON Schema")) -> None:
    """List the bundled recipes, or print the JSON Schema editors can validate recipes with."""
    from compress.recipe import bundled_recipes, recipe_schema

    if schema:
        print(json.dumps(recipe_schema(), indent=2))
        return
    table = Table(title="bundled recipes (recipes/)")
    table.add_column("name")
    table.add_column("description")
    for name, desc in bundled_recipes().items():
        table.add_row(name, desc)
    console.print(table)


@app.command()
def bench(artifacts: list[str] = typer.Argument(None, help="artifact dirs, model sources, ONNX export dirs or "
                                                             "TensorRT engine dirs to compare"),
          baseline: str = typer.Option("reference", "--baseline", help="the source model (speed-up 1.0)"),
          suite: Path = typer.Option(None, "--suite", help="a suite YAML instead of a list of artifacts"),
          out: Path = typer.Option(Path("out/bench"), "--out", help="report directory"),
          samples: int = typer.Option(500, help="samples per variant for quality"),
          steps: int = typer.Option(None, help="sampling steps for every variant (default: each one's contract)"),
          cfg: float = typer.Option(None, help="guidance scale for every variant (default: each one's contract)"),
          repeats: int = typer.Option(20, help="timed repeats per variant (interleaved)"),
          speed_batch: int = typer.Option(8, help="batch for latency timing")) -> None:
    """Compare variants against their source on identical seeds: quality, speed, size; report + Pareto plot.

    Under torchrun every rank samples a share of the quality samples (the report is the one-process one);
    rank 0 times, prints and writes, the other ranks print nothing (their errors too: rank 0 reports).
    """
    from pydantic import ValidationError

    from compress.bench import BenchConfig, load_suite, run_bench, variant_from_source
    from compress.yamlio import describe_errors

    rank = _init_distributed(BENCH_WAIT_S)
    if rank != 0:
        console.quiet = True
    elif out.exists() and not out.is_dir():
        raise DitCompressError(f"--out {out}: is a file; the report goes into a directory.")
    else:
        _check_file_output(out / "report.json")
    if suite is not None:
        base, variants, config = load_suite(suite)
    else:
        if not artifacts:
            raise DitCompressError("bench: give artifact directories to compare, or --suite SUITE.yaml.")
        given = {"samples": samples, "steps": steps, "cfg_scale": cfg, "repeats": repeats, "speed_batch": speed_batch}
        try:
            config = BenchConfig(**given)
        except ValidationError as e:
            raise DitCompressError(f"bench: {describe_errors(e, given)}.") from None
        base = variant_from_source(baseline, where="--baseline")
        variants = [variant_from_source(a) for a in artifacts]
    report = run_bench(base, variants, config, out, console=console)
    if report["notes"]["non_finite"]:
        raise DitCompressError(f"bench: {', '.join(report['notes']['non_finite'])} produced non-finite samples "
                               f"(NaN/Inf): broken model(s), no quality figures for them (the report in {out} says so).")


@app.command()
def demo(out: Path = typer.Option(Path("out/demo"), help="where artifacts, exports and the report go"),
         samples: int = typer.Option(500, help="samples per variant for FD / class accuracy / PSNR"),
         recipes: str = typer.Option(None, help="comma-separated recipes instead of the demo's one per axis"),
         train: bool = typer.Option(False, "--train", help="apply the training recipes here instead of using "
                                                           "the shipped artifacts they made (tens of minutes each)")
         ) -> None:
    """One variant per axis (precision, depth, width, steps, caching) and the composite, each in its best
    runtime, benchmarked against the reference on the same seeds: table, report.md, Pareto plots."""
    from compress.demo import run_demo

    if out.exists() and not out.is_dir():
        raise DitCompressError(f"--out {out}: is a file; the demo writes a directory.")
    names = [r.strip() for r in recipes.split(",") if r.strip()] if recipes else None
    run_demo(out, samples, names, train, console)


@app.command()
def quality(samples: int = typer.Option(1000, help="samples for the quality figures"),
            steps: int = typer.Option(50), out: Path = typer.Option(Path("out/quality")),
            model: str = typer.Option("reference", help="bundled model: reference or reference-p1")) -> None:
    """Sample a bundled reference model and score it against the real digits (FD, class accuracy)."""
    from compress.evaluation import reference_quality_report
    from compress.models.reference import REFERENCES

    if model not in REFERENCES:
        raise DitCompressError(f"--model {model!r}: choose one of {', '.join(REFERENCES)}.")
    reference_quality_report(samples, steps, out, console, name=model)


def main() -> None:
    """Entry point: one line per failure, a traceback only with --debug."""
    argv = sys.argv[1:]
    debug = "--debug" in argv
    if debug:
        sys.argv = [sys.argv[0], *[a for a in argv if a != "--debug"]]
    try:
        app()
    except DitCompressError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]; outputs are written atomically, nothing half-written was left.",
                      highlight=False, soft_wrap=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the error boundary: one line, the traceback on request
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        console.print(f"[bold red]error:[/] unexpected {type(e).__name__}: {first}. This input is not checked "
                      f"by dit-compress (a bug): rerun the same command with --debug for the traceback and report it.",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
