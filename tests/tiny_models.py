"""Tiny randomly initialised diffusers transformers, one per supported family, for fast tests."""

from __future__ import annotations

import torch

# Expected structure of each tiny model: depth (all block kinds), heads, head_dim, MLP width.
TINY_SPECS: dict[str, dict[str, int]] = {
    "diffusers-dit": {"depth": 3, "heads": 2, "head_dim": 16, "mlp_hidden": 128},
    "pixart": {"depth": 2, "heads": 2, "head_dim": 16, "mlp_hidden": 128},
    "sd3": {"depth": 3, "heads": 2, "head_dim": 16, "mlp_hidden": 128},
    "flux": {"depth": 4, "heads": 2, "head_dim": 16, "mlp_hidden": 128},
}


def tiny_diffusers_model(family: str) -> torch.nn.Module:
    """A seeded tiny model of ``family`` ("diffusers-dit", "pixart", "sd3", "flux") in eval mode."""
    import diffusers

    torch.manual_seed(0)
    common = {"num_attention_heads": 2, "attention_head_dim": 16}
    if family == "diffusers-dit":
        model = diffusers.DiTTransformer2DModel(
            **common, in_channels=4, out_channels=8, num_layers=3, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10,
        )
        # Converted DiT checkpoints hold one timestep/label embedder copied into every block (the final layer
        # reads block 0's); tie the copies so removing block 0 behaves like it does on real weights.
        for blk in model.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    elif family == "pixart":
        model = diffusers.PixArtTransformer2DModel(
            **common, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
            cross_attention_dim=32, caption_channels=24,
        )
    elif family == "sd3":
        model = diffusers.SD3Transformer2DModel(
            **common, sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
            dual_attention_layers=(0,),
        )
    elif family == "flux":
        model = diffusers.FluxTransformer2DModel(
            **common, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, joint_attention_dim=32,
            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
    else:
        raise ValueError(f"unknown diffusers family {family!r}")
    return model.eval()
