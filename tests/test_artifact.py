"""Artifacts: bit-identical reload in a new process, atomic writes, --force, corrupted files refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import compress
from compress import DitCompressError


def _probe(model):
    g = torch.Generator().manual_seed(0)
    adapter = compress.get_adapter(model)
    x = torch.randn((4, *adapter.latent_shape), generator=g)
    cond = adapter.contract().example_cond(4, g)
    with torch.no_grad():
        return torch.stack([adapter.forward(x, torch.full((4,), t), cond) for t in (20.0, 500.0, 980.0)])


def test_reference_recipe_reloads_bit_identically_in_a_new_process(tmp_path):
    art = tmp_path / "int4"
    model = compress.apply_recipe(compress.load_model("reference"), "int4-weights-g32", show_progress=False)
    compress.save(model, art)
    torch.save(_probe(model), tmp_path / "expected.pt")
    code = (
        "import sys, torch, compress\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from test_artifact import _probe\n"
        "m = compress.load(sys.argv[1])\n"
        "sys.exit(0 if torch.equal(_probe(m), torch.load(sys.argv[2])) else 1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(art), str(tmp_path / "expected.pt"),
                        os.path.dirname(__file__)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["source"]["name"] == "reference" and len(manifest["source"]["sha256"]) == 64
    assert manifest["recipe"]["name"] == "int4-weights-g32"
    p = manifest["passes"][0]
    assert p["pass"] == "quantize" and p["bytes_after"] < p["bytes_before"] and p["seconds"] >= 0
    # block Linears stored as packed int4 (adaLN, embedders and final layer stay fp32 in this recipe)
    ref_bytes = sum(t.numel() * 4 for t in compress.load_model("reference").state_dict().values())
    assert manifest["weights"]["bytes"] < 0.5 * ref_bytes


def test_refuses_overwrite_without_force_and_replaces_with_force(tmp_path, tiny_native):
    compress.save(tiny_native, tmp_path / "a")
    with pytest.raises(DitCompressError, match="already exists; pass --force"):
        compress.save(tiny_native, tmp_path / "a")
    compress.save(tiny_native, tmp_path / "a", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no leftovers


def test_truncated_or_missing_weights_are_refused(tmp_path, tiny_native):
    art = compress.save(tiny_native, tmp_path / "a")
    w = art / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(DitCompressError, match="truncated or was modified"):
        compress.load(art)
    w.unlink()
    with pytest.raises(DitCompressError, match="model.safetensors is missing"):
        compress.load(art)
    (art / "manifest.json").unlink()
    with pytest.raises(DitCompressError, match="not a dit-compress artifact"):
        compress.load(art)


def test_pruned_and_quantized_tiny_model_round_trips(tmp_path, tiny_native):
    adapter = compress.get_adapter(tiny_native)
    adapter.remove_blocks("block", [1, 2])
    m = compress.apply_recipe(tiny_native, "int8-weights", show_progress=False)
    loaded = compress.load(compress.save(m, tmp_path / "a"))
    assert len(loaded.blocks) == 2
    assert torch.equal(_probe(loaded), _probe(m))


# The real CLI (``compress.cli.main``), with markers written when ``apply_recipe`` starts and ``save`` starts, so
# the test kills at a known moment instead of after a guessed delay (imports alone take seconds).
KILL_CHILD = """
import sys
from pathlib import Path
import compress

marks = Path(sys.argv[1])

def marked(name, fn):
    def run(*a, **k):
        (marks / name).write_text("")
        return fn(*a, **k)
    return run

compress.apply_recipe = marked("apply", compress.apply_recipe)
compress.save = marked("save", compress.save)
from compress.cli import main
sys.argv = ["dit-compress", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("moment", ["during_apply", "during_save"])
def test_sigkill_leaves_no_loadable_artifact(tmp_path, moment):
    out, marks = tmp_path / "art", tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(marks), "apply", "int8-weights", "--model",
                             "DiT-B/2", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.time() + 300

    def wait_for(ready):
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)

    if moment == "during_apply":  # the recipe is running: the model is loaded, nothing is being written yet
        wait_for(lambda: (marks / "apply").exists())
        time.sleep(0.2)
        assert not (marks / "save").exists()
    else:  # the temporary directory exists and is being filled
        wait_for(lambda: any(".partial-" in p.name for p in tmp_path.iterdir()))
        assert any(".partial-" in p.name for p in tmp_path.iterdir())
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # alive at the moment of the kill
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # and it died of the signal, not of something else
    assert (marks / "apply").exists() and (marks / "save").exists() == (moment == "during_save")
    assert not out.exists()
    with pytest.raises(DitCompressError):
        compress.load(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("marks", "art.work")]  # art.work: for --resume
    assert all(".partial-" in p.name for p in leftovers), leftovers  # only the hidden temporary directory may remain ...
    assert len(leftovers) == (moment == "during_save")
    for partial in [*leftovers, tmp_path / "art.work"]:  # ... and it is never mistaken for an artifact
        with pytest.raises(DitCompressError):
            compress.load(partial)
