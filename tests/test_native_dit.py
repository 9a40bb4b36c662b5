"""The native DiT against an independent functional implementation of the official DiT layout.

``official_forward`` is written from the published parameter layout of facebookresearch/DiT
(timm Attention/Mlp inside each block, adaLN-Zero chunk order, [cos, sin] timestep features,
sin-cos position table, 'nhwpqc->nchpwq' un-patchify); it reads only the state dict, so any naming
or ordering drift in ``compress.models.dit`` shows up as a mismatch or a strict-load failure.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.models.dit import DIT_CONFIGS, DiT, DiTConfig


def official_forward(sd, cfg: DiTConfig, x, t, y):
    p, D, H = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    n = x.shape[0]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, 1)
        h = ln(tok) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(n, -1, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q * (D // H) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(n, -1, D)
        tok = tok + g1[:, None] * F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = ln(tok) * (1 + sc2[:, None]) + sh2[:, None]
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        tok = tok + g2[:, None] * F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    sh, sc = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                      sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    out = F.linear(ln(tok) * (1 + sc[:, None]) + sh[:, None], sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = int(out.shape[1] ** 0.5)
    co = cfg.out_channels
    out = out.reshape(n, g, g, p, p, co)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, co, g * p, g * p)


def official_pos_embed(dim, grid_size):
    """The published numpy recipe, verbatim in structure: meshgrid(w, h), emb_h from grid[0]."""
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape([2, 1, grid_size, grid_size])

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def randomized(model: DiT, seed=0) -> DiT:
    """Give zero-initialised (adaLN-Zero) layers random values so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_all_twelve_configs_have_official_layout(name):
    cfg = DIT_CONFIGS[name]
    # Shrink width/depth/resolution but keep the config's patch size and head count: layout is what matters.
    small = DiTConfig(input_size=2 * cfg.patch_size, patch_size=cfg.patch_size, in_channels=4,
                      hidden_size=cfg.num_heads * 8, depth=2, num_heads=cfg.num_heads, num_classes=10)
    model = randomized(DiT(small)).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, small.input_size, small.input_size)
    t, y = torch.tensor([3, 870]), torch.tensor([1, 10])  # 10 = the null (CFG) class
    ref = official_forward(sd, small, x, t, y)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 8, small.input_size, small.input_size)  # learn_sigma doubles channels
    assert (out - ref).abs().max() < 1e-5


def test_official_parameter_names_and_shapes_xl2():
    with torch.device("meta"):
        model = DiT(DIT_CONFIGS["DiT-XL/2"])
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == pytest.approx(675.1e6, rel=1e-3)  # DiT-XL/2: 675M params
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["blocks.27.attn.qkv.weight"].shape == (3456, 1152)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)
    assert len([k for k in sd if k.startswith("blocks.")]) == 28 * 10  # qkv, proj, fc1, fc2, adaLN: weight + bias each


def test_pos_embed_matches_published_recipe():
    model = DiT(DiTConfig(input_size=16, patch_size=2, hidden_size=64, depth=1, num_heads=4))
    ref = torch.from_numpy(official_pos_embed(64, 8)).float()
    assert torch.allclose(model.pos_embed[0], ref, atol=1e-6)


def test_official_checkpoint_loads_strict_and_matches(tmp_path):
    """A train.py-style checkpoint ({'model', 'ema', 'opt', 'args'}) loads through compress.load_model."""
    import compress

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6, num_classes=1000)
    src = randomized(DiT(cfg)).eval()
    ckpt = {"model": {k: torch.zeros_like(v) for k, v in src.state_dict().items()},
            "ema": src.state_dict(), "opt": {"state": {}, "param_groups": []}, "args": {"lr": 1e-4}}
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    loaded = compress.load_model(path)
    assert loaded.config == cfg  # depth, width, heads (from the official table), classes, learn_sigma inferred
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 7, 1000])
    with torch.no_grad():
        assert (loaded(x, t, y) - src(x, t, y)).abs().max() < 1e-5
