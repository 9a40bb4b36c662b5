"""The shape of the code: imports flow one way, and each axis of growth is one registration.

The import graph is read from the source (every import, at module level or inside a function), so a
lazy import cannot hide a cycle. The extension test adds a model family, a pass and a runtime from this
file alone and runs them through apply, save/load and bench.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compress", "exporters", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported project module, imported name or None)} for every import statement in it."""
    mods = _modules()
    graph: dict[str, set[tuple[str, str | None]]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        graph[mod].add((a.name, None))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] not in PACKAGES:
                    continue
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    graph[mod].add((sub, None) if sub in mods else (node.module, a.name))
    return graph


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycles():
    graph = import_graph()
    edges = {m: {t for t, _ in deps if t in graph and t != m} for m, deps in graph.items()}
    assert _cycles(edges) == []


def _is_script(mod: str) -> bool:
    """An entry point (``python -m ...``) that no other module imports: it may use anything below the CLI."""
    src = _modules()[mod].read_text()
    imported = any(t == mod for deps in import_graph().values() for t, _ in deps)
    return "__main__" in src and not imported


def test_imports_flow_one_way():
    graph = import_graph()
    for mod, deps in graph.items():
        targets = {t for t, _ in deps}
        if mod.startswith(("compress", "exporters")):  # the library never stands on the scripts
            assert not any(t.startswith("benchmarks") for t in targets), mod
        if mod.startswith("compress.nn"):  # layers know nothing of model families
            assert not any(t.startswith("compress.models") for t in targets), mod
        if mod.startswith("compress.models") and not _is_script(mod):  # the bottom layer (with nn, io, errors)
            allowed = ("compress.models", "compress.nn", "compress.errors", "compress.io")
            assert all(t.startswith(allowed) for t in targets), (mod, sorted(targets))
        if mod.startswith("compress.passes"):  # passes never reach up to exporters or the bench
            assert not any(t.startswith(("exporters", "compress.bench", "compress.cli")) for t in targets), mod
        if mod.startswith("exporters"):  # exporters read modules, never passes or recipes
            assert not any(t.startswith(("compress.passes", "compress.recipe", "compress.training",
                                         "compress.bench")) for t in targets), mod


def test_cli_uses_no_private_name_of_another_module():
    for target, name in import_graph()["compress.cli"]:
        assert not (name or target.rsplit(".", 1)[-1]).startswith("_"), (target, name)


# ---- one registration per axis of growth ----------------------------------------------------------
class ToyDenoiser(nn.Module):
    """A family the toolkit has never seen: 4x4 single-channel latents, labels, two residual MLP blocks."""

    def __init__(self, width: int = 16, depth: int = 2, classes: int = 3):
        super().__init__()
        self.width, self.depth, self.classes = width, depth, classes
        self.inp = nn.Linear(16, width)
        self.label = nn.Embedding(classes + 1, width)
        self.time = nn.Linear(1, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                    for _ in range(depth))
        self.out = nn.Linear(width, 16)

    def forward(self, x, t, y):
        h = self.inp(x.reshape(x.shape[0], 16)) + self.label(y) + self.time(t.reshape(-1, 1).float() / 1000)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h).reshape(x.shape)


def _register_toys():
    from compress.models.adapters import BlockView, MLPView, ModelAdapter, register_adapter
    from compress.models.contract import ConditionSpec
    from compress.passes import PassConfig, register_pass
    from exporters.runtime import RUNTIMES, Runner, TorchRunner, register_runtime

    from compress.models.adapters import ADAPTERS

    if not any(a.family == "toy" for a in ADAPTERS):
        @register_adapter
        class ToyAdapter(ModelAdapter):
            family, prediction, block_lists, default_guidance = "toy", "epsilon", {"block": "layers"}, 1.0
            hidden_size = 16
            latent_shape = (1, 4, 4)

            @classmethod
            def matches(cls, model):
                return isinstance(model, ToyDenoiser)

            def architecture(self):
                m = self.model
                return {"class": "ToyDenoiser", "config": {"width": m.width, "depth": m.depth, "classes": m.classes}}

            @classmethod
            def handles(cls, arch):
                return arch.get("class") == "ToyDenoiser"

            @classmethod
            def build(cls, arch):
                return ToyDenoiser(**arch["config"])

            def block_view(self, kind, index, path, block):
                return BlockView(kind, index, path, block, mlps=[MLPView(path, block[0], block[2], 32)])

            def conditions(self):
                return [ConditionSpec(name="y", kind="label", num_classes=self.model.classes, null="null_label")]

            def denoise(self, x, t, cond):
                return self.model(x, t, cond["y"])

    from compress.recipe import recipe_model

    from compress.passes import PASSES

    if "toy_halve_last" not in PASSES:
        from typing import Literal

        from pydantic import Field

        from compress.models.adapters import get_adapter

        @register_pass("toy_halve_last")
        class ToyHalveConfig(PassConfig):
            """Halve the output projection of the last block (a toy structural pass)."""

            pass_: Literal["toy_halve_last"] = Field("toy_halve_last", alias="pass")
            factor: float = Field(0.5, gt=0, description="What the last block's output is multiplied by.")

        @ToyHalveConfig.applies
        def apply_toy(model, config, ctx):
            adapter = get_adapter(model)
            last = adapter.blocks()[-1].mlps[0].fc_out
            new = nn.Linear(last.in_features, last.out_features)
            with torch.no_grad():
                new.weight.copy_(last.weight * config.factor)
                new.bias.copy_(last.bias * config.factor)
            adapter.replace(f"{adapter.blocks()[-1].path}.2", new)
            ctx.run.note(f"scaled by {config.factor}")
            return model

        recipe_model.cache_clear()  # the recipe schema is built from the registered passes

    if "toy" not in RUNTIMES:
        class ToyRunner(Runner):
            """Runs an artifact directory marked with toy.json through PyTorch, counting calls."""

            runtime = "toy"
            calls = 0

            def __init__(self, d: Path):
                from compress import load

                inner = TorchRunner(load(d / "artifact"))
                self.inner, self.contract, self.params = inner, inner.contract, inner.params
                self.size_bytes, self.description = inner.size_bytes, "toy runtime"

            def __call__(self, x, t, cond):
                ToyRunner.calls += 1
                return self.inner(x, t, cond)

        register_runtime("toy", detect=lambda d: (d / "toy.json").is_file(), open=ToyRunner)
    return RUNTIMES["toy"].open


def test_a_new_family_pass_and_runtime_need_only_their_registrations(tmp_path):
    import compress
    from compress.bench import BenchConfig, run_bench, variant_from_source
    from compress.models.provenance import stamp_source

    _register_toys()
    torch.manual_seed(0)
    model = stamp_source(ToyDenoiser().eval(), "toy", None)
    recipe = {"name": "toy", "description": "toy", "defaults": {"calibration": {"samples": 4, "steps": 3}},
              "passes": [{"pass": "toy_halve_last", "factor": 0.25},
                         {"pass": "quantize", "weights": {"dtype": "int8"}}]}
    small = compress.apply_recipe(model, recipe, show_progress=False)
    art = compress.save(small, tmp_path / "toy-run" / "artifact")
    (tmp_path / "toy-run" / "toy.json").write_text(json.dumps({"format": "toy"}))
    again = compress.load(art)
    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), small(x, t, y), rtol=0, atol=0)
        assert not torch.allclose(small(x, t, y), model(x, t, y))
    manifest = json.loads((art / "manifest.json").read_text())
    assert [p["pass"] for p in manifest["passes"]] == ["toy_halve_last", "quantize"]
    assert manifest["architecture"]["class"] == "ToyDenoiser"
    base = variant_from_source(str(art))  # the PyTorch runner for the artifact...
    toy = variant_from_source(str(tmp_path / "toy-run"), name="on toy runtime")  # ...and the registered one
    assert toy.runner.description == "toy runtime"
    report = run_bench(base, [toy], BenchConfig(samples=6, steps=3, repeats=2, warmup=1, speed_batch=2),
                       tmp_path / "bench")
    v = report["variants"][1]
    assert v["runtime"] == "toy runtime" and v["quality"]["psnr_db"] >= 99  # the same model on both
    assert type(toy.runner).calls == 3 + 3  # 3 sampling steps (no CFG) + 1 warm-up + 2 timed


def test_bench_runs_an_onnx_export_without_its_pytorch_source(tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from compress.cli import app
    from tests.conftest import randomized_dit

    src = tmp_path / "tiny.safetensors"
    m = randomized_dit()
    save_file(m.state_dict(), src, metadata={"dit_config": json.dumps(m.config.to_dict())})
    cli = CliRunner()
    r = cli.invoke(app, ["export", "onnx", str(src), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["bench", str(tmp_path / "onnx"), "--baseline", str(src), "--out", str(tmp_path / "b1"),
                         "--samples", "6", "--steps", "3", "--repeats", "2"])
    assert r.exit_code == 0, r.output
    src.unlink()  # the source is gone: the export alone must sample and time
    import shutil

    shutil.copytree(tmp_path / "onnx", tmp_path / "onnx-copy")
    r = cli.invoke(app, ["bench", str(tmp_path / "onnx-copy"), "--baseline", str(tmp_path / "onnx"), "--out",
                         str(tmp_path / "b2"), "--samples", "6", "--steps", "3", "--repeats", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b2" / "report.json").read_text())
    assert [v["runtime"].split(" (")[0] for v in rep["variants"]] == ["ONNX Runtime", "ONNX Runtime"]
    assert rep["variants"][0]["steps"] == 3 and rep["variants"][0]["nfe"] == 6  # its contract's CFG: 2 per step
    r = cli.invoke(app, ["sample", str(tmp_path / "onnx"), "--classes", "0-1", "--per-class", "2", "--steps", "2",
                         "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.png").is_file()
