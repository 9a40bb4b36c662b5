"""Benchmark suites (YAML) and model sources turned into variants.

    baseline: reference
    variants:
      - out/w8a8                          # an artifact directory
      - {path: out/w8a8-onnx, name: w8a8 on ORT}
    config: {samples: 500, repeats: 20}   # BenchConfig fields

Any model source works as a variant: an artifact, a checkpoint, a diffusers directory, a bundled name,
an ONNX export or a TensorRT engine directory (run by its runtime, sampled by its recorded contract).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress.bench.harness import BenchConfig, Variant
from compress.errors import DitCompressError
from compress.yamlio import read_yaml, validate


class VariantSpec(BaseModel):
    """One model of a suite: a saved artifact dir, a checkpoint, a diffusers dir, an export or a name."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="Model source (relative paths: from the suite file's folder).")
    name: str | None = Field(None, min_length=1, description="Row name (default: the directory or source name).")
    steps: int | None = Field(default=None, ge=1, description="Sampling steps for this variant only.")
    recipe: str | None = Field(None, description="Recipe label (default: the artifact's own).")


class SuiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline: VariantSpec
    variants: list[VariantSpec] = Field(default_factory=list)
    config: BenchConfig = Field(default_factory=BenchConfig)

    @field_validator("baseline", mode="before")
    @classmethod
    def _baseline_str(cls, v):
        return {"path": v} if isinstance(v, str) else v

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_str(cls, v):
        return [{"path": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def _resolve_source(source: str, suite_dir: Path | None) -> str:
    """Names stay names; relative paths are taken from the suite file's folder when they exist there."""
    p = Path(source).expanduser()
    if suite_dir is not None and not p.is_absolute() and (suite_dir / p).exists():
        return str(suite_dir / p)
    return str(p) if p.exists() else source


def variant_from_source(source: str, name: str | None = None, steps: int | None = None, recipe: str | None = None,
                        where: str = "variant", **runner_options) -> Variant:
    """A Variant from anything ``open_runner`` accepts (artifact dirs give their recipe and size)."""
    from exporters.runtime import open_runner

    try:
        runner = open_runner(source, **runner_options)
    except DitCompressError as e:
        raise DitCompressError(f"{where} {source!r} does not load: {e}") from None
    p = Path(source)
    label = name or (p.name if p.exists() and p.name else str(source))
    return Variant(name=label, runner=runner, recipe=recipe, steps=steps)


def load_suite(path: str | Path) -> tuple[Variant, list[Variant], BenchConfig]:
    """Read and validate a suite YAML; load its baseline and variants. Errors are ``DitCompressError``."""
    path = Path(path)
    if not path.is_file():
        raise DitCompressError(f"{path}: no such benchmark suite file. A suite is a YAML file with 'baseline' (a "
                               f"model source such as 'reference'), 'variants' (a list of {{name, path, steps}}) "
                               f"and 'config' (BenchConfig fields).")
    spec = validate(SuiteSpec, read_yaml(path, "benchmark suite"), str(path), "benchmark suite")

    def load(v: VariantSpec, where: str) -> Variant:
        return variant_from_source(_resolve_source(v.path, path.parent), v.name, v.steps, v.recipe,
                                   where=f"{path}: {where}.path =")

    baseline = load(spec.baseline, "baseline")
    variants = [load(v, f"variants[{i}]") for i, v in enumerate(spec.variants)]
    return baseline, variants, spec.config
