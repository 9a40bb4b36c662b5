"""``dit-compress demo``: one variant per compression axis plus the composite, each in its best runtime.

The reference DiT is compressed along every axis the toolkit has (precision, depth, width, steps, caching)
and all at once (``fastest``), and benchmarked against its source on the same seeds in one ``bench`` run.
Training-free recipes are applied live. The four that train (1,000-3,000 distillation steps, 10-45 CPU
minutes each) ship as artifacts under ``compress/models/reference/artifacts/``, made by exactly the bundled
recipe (checked: a shipped artifact whose recorded passes differ from the bundled recipe's is not used);
``--train`` applies them here instead.

Best runtime: OpenVINO (an ``export openvino`` of the artifact, f32 precision hint, INT8 QDQ layers as
integer kernels) when it is installed, else PyTorch eager; a variant with a step-cache policy runs in
PyTorch (OpenVINO runs whole graphs; the segmented ONNX export is for ONNX Runtime). The source itself also
appears exported to OpenVINO, so the table separates what the runtime gives from what compression gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from compress.errors import DitCompressError

ARTIFACTS = Path(__file__).parent / "models" / "reference" / "artifacts"


@dataclass(frozen=True)
class DemoVariant:
    axis: str
    recipe: str
    trains: bool  # shipped pre-trained; applied live only with --train


DEMO = (
    DemoVariant("precision", "w8a8-int8", False),
    DemoVariant("depth", "prune-depth-half", True),
    DemoVariant("width", "prune-width-30", True),
    DemoVariant("steps", "few-step-4", True),
    DemoVariant("caching", "cache-2x", False),
    DemoVariant("composite", "fastest", True),
)


def shipped_artifact(recipe: str) -> Path | None:
    """The shipped artifact made by the bundled ``recipe`` (same passes, field for field), or None."""
    import json

    from compress.recipe import load_recipe, parse_recipe

    d = ARTIFACTS / recipe
    if not (d / "manifest.json").is_file():
        return None
    try:
        recorded = parse_recipe(json.loads((d / "manifest.json").read_text())["recipe"], str(d / "manifest.json"))
    except (DitCompressError, KeyError, ValueError):
        return None
    same = recorded.model_dump(mode="json")["passes"] == load_recipe(recipe).model_dump(mode="json")["passes"]
    return d if same else None


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out: Path, samples: int, recipes: list[str] | None, train: bool, console) -> dict:
    """Build every demo variant under ``out`` and benchmark them; returns the bench report."""
    import compress
    from compress.bench import BenchConfig, Variant, run_bench, variant_from_source
    from compress.models.adapters import get_adapter

    chosen = list(DEMO) if recipes is None else [next((d for d in DEMO if d.recipe == r), DemoVariant("", r, False))
                                                  for r in recipes]
    for d in chosen:
        compress.load_recipe(d.recipe)  # every recipe valid before any work
    t0 = time.perf_counter()
    use_ov = openvino_available()
    if not use_ov:
        console.print("OpenVINO is not installed (pip install \"dit-compress[openvino]\"): every variant runs in "
                      "PyTorch eager, where INT8 layers are slower than fp32 on small models.")
    source = compress.load_model("reference")
    variants = []

    def best_runtime(name: str, model, art: Path, recipe: str | None) -> Variant:
        if use_ov and get_adapter(model).contract().cache is None:
            from exporters.openvino import export_openvino

            d = export_openvino(model, out / "exports" / name, force=True, source_id=str(art))
            return variant_from_source(str(d), name=name, recipe=recipe)
        return variant_from_source(str(art), name=name, recipe=recipe)

    for d in chosen:
        shipped = None if train else shipped_artifact(d.recipe)
        art = out / "artifacts" / d.recipe
        if shipped is not None:
            console.print(f"[bold]{d.recipe}[/] ({d.axis or 'recipe'}): the shipped artifact made by the bundled "
                          f"recipe (dit-compress apply {d.recipe} retrains it; --train does it here)")
            model, art = compress.load(shipped), shipped
        else:
            console.print(f"applying [bold]{d.recipe}[/] to the reference model"
                          + (" (trains: tens of minutes on a CPU)" if d.trains else ""))
            model = compress.apply_recipe(source, d.recipe, console=console)
            compress.save(model, art, force=True)
        variants.append(best_runtime(d.recipe, model, art, d.recipe))
    if use_ov:
        variants.insert(0, best_runtime("reference (OpenVINO)", source, Path("reference"), None))
    base = Variant(name="reference", runner=variant_from_source("reference").runner)
    report = run_bench(base, variants, BenchConfig(samples=samples, repeats=20), out, console=console,
                       extra={"demo": {"variants": [{"axis": d.axis, "recipe": d.recipe} for d in chosen],
                                       "runtime": "openvino" if use_ov else "torch"}})
    seconds = round(time.perf_counter() - t0, 1)
    console.print(f"demo: {seconds} s")
    return report
