"""A hostile user: every bad input is one line naming the problem, and nothing the toolkit did not write is touched.

Each CLI case runs the real entry point (``compress.cli.main``: the error boundary a user meets) in this
process, checks the exit code, that the output is one ``error:`` line with no traceback, and that a decoy
home directory and a decoy file next to the outputs are unchanged, byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import compress
from compress import DitCompressError
from compress.models.dit import DiT, DiTConfig
from tests.conftest import TINY_NATIVE, randomized_dit

ROOT = Path(__file__).resolve().parent.parent


# ---- the harness ---------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file below ``roots`` (and the set of directories), to compare byte for byte."""
    out = {}
    for r in roots:
        if r.is_file():
            out[str(r)] = hashlib.sha256(r.read_bytes()).hexdigest()
        for p in sorted(r.rglob("*")) if r.is_dir() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def cli(*args: str) -> tuple[int, str]:
    """Run ``dit-compress ARGS`` through its real entry point; (exit code, everything printed).

    The CLI's rich console writes to whatever ``sys.stdout`` is at print time, so redirecting it captures the
    output; pinning ``console.file`` instead would leak into every later test's CliRunner."""
    from compress import cli as cli_mod

    buf = io.StringIO()
    old_argv = sys.argv
    sys.argv = ["dit-compress", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            cli_mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, buf.getvalue()


def assert_one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for n in needles:
        assert n in out, (n, out)


@pytest.fixture
def world(tmp_path):
    """A user's world: a home directory full of files, a decoy directory, a decoy file; and tiny inputs."""
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(os.urandom(2000))
    (home / "thesis.tex").write_text("\\documentclass{article}")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "notes.txt").write_text("do not delete")
    model = randomized_dit()
    ckpt = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), ckpt, metadata={"dit_config": json.dumps(model.config.to_dict())})
    w = {"root": tmp_path, "home": home, "decoy": decoy, "notes": tmp_path / "notes.txt", "ckpt": ckpt}
    before = snapshot(home, decoy, tmp_path / "notes.txt", ckpt)
    yield w
    assert snapshot(home, decoy, tmp_path / "notes.txt", ckpt) == before  # nothing of the user's was touched


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    m = compress.apply_recipe(randomized_dit(), "int8-weights", show_progress=False)
    return compress.save(m, d / "a")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from exporters.onnx import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    return export_onnx(randomized_dit(), d / "onnx")


def write_recipe(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


GOOD = {"name": "ok", "description": "fine", "passes": [{"pass": "quantize", "weights": {"dtype": "int8"}}]}


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


# ---- output paths: never delete what the toolkit did not write -------------------------------------
def test_force_never_replaces_a_user_directory(world):
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(world["decoy"]), "--force")
    assert_one_line_error(code, out, str(world["decoy"]), "not written by dit-compress")


def test_force_never_replaces_the_home_directory(world):
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(world["home"]), "--force")
    assert_one_line_error(code, out, str(world["home"]), "not written by dit-compress")


def test_export_force_never_replaces_a_user_directory(world):
    pytest.importorskip("onnxruntime")
    code, out = cli("export", "onnx", str(world["ckpt"]), "--out", str(world["decoy"]), "--force")
    assert_one_line_error(code, out, "not written by dit-compress")


def test_force_refuses_an_artifact_the_user_put_files_into(world, artifact):
    art = copy_artifact(artifact, world["root"] / "art")
    (art / "my-notes.md").write_text("mine")
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(art), "--force")
    assert_one_line_error(code, out, "my-notes.md", "did not write")
    assert (art / "my-notes.md").read_text() == "mine"


def test_force_refuses_a_symlink_to_a_user_directory(world):
    link = world["root"] / "link"
    link.symlink_to(world["decoy"])
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(link), "--force")
    assert_one_line_error(code, out, "not a directory dit-compress wrote")


def test_force_refuses_an_export_where_an_artifact_goes(world, onnx_export):
    exp = copy_artifact(onnx_export, world["root"] / "exp")
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(exp), "--force")
    assert_one_line_error(code, out, "is a ONNX export")
    assert (exp / "model.onnx").is_file()


def test_force_replaces_an_artifact_it_wrote(world, artifact):
    art = copy_artifact(artifact, world["root"] / "art")
    code, out = cli("apply", "w8a8-int8-dynamic", "--model", str(world["ckpt"]), "--out", str(art), "--force")
    assert code == 0, out
    assert json.loads((art / "manifest.json").read_text())["recipe"]["name"] == "w8a8-int8-dynamic"
    assert sorted(p.name for p in world["root"].iterdir() if p.name.startswith(".art")) == []


def test_existing_output_without_force_is_refused(world, artifact):
    art = copy_artifact(artifact, world["root"] / "art")
    before = snapshot(art)
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(art))
    assert_one_line_error(code, out, "already exists; pass --force")
    assert snapshot(art) == before


def test_a_directory_that_appears_during_the_write_is_never_replaced(world, tiny_native):
    """Two saves without --force: the one that finishes second fails, the first stays as written."""
    from compress.io import ARTIFACT, atomic_directory

    out = world["root"] / "race"
    with pytest.raises(DitCompressError, match="appeared while it was being written"):
        with atomic_directory(out, (ARTIFACT,)) as tmp:
            (tmp / "model.safetensors").write_bytes(b"second")
            compress.save(tiny_native, out)  # the other writer lands first
    assert compress.load(out) is not None
    assert not [p for p in world["root"].iterdir() if ".partial-" in p.name]


def test_workdir_the_user_made_keeps_their_files(world):
    recipe = write_recipe(world["root"] / "r.yaml", {
        "name": "r", "description": "d", "defaults": {"calibration": {"samples": 2, "steps": 2}},
        "passes": [{"pass": "distill", "steps": 2, "batch_size": 2, "checkpoint_every": 1}]})
    code, out = cli("apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(world["root"] / "a"),
                    "--workdir", str(world["decoy"]))
    assert code == 0, out
    assert [p.name for p in world["decoy"].iterdir()] == ["data.csv"]  # our checkpoint went, theirs stayed


def test_workdir_the_toolkit_made_is_removed_after_success(world):
    recipe = write_recipe(world["root"] / "r.yaml", {
        "name": "r", "description": "d", "defaults": {"calibration": {"samples": 2, "steps": 2}},
        "passes": [{"pass": "distill", "steps": 2, "batch_size": 2, "checkpoint_every": 1}]})
    code, out = cli("apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(world["root"] / "a"))
    assert code == 0, out
    assert not (world["root"] / "a.work").exists()


def test_workdir_that_is_a_file_is_refused(world):
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(world["root"] / "a"),
                    "--workdir", str(world["notes"]))
    assert_one_line_error(code, out, "work directory is a file")
    assert not (world["root"] / "a").exists()


def test_out_under_a_file_fails_before_any_work(world):
    t0 = time.perf_counter()
    code, out = cli("apply", "prune-depth-half", "--model", "reference", "--out", str(world["notes"] / "x"))
    assert_one_line_error(code, out, "is a file, not a directory")
    assert time.perf_counter() - t0 < 5  # refused before loading, calibrating or training


def test_unwritable_output_location_fails_before_any_work(world):
    code, out = cli("apply", "int8-weights", "--model", str(world["ckpt"]), "--out", "/proc/dit-compress-out")
    assert_one_line_error(code, out, "cannot be created")


@pytest.mark.parametrize("args", [
    ["sample", "reference", "--out", "{notes}/g.png"],
    ["sample", "reference", "--out", "{root}"],
    ["bench", "reference", "--out", "{notes}"],
    ["sensitivity", "reference", "--out", "{notes}/plan.yaml"],
    ["export", "onnx", "reference", "--out", "{notes}/x"],
])
def test_file_outputs_that_cannot_be_written_fail_first(world, args):
    code, out = cli(*[a.format(notes=world["notes"], root=world["root"]) for a in args])
    assert_one_line_error(code, out)


def test_stale_partial_and_old_directories_of_dead_writers_are_recovered(world, tiny_native):
    dead = 2**22 + 12345  # beyond pid_max on default kernels: never a live process
    partial = world["root"] / f".art.partial-{dead}-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    old = world["root"] / f".keep.old-{dead}-deadbeef"
    compress.save(tiny_native, old)  # a complete artifact moved aside by a replacement that never landed
    compress.save(tiny_native, world["root"] / "art")
    assert not partial.exists()
    compress.save(tiny_native, world["root"] / "other")  # a write elsewhere leaves .keep.old-* alone ...
    assert old.exists()
    with pytest.raises(DitCompressError, match="already exists"):  # ... the next write to 'keep' restores it first
        compress.save(tiny_native, world["root"] / "keep")
    assert compress.load(world["root"] / "keep") is not None and not old.exists()


def test_an_interrupted_write_is_never_loaded_as_an_artifact(world, tiny_native):
    partial = world["root"] / f".art.partial-{os.getpid()}-deadbeef"
    compress.save(tiny_native, partial)
    with pytest.raises(DitCompressError, match="unfinished artifact"):
        compress.load_model(partial)


# ---- validation never passes a broken model ---------------------------------------------------------
def test_onnx_export_of_nan_weights_fails_and_writes_nothing(world):
    pytest.importorskip("onnxruntime")
    from exporters.onnx import export_onnx

    m = randomized_dit()
    with torch.no_grad():
        m.final_layer.linear.weight.fill_(float("nan"))
    with pytest.raises(DitCompressError, match="non-finite output") as e:
        export_onnx(m, world["root"] / "nan")
    assert "Nothing was written" in str(e.value)
    assert not (world["root"] / "nan").exists()


def test_non_finite_source_is_blamed_not_the_pass(world):
    m = randomized_dit()
    with torch.no_grad():
        m.blocks[1].mlp.fc2.bias.fill_(float("inf"))
    with pytest.raises(DitCompressError, match=r"the source model produced non-finite outputs.*blocks\.1\.mlp\.fc2"):
        compress.apply_recipe(m, "int8-weights", show_progress=False)


def test_checkpoint_with_nan_weights_is_refused(world):
    m = randomized_dit()
    sd = m.state_dict()
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    p = world["root"] / "nan.safetensors"
    save_file(sd, p, metadata={"dit_config": json.dumps(m.config.to_dict())})
    code, out = cli("inspect", str(p))
    assert_one_line_error(code, out, "NaN or Inf", "blocks.0.attn.qkv.weight")


def test_bench_marks_a_nan_export_broken(world, onnx_export):
    pytest.importorskip("onnx")
    import onnx
    from onnx import numpy_helper

    bad = copy_artifact(onnx_export, world["root"] / "nan-onnx")
    m = onnx.load(str(bad / "model.onnx"))
    init = max(m.graph.initializer, key=lambda i: len(i.dims) and i.dims[0])  # a weight matrix
    arr = numpy_helper.to_array(init).copy()
    arr[...] = float("nan")
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    code, out = cli("bench", str(bad), "--baseline", str(onnx_export), "--out", str(world["root"] / "b"),
                    "--samples", "4", "--steps", "2", "--repeats", "1")
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert code == 2 and lines and "non-finite samples" in lines[0] and "Traceback" not in out
    rep = json.loads((world["root"] / "b" / "report.json").read_text())
    assert rep["notes"]["non_finite"] == ["nan-onnx"] and rep["variants"][1]["quality"]["fd"] is None


def test_bench_refuses_an_export_whose_files_were_swapped(world, onnx_export, tmp_path):
    pytest.importorskip("onnxruntime")
    from exporters.onnx import export_onnx

    other = export_onnx(randomized_dit(DiTConfig(**{**TINY_NATIVE.to_dict(), "input_size": 4})), tmp_path / "o4")
    swapped = copy_artifact(onnx_export, world["root"] / "swapped")
    for f in ("model.onnx", "model.onnx.data"):
        (swapped / f).write_bytes((other / f).read_bytes())
    code, out = cli("bench", str(swapped), "--baseline", str(onnx_export), "--out", str(world["root"] / "b"),
                    "--samples", "2", "--steps", "1")
    assert_one_line_error(code, out, "do not belong together")


def test_bench_refuses_an_export_without_a_sampling_contract(world, onnx_export):
    old = copy_artifact(onnx_export, world["root"] / "old")
    meta = json.loads((old / "export.json").read_text())
    del meta["sampling"]
    (old / "export.json").write_text(json.dumps(meta))
    code, out = cli("bench", str(old), "--out", str(world["root"] / "b"), "--samples", "2")
    assert_one_line_error(code, out, "sampling contract", "export again")


def test_bench_refuses_a_corrupt_export_json(world, onnx_export):
    bad = copy_artifact(onnx_export, world["root"] / "bad")
    (bad / "export.json").write_text('{"format": "dit-compress-onnx", ')
    code, out = cli("bench", str(bad), "--out", str(world["root"] / "b"), "--samples", "2")
    assert_one_line_error(code, out)


# ---- recipes: strict, and never silently different from what they say -------------------------------
RECIPE_CASES = [
    ("deeply nested", "name: x\ndescription: y\npasses:\n" + "  " + "[" * 2000 + "]" * 2000 + "\n", "nested"),
    ("duplicate key", "name: x\ndescription: y\nname: z\npasses: [{pass: quantize}]\n", "appears twice"),
    ("duplicate pass key", "name: x\ndescription: y\npasses:\n  - pass: quantize\n    weights: {dtype: int8}\n"
                           "    weights: {dtype: int4}\n", "'weights' appears twice"),
    ("bool as depth", {**GOOD, "passes": [{"pass": "prune_depth", "depth": True, "method": "last"}]},
     "field 'depth'"),
    ("bool as steps", {**GOOD, "passes": [{"pass": "distill", "steps": True}]}, "field 'steps'"),
    ("string number", {**GOOD, "defaults": {"calibration": {"samples": "64"}}}, "defaults.calibration.samples"),
    ("float as int", {**GOOD, "passes": [{"pass": "distill", "steps": 10.5}]}, "field 'steps'"),
    ("bad regex", {**GOOD, "passes": [{"pass": "quantize", "layers": {"include": ["re:blocks.(["]}}]},
     "not a valid regular expression"),
    ("prune after quantize", {**GOOD, "passes": [{"pass": "quantize"}, {"pass": "prune_width", "heads": 0.5}]},
     "Put pruning before quantization"),
    ("depth after quantize", {**GOOD, "passes": [{"pass": "quantize"}, {"pass": "prune_depth", "depth": 2,
                                                                         "method": "last"}]}, "pass #2"),
    ("duplicate manual keep", {**GOOD, "passes": [{"pass": "prune_depth", "depth": 2, "method": "manual",
                                                   "keep": {"block": [0, 0]}}]}, "listed more than once"),
    ("null passes", {**GOOD, "passes": None}, "field 'passes'"),
    ("int name", {**GOOD, "name": 12}, "field 'name'"),
    ("typo at top level", {**GOOD, "pases": []}, "field 'pases': unknown field"),
    ("huge steps", {**GOOD, "passes": [{"pass": "distill", "steps": 10**12}]}, "field 'steps'"),
    ("negative batch", {**GOOD, "passes": [{"pass": "distill", "batch_size": -4}]}, "field 'batch_size'"),
    ("too many passes", {**GOOD, "passes": [{"pass": "quantize"}] * 101}, "field 'passes'"),
    ("nan value", "name: x\ndescription: y\npasses: [{pass: distill, lr: .nan}]\n", "not plain numbers"),
    ("tabs", "name: x\n\tdescription: y\n", "line 2"),
    ("unknown pass", {**GOOD, "passes": [{"pass": "quantise"}]}, "known passes: cache, distill, linear_attention, moe,"),
    ("cuda device", {**GOOD, "defaults": {"device": "cuda"}}, "no CUDA device"),
    ("second quantize does nothing", {**GOOD, "passes": [{"pass": "quantize"}, {"pass": "quantize"}]},
     "pass #2 'quantize' has nothing to do"),
    ("depth keeps everything", {**GOOD, "passes": [{"pass": "prune_depth", "depth": 1.0, "method": "last"}]},
     "has nothing to do"),
    ("missing real data", {**GOOD, "defaults": {"calibration": {"samples": 2, "steps": 2}},
                           "passes": [{"pass": "distill", "steps": 1, "data": {"real": "nope.safetensors"}}]},
     "nope.safetensors does not exist"),
    ("pattern matches nothing", {**GOOD, "passes": [{"pass": "quantize", "layers": {"include": ["blocks.*.ffn"]}}]},
     "matches no Linear layer"),
]


@pytest.mark.parametrize("name,data,needle", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipes_are_one_line(world, name, data, needle):
    if name == "cuda device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = write_recipe(world["root"] / "bad.yaml", data)
    code, out = cli("apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(world["root"] / "o"))
    assert_one_line_error(code, out, needle)
    assert not (world["root"] / "o").exists()


def test_scientific_notation_is_a_number(world):
    recipe = write_recipe(world["root"] / "r.yaml", "name: x\ndescription: y\npasses: [{pass: distill, lr: 1e-4}]\n")
    assert compress.load_recipe(recipe).passes[0].lr == 1e-4


def test_binary_recipe_file(world):
    p = world["root"] / "bin.yaml"
    p.write_bytes(bytes(range(256)))
    code, out = cli("apply", str(p), "--out", str(world["root"] / "o"))
    assert_one_line_error(code, out, "not a text file")


def test_real_data_of_the_wrong_shape(world):
    data = world["root"] / "digits.safetensors"
    save_file({"latents": torch.zeros(4, 1, 4, 4), "y": torch.zeros(4, dtype=torch.long)}, data)
    recipe = write_recipe(world["root"] / "r.yaml", {**GOOD, "defaults": {"calibration": {"samples": 2, "steps": 2}},
                                                      "passes": [{"pass": "distill", "steps": 1,
                                                                  "data": {"real": str(data)}}]})
    code, out = cli("apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(world["root"] / "o"))
    assert_one_line_error(code, out, "latents have shape (1, 4, 4)")


def test_real_data_labels_out_of_range(world):
    data = world["root"] / "digits.safetensors"
    save_file({"latents": torch.zeros(4, 1, 8, 8), "y": torch.full((4,), 99, dtype=torch.long)}, data)
    recipe = write_recipe(world["root"] / "r.yaml", {**GOOD, "defaults": {"calibration": {"samples": 2, "steps": 2}},
                                                      "passes": [{"pass": "distill", "steps": 1,
                                                                  "data": {"real": str(data)}}]})
    code, out = cli("apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(world["root"] / "o"))
    assert_one_line_error(code, out, "must be integers in 0..9")


# ---- checkpoints ----------------------------------------------------------------------------------
def _ckpt_cases(root: Path) -> list[tuple[str, Path, str]]:
    cases = []
    p = root / "text.pt"
    p.write_text("this is not a checkpoint\n")
    cases.append(("text named .pt", p, "not a PyTorch checkpoint"))
    m = DiT(TINY_NATIVE)
    for name, meta, needle in [("meta not json", "{not json", "not valid JSON"),
                               ("meta a list", "[1, 2]", "expected a JSON object"),
                               ("meta unknown field", json.dumps({**TINY_NATIVE.to_dict(), "wings": 2}), "unknown"),
                               ("meta string depth", json.dumps({**TINY_NATIVE.to_dict(), "depth": "4"}), "depth"),
                               ("meta huge", json.dumps({**TINY_NATIVE.to_dict(), "hidden_size": 10**6,
                                                         "depth": 10**6}), "more than any DiT")]:
        p = root / f"{name.replace(' ', '_')}.safetensors"
        save_file(m.state_dict(), p, metadata={"dit_config": meta})
        cases.append((name, p, needle))
    p = root / "noheads.safetensors"  # width 48 is no published DiT width: heads cannot be read off shapes
    save_file(m.state_dict(), p)
    cases.append(("ambiguous heads", p, "number of attention heads cannot be read"))
    p = root / "list.pt"
    torch.save([torch.zeros(2)], p)
    cases.append(("pt holds a list", p, "expected a dict of tensors"))
    p = root / "empty_dict.pt"
    torch.save({}, p)
    cases.append(("pt holds nothing", p, "(empty)"))
    sd = {k: v.to(torch.int32) if k.endswith("qkv.weight") else v for k, v in m.state_dict().items()}
    p = root / "int_weights.safetensors"
    save_file(sd, p, metadata={"dit_config": json.dumps(TINY_NATIVE.to_dict())})
    cases.append(("integer weights in float slots", p, "dtype mismatches"))
    d = root / "diffusers_bad_json"
    d.mkdir()
    (d / "config.json").write_text("{")
    cases.append(("diffusers config not json", d, "invalid JSON"))
    d = root / "diffusers_unsupported"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    cases.append(("unsupported diffusers class", d, "is not supported"))
    d = root / "diffusers_huge"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "num_layers": 10**6}))
    cases.append(("absurd diffusers config", d, "num_layers"))
    d = root / "empty_dir"
    d.mkdir()
    cases.append(("empty directory", d, "without config.json"))
    p = root / "side.safetensors"
    save_file(m.state_dict(), p)
    (root / "side.json").write_text("[")
    cases.append(("broken sidecar config", p, "side.json: not valid JSON"))
    return cases


def test_bad_checkpoints_are_one_line(world):
    (world["root"] / "ckpts").mkdir()
    for name, path, needle in _ckpt_cases(world["root"] / "ckpts"):
        code, out = cli("inspect", str(path))
        assert code == 2, (name, out)
        assert_one_line_error(code, out, needle)


def test_sidecar_config_resolves_the_head_count(world):
    m = randomized_dit()
    p = world["root"] / "plain.safetensors"
    save_file(m.state_dict(), p)
    (world["root"] / "plain.json").write_text(json.dumps({"num_heads": 4}))
    loaded = compress.load_model(p)
    assert loaded.config == m.config


# ---- manifests are untrusted input ---------------------------------------------------------------
MANIFEST_EDITS = [
    ("missing key", lambda m: m.pop("edits"), "field 'edits'"),
    ("unknown key", lambda m: m.update(payload="x"), "field 'payload': unknown field"),
    ("weights outside the artifact", lambda m: m["weights"].update(file="../tiny.safetensors"), "weights.file"),
    ("weights absolute path", lambda m: m["weights"].update(file="/etc/passwd"), "weights.file"),
    ("wrong format", lambda m: m.update(format="something-else"), "not a dit-compress artifact manifest"),
    ("edit replaces nothing", lambda m: m["edits"].append(
        {"op": "replace", "path": "blocks.9.attn.qkv", "spec": {"type": "linear", "in_features": 1,
                                                               "out_features": 1, "bias": True}}), "edit #"),
    ("edit replaces a parameter", lambda m: m["edits"].append(
        {"op": "replace", "path": "pos_embed", "spec": {"type": "linear", "in_features": 1, "out_features": 1,
                                                        "bias": True}}), "edit #"),
    ("edit of unknown type", lambda m: m["edits"].append(
        {"op": "replace", "path": "blocks.0.attn.qkv", "spec": {"type": "evil"}}), "unknown module type"),
    ("edit with bad spec fields", lambda m: m["edits"].append(
        {"op": "replace", "path": "blocks.0.attn.qkv", "spec": {"type": "linear", "inn": 3}}), "edit #"),
    ("edit sets a method", lambda m: m["edits"].append(
        {"op": "set_attr", "path": "blocks.0.attn", "name": "forward", "value": 1}), "not one an edit may set"),
    ("edit changes a type", lambda m: m["edits"].append(
        {"op": "set_attr", "path": "blocks.0.attn", "name": "num_heads", "value": "six"}), "not one an edit may set"),
    ("edit removes missing blocks", lambda m: m["edits"].append(
        {"op": "remove_blocks", "kind": "block", "indices": [40]}), "cannot remove [40]"),
    ("edit of unknown kind", lambda m: m["edits"].append(
        {"op": "remove_blocks", "kind": "single", "indices": [0]}), "no block kind"),
    ("unknown edit op", lambda m: m["edits"].append({"op": "exec", "code": "rm -rf /"}), "unknown op 'exec'"),
    ("huge architecture", lambda m: m["architecture"]["config"].update(hidden_size=100000, depth=10000),
     "more than any DiT"),
    ("unknown architecture", lambda m: m["architecture"].update({"class": "Evil"}), "cannot rebuild"),
    ("bad sampling contract", lambda m: m["sampling"].update(steps=-1), "field 'sampling'"),
]


@pytest.mark.parametrize("name,edit,needle", MANIFEST_EDITS, ids=[c[0] for c in MANIFEST_EDITS])
def test_tampered_manifests_are_one_line(world, artifact, name, edit, needle):
    d = copy_artifact(artifact, world["root"] / "art")
    edit_manifest(d, edit)
    t0 = time.perf_counter()
    code, out = cli("inspect", str(d))
    assert_one_line_error(code, out, needle)
    assert time.perf_counter() - t0 < 5  # bounds are checked before anything is allocated


@pytest.mark.parametrize("content, needle", [("{", "corrupt manifest"), ("[1]", "not a dit-compress artifact"),
                                             ("", "corrupt manifest")])
def test_unreadable_manifests(world, artifact, content, needle):
    d = copy_artifact(artifact, world["root"] / "art")
    (d / "manifest.json").write_text(content)
    code, out = cli("inspect", str(d))
    assert_one_line_error(code, out, needle)


def test_weights_swapped_for_another_models(world, artifact):
    from compress.models.provenance import file_sha256

    d = copy_artifact(artifact, world["root"] / "art")
    other = DiT(DiTConfig(**{**TINY_NATIVE.to_dict(), "hidden_size": 32}))
    save_file(other.state_dict(), d / "model.safetensors")
    edit_manifest(d, lambda m: m["weights"].update(bytes=(d / "model.safetensors").stat().st_size,
                                                   sha256=file_sha256(d / "model.safetensors")))
    code, out = cli("inspect", str(d))
    assert_one_line_error(code, out, "does not match the expected DiT architecture")


# ---- exports and other commands --------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["export", "onnx", "{root}/nope", "--out", "{root}/o"], "no such file or directory"),
    (["export", "onnx", "reference", "--out", "{root}/o", "--opset", "10"], "opset 18 or newer"),
    (["export", "onnx", "reference", "--out", "{root}/o", "--qdq-activations", "int4"], "qdq_activations"),
    (["export", "onnx", "reference", "--out", "{root}/o", "--qdq-weights", "int4"], "qdq_weights"),
    (["export", "onnx", "reference", "--out", "{root}/o", "--tolerance", "5"], "--tolerance"),
    (["export", "tensorrt", "reference", "--out", "{root}/o"], "TensorRT is not installed"),
    (["bench", "{root}/nope", "--out", "{root}/b"], "does not load"),
    (["bench", "reference", "--baseline", "{root}/nope", "--out", "{root}/b"], "--baseline"),
    (["bench", "reference", "--samples", "0", "--out", "{root}/b"], "samples"),
    (["sample", "reference", "--classes", "0-99", "--out", "{root}/g.png"], "out of range"),
    (["sample", "reference", "--classes", "a-b", "--out", "{root}/g.png"], "--classes"),
    (["sample", "reference", "--per-class", "0", "--out", "{root}/g.png"], "--per-class"),
    (["inspect", "{root}/nope.safetensors"], "no such file"),
    (["apply", "int8-weights", "--model", "{onnx}", "--out", "{root}/o"], "an exported engine"),
    (["apply", "not-a-recipe", "--out", "{root}/o"], "recipe file not found"),
    (["quality", "--model", "mnist"], "--model"),
    (["sensitivity", "reference", "--formats", ","], "--formats"),
])
def test_other_bad_commands_are_one_line(world, onnx_export, args, needle):
    if args[:2] == ["export", "tensorrt"]:
        pytest.importorskip("onnxruntime")
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is installed here")
        except ImportError:
            pass
    code, out = cli(*[a.format(root=world["root"], onnx=onnx_export) for a in args])
    assert_one_line_error(code, out, needle)


def test_an_unexpected_exception_is_one_line_with_a_debug_hint(world, monkeypatch):
    import compress.models.adapters.base as base

    monkeypatch.setattr(base.ModelAdapter, "summary", lambda self: 1 / 0)
    code, out = cli("inspect", str(world["ckpt"]))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "ZeroDivisionError" in out and "--debug" in out
    assert "Traceback" not in out
    with pytest.raises(ZeroDivisionError):
        cli("--debug", "inspect", str(world["ckpt"]))


# ---- killed at random points: nothing half-written, nothing lost, the next run recovers ------------------
def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "compress.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_kills_at_random_points_leave_nothing_half_written(world):
    pytest.importorskip("onnxruntime")
    root = world["root"]
    recipe = write_recipe(root / "train.yaml", {
        "name": "train", "description": "d", "defaults": {"calibration": {"samples": 4, "steps": 3}},
        "passes": [{"pass": "quantize", "weights": {"dtype": "int8"}},
                   {"pass": "distill", "steps": 60, "batch_size": 8, "checkpoint_every": 10}]})
    jobs = {
        "apply": ["apply", "int8-weights", "--model", str(world["ckpt"]), "--out", str(root / "apply"), "--force"],
        "train": ["apply", str(recipe), "--model", str(world["ckpt"]), "--out", str(root / "train"), "--force",
                  "--resume"],
        "export": ["export", "onnx", str(world["ckpt"]), "--out", str(root / "export"), "--force"],
    }
    durations = {}
    for name, args in jobs.items():  # how long an uninterrupted run takes, to kill inside it
        t0 = time.perf_counter()
        assert _spawn(args).wait() == 0, name
        durations[name] = time.perf_counter() - t0
    rng = random.Random(0)
    kills = attempts = 0
    while kills < 21 and attempts < 45:
        for name, args in jobs.items():
            attempts += 1
            proc = _spawn(args)
            time.sleep(rng.uniform(0.1, 0.9) * durations[name])
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            for p in root.iterdir():  # whatever is there either loads as complete or refuses to load
                if p.name.startswith((".apply.", ".train.")):
                    with pytest.raises(DitCompressError):
                        compress.load(p)
                elif p.name in ("apply", "train"):
                    compress.load(p)  # verifies every byte against the manifest's sha256
                elif p.name == "export":
                    from exporters.onnx import OnnxRunner

                    OnnxRunner(p)
    assert kills >= 20
    for name, args in jobs.items():  # the next run succeeds and cleans up after the dead ones
        assert _spawn(args).wait() == 0, name
    left = sorted(p.name for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name)
    assert left == [], left
    assert compress.load(root / "apply") is not None and compress.load(root / "train") is not None


def test_written_files_get_the_permissions_open_would_give_not_owner_only(tmp_path, artifact):
    """Atomic writes go through mkstemp (0600); what lands must be readable as a plain write would leave it:
    0666 less the umask for a new file (here an artifact's manifest and weights), the old mode for a replaced one."""
    from compress.io import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    for f in ("manifest.json", "model.safetensors"):
        assert (artifact / f).stat().st_mode & 0o777 == want, f
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    notes.chmod(0o640)
    atomic_write_text(notes, '{"a": 1}')
    assert notes.stat().st_mode & 0o777 == 0o640 and notes.read_text() == '{"a": 1}'
