"""The digit evaluator that ships beside the reference model.

A small CNN trained on the digits (held-out accuracy >= 97%). Its 128-d penultimate features define
the Fréchet distance "FD" (the FID analogue for this data), and its predictions score class
consistency: does a sample generated for class k look like a k?

    python -m compress.models.reference.evaluator   # retrains and rewrites evaluator.safetensors
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from compress.models.reference import EVALUATOR_WEIGHTS, digits_dataset, evaluator_split


class DigitClassifier(nn.Module):
    """conv(32) -> conv(64) -> pool -> fc(128) features -> fc(10) logits, for (N, 1, 8, 8) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel translations, so the features are not brittle to small misplacements."""
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_evaluator(epochs: int = 40, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the fixed 80% split; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits_dataset()
    tr, te = evaluator_split(len(images))
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xtr, ytr = images[tr], labels[tr]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(model(_shift(xtr[b], gen)), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[te]).argmax(1) == labels[te]).float().mean().item()
    return model, acc


@lru_cache(maxsize=1)
def load_evaluator() -> DigitClassifier:
    """The shipped evaluator, in eval mode."""
    model = DigitClassifier()
    model.load_state_dict(load_file(EVALUATOR_WEIGHTS))
    return model.eval().requires_grad_(False)


def main() -> None:
    model, acc = train_evaluator()
    print(f"held-out accuracy {acc:.4f}")
    if acc < 0.97:
        raise SystemExit("evaluator below the 97% bar; not written")
    tmp = EVALUATOR_WEIGHTS.with_suffix(".tmp")
    save_file(model.state_dict(), tmp, metadata={"heldout_accuracy": f"{acc:.4f}"})
    os.replace(tmp, EVALUATOR_WEIGHTS)
    print(f"wrote {EVALUATOR_WEIGHTS}")


if __name__ == "__main__":
    main()
