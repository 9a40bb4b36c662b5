"""The diffusers family adapters: structure read correctly, the denoiser callable, block removal safe."""

from __future__ import annotations

import pytest
import torch

from compress.models.adapters import get_adapter
from tests.tiny_models import tiny_diffusers_model

FAMILIES = ["diffusers-dit", "pixart", "sd3", "flux"]


def _reload(model: torch.nn.Module, path) -> torch.nn.Module:
    """Round trip through save_pretrained / from_pretrained, as a user's checkpoint arrives."""
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


def _run(adapter, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *adapter.latent_shape), generator=g)
    cond = adapter.contract().example_cond(batch, generator=g)
    with torch.no_grad():
        return x, adapter.forward(x, torch.tensor([500.0, 20.0][:batch]), cond), cond


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_structure_matches_config(family, tmp_path):
    adapter = get_adapter(_reload(tiny_diffusers_model(family), tmp_path))
    c = adapter.model.config
    s = adapter.summary()
    depth = c.num_layers + (c.num_single_layers if family == "flux" else 0)
    assert s["family"] == family
    assert (s["depth"], s["heads"], s["head_dim"]) == (depth, c.num_attention_heads, c.attention_head_dim)
    assert s["hidden"] == c.num_attention_heads * c.attention_head_dim
    assert s["mlp_hidden"] == 4 * s["hidden"]
    assert s["prediction"] == ("flow" if family in ("sd3", "flux") else "epsilon")
    assert s["num_classes"] == (10 if family == "diffusers-dit" else None)
    for b in adapter.blocks():
        for a in b.attentions:
            assert a.q.out_features == a.heads * a.head_dim
        for m in b.mlps:
            assert m.fc_in.out_features == m.hidden
            assert m.fc_out.in_features == m.fc_out_offset + m.hidden
        assert len(b.modulation) == {"block": 0 if family == "pixart" else 1, "joint": 2, "single": 1}[b.kind]


def test_family_specific_views(family):
    adapter = get_adapter(tiny_diffusers_model(family))
    blocks = adapter.blocks()
    if family == "pixart":
        assert [a.kind for a in blocks[0].attentions] == ["self", "cross"]
        assert blocks[0].attentions[1].k.in_features == adapter.model.config.cross_attention_dim
    elif family == "sd3":
        first, last = blocks[0], blocks[-1]
        assert [a.kind for a in first.attentions] == ["joint", "self"]  # dual attention (SD3.5) in block 0
        assert len(first.mlps) == 2 and first.attentions[0].context_out is not None
        # The last block only feeds the context into attention: no context output projection or MLP.
        assert len(last.mlps) == 1 and last.attentions[0].context_out is None
        assert last.attentions[0].context_q is not None
    elif family == "flux":
        joint, single = [b for b in blocks if b.kind == "joint"], [b for b in blocks if b.kind == "single"]
        assert [b.path for b in single] == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
        assert joint[0].attentions[0].kind == "joint" and len(joint[0].mlps) == 2
        sa, sm = single[0].attentions[0], single[0].mlps[0]
        assert sa.out is None and sa.kind == "joint" and sa.image_tokens == "last"  # one [text | image] stream
        assert sm.fc_out_offset == adapter.hidden_size and sm.fc_out is single[0].module.proj_out
        assert adapter.latent_shape == (16, 4)


def test_forward_shape_and_null_cond(family):
    adapter = get_adapter(tiny_diffusers_model(family))
    x, out, cond = _run(adapter)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with torch.no_grad():
        uncond = adapter.forward(x, torch.tensor(500.0), adapter.contract().null_cond(cond))  # scalar t is expanded
        cond_scalar_t = adapter.forward(x[:1], torch.tensor(500.0), {k: v[:1] for k, v in cond.items()})
    assert uncond.shape == x.shape and not torch.allclose(uncond[:1], cond_scalar_t)
    torch.testing.assert_close(cond_scalar_t, out[:1])  # batch element 0 had t=500 too
    # Seeded example conditions are reproducible.
    again = adapter.contract().example_cond(2, generator=torch.Generator().manual_seed(0))
    first = adapter.contract().example_cond(2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_remove_blocks_each_kind(family, tmp_path):
    adapter = get_adapter(tiny_diffusers_model(family))
    for kind in adapter.block_lists:
        depth = adapter.depth
        adapter.remove_blocks(kind, [0])
        assert adapter.depth == depth - 1
        x, out, _ = _run(adapter)
        assert out.shape == x.shape and torch.isfinite(out).all()
    c = adapter.model.config
    assert c.num_layers == len(adapter.model.transformer_blocks)
    if family == "flux":
        assert c.num_single_layers == len(adapter.model.single_transformer_blocks) == 1
    if family == "sd3":
        assert tuple(c.dual_attention_layers) == ()  # block 0 (the dual one) is gone
    # The updated config rebuilds the same structure, so the pruned model round-trips.
    reloaded = get_adapter(_reload(adapter.model, tmp_path))
    assert reloaded.depth == adapter.depth
    x = torch.randn((1, *adapter.latent_shape))
    cond = adapter.contract().example_cond(1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward(x, torch.tensor([300.0]), cond),
                                   adapter.forward(x, torch.tensor([300.0]), cond))


def test_sd3_removing_last_block_is_exact_and_reloads(tmp_path):
    """The new last block becomes context-pre-only (as from_pretrained would build it) without changing outputs."""
    adapter = get_adapter(tiny_diffusers_model("sd3"))
    x = torch.randn((2, *adapter.latent_shape))
    cond = adapter.contract().example_cond(2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 100.0])
    blocks = adapter.model.transformer_blocks
    adapter.model.transformer_blocks = torch.nn.ModuleList(list(blocks)[:-1])  # plain removal, no hook
    with torch.no_grad():
        expected = adapter.forward(x, t, cond)
    adapter.model.transformer_blocks = blocks
    adapter.remove_blocks("joint", [2])
    last = adapter.blocks()[-1]
    assert last.module.context_pre_only and len(last.mlps) == 1 and last.attentions[0].context_out is None
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(x, t, cond), expected)
        torch.testing.assert_close(get_adapter(_reload(adapter.model, tmp_path)).forward(x, t, cond), expected)


def test_remove_blocks_rejects_unknown_kind():
    adapter = get_adapter(tiny_diffusers_model("flux"))
    with pytest.raises(KeyError):
        adapter.remove_blocks("block", [0])
    with pytest.raises(IndexError):
        adapter.remove_blocks("single", [5])
