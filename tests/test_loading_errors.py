"""Bad inputs get one clear paragraph naming the file and the problem: never a traceback, never code execution."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import compress
from compress import DitCompressError
from compress.models.dit import DiT, DiTConfig

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture
def good_safetensors(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(DiT(TINY).state_dict(), path, metadata={"dit_config": json.dumps(TINY.to_dict())})
    return path


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_missing_file(tmp_path):
    with pytest.raises(DitCompressError, match=r"nope\.safetensors: no such file"):
        compress.load_model(tmp_path / "nope.safetensors")


def test_truncated_safetensors(good_safetensors):
    data = good_safetensors.read_bytes()
    good_safetensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(DitCompressError, match=r"tiny\.safetensors: not a readable safetensors file.*truncated"):
        compress.load_model(good_safetensors)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(DitCompressError, match=r"empty\.pt: the file is empty"):
        compress.load_model(p)


def test_truncated_pt(tmp_path):
    p = tmp_path / "model.pt"
    torch.save(DiT(TINY).state_dict(), p)
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(DitCompressError, match=r"model\.pt: not a readable PyTorch checkpoint"):
        compress.load_model(p)


def test_wrong_keys(tmp_path):
    sd = {k.replace("attn.qkv", "attn.to_qkv"): v for k, v in DiT(TINY).state_dict().items()}
    p = tmp_path / "renamed.safetensors"
    save_file(sd, p, metadata={"dit_config": json.dumps(TINY.to_dict())})
    with pytest.raises(DitCompressError, match=r"renamed\.safetensors.*missing keys.*blocks\.0\.attn\.qkv\.weight.*unexpected keys"):
        compress.load_model(p)


def test_not_a_dit(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, p)
    with pytest.raises(DitCompressError, match=r"other\.safetensors: not a DiT checkpoint.*missing keys"):
        compress.load_model(p)


def test_wrong_shapes(tmp_path):
    sd = DiT(TINY).state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    p = tmp_path / "shapes.safetensors"
    save_file(sd, p, metadata={"dit_config": json.dumps(TINY.to_dict())})
    with pytest.raises(DitCompressError, match=r"shapes\.safetensors.*shape mismatch.*blocks\.1\.mlp\.fc1\.weight: checkpoint \(100, 64\) vs model \(256, 64\)"):
        compress.load_model(p)


def test_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"model": DiT(TINY).state_dict(), "x": Payload()}, p)
    with pytest.raises(DitCompressError, match=r"evil\.pt: refused to load.*never unpickles"):
        compress.load_model(p)
    assert not (tmp_path / "PWNED").exists()


def test_unsupported_diffusers_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(DitCompressError, match=r"model class 'UNet2DConditionModel' is not supported"):
        compress.load_model(tmp_path)


def test_cli_prints_one_paragraph_not_a_traceback(good_safetensors):
    data = good_safetensors.read_bytes()
    good_safetensors.write_bytes(data[:100])
    r = subprocess.run([sys.executable, "-m", "compress.cli", "inspect", str(good_safetensors)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2
    assert "Traceback" not in r.stdout + r.stderr
    assert "not a readable safetensors file" in r.stdout + r.stderr


def test_pixart_preset_has_the_published_layout():
    from compress.models.loading import DIFFUSERS_PRESETS
    import diffusers

    cls_name, cfg = DIFFUSERS_PRESETS["PixArt-XL/2-256"]
    with torch.device("meta"):
        m = getattr(diffusers, cls_name)(**cfg)
    s = compress.get_adapter(m).summary()
    assert (s["family"], s["depth"], s["heads"], s["head_dim"], s["hidden"]) == ("pixart", 28, 16, 72, 1152)
    assert 600e6 < s["params"] < 620e6  # PixArt-alpha XL/2: ~611M
