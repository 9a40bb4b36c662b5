"""The bundled reference model: a class-conditional DiT trained on scikit-learn's 8x8 digits.

It exists so that every pass, benchmark and test runs out of the box with a model whose quality
can be measured (FD and class consistency through the bundled evaluator), without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.models.dit import DiTConfig

HERE = Path(__file__).parent
WEIGHTS = HERE / "reference_dit.safetensors"
EVALUATOR_WEIGHTS = HERE / "evaluator.safetensors"

# 8x8 single-channel digits, 2x2 patches -> 16 tokens; 12 blocks so depth pruning has room.
REFERENCE_CONFIG = DiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=1,
    hidden_size=96,
    depth=12,
    num_heads=6,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=10,
    learn_sigma=False,
)
# The second reference: the same digits at patch size 1, so every image is 64 tokens and attention's
# cost matters (linear-attention students are judged on it). Fewer, equally wide blocks keep its
# training inside three hours on one CPU thread.
WEIGHTS_P1 = HERE / "reference_p1_dit.safetensors"
REFERENCE_P1_CONFIG = DiTConfig(
    input_size=8,
    patch_size=1,
    in_channels=1,
    hidden_size=96,
    depth=8,
    num_heads=6,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=10,
    learn_sigma=False,
)
# Bundled models by the name ``load_model`` accepts: (config, weights file).
REFERENCES = {"reference": (REFERENCE_CONFIG, WEIGHTS), "reference-p1": (REFERENCE_P1_CONFIG, WEIGHTS_P1)}
# Sampling settings the shipped quality figures are measured with.
REFERENCE_STEPS = 50
REFERENCE_CFG = 1.5


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) floats in [-1, 1] and their labels (shipped inside scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(d.target.astype(np.int64))


def evaluator_split(n: int = 1797, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train / held-out indices for the evaluator (80 / 20)."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(0.8 * n)
    return np.sort(perm[:cut]), np.sort(perm[cut:])
