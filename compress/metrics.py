"""Quality metrics: FD and class consistency (reference model), PSNR / SSIM against the source."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import linalg


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    import warnings

    with warnings.catch_warnings():  # near-singular products are handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # nearly singular product: regularise, as FID code does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-image PSNR in dB (identical images count as 100 dB)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10 * data_range**2)
    return float((10 * torch.log10(data_range**2 / mse)).clamp(max=100.0).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-image SSIM (scikit-image), window shrunk to fit small images."""
    from skimage.metrics import structural_similarity

    win = min(7, *a.shape[-2:])
    win -= 1 - win % 2  # odd
    vals = [
        structural_similarity(x.numpy(), y.numpy(), data_range=data_range, channel_axis=0, win_size=win)
        for x, y in zip(a.float(), b.float())
    ]
    return float(np.mean(vals))


# ---- reference-model quality (the bundled evaluator) ----------------------------------------------
@torch.no_grad()
def evaluator_features(images: torch.Tensor) -> np.ndarray:
    from compress.models.reference.evaluator import load_evaluator

    ev = load_evaluator()
    return torch.cat([ev.features(images[i : i + 512].clamp(-1, 1)) for i in range(0, len(images), 512)]).numpy()


@lru_cache(maxsize=1)
def _real_features() -> np.ndarray:
    from compress.models.reference import digits_dataset

    return evaluator_features(digits_dataset()[0])


def reference_quality(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """FD against all 1,797 real digits and class-consistency accuracy of generated digits."""
    from compress.models.reference.evaluator import load_evaluator

    images = images.clamp(-1, 1)
    with torch.no_grad():
        pred = torch.cat([load_evaluator()(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return {
        "fd": frechet_distance(evaluator_features(images), _real_features()),
        "class_acc": float((pred == labels).float().mean()),
    }


def real_halves_fd(seed: int = 0) -> float:
    """FD between two disjoint random halves of the real digits: the floor a perfect model reaches."""
    feats = _real_features()
    perm = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    return frechet_distance(feats[perm[:half]], feats[perm[half : 2 * half]])
