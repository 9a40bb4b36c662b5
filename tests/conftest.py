import os

# One thread everywhere, set before torch is imported: child processes the tests start inherit the same
# OMP_NUM_THREADS, and bit-identity of outputs holds only between processes with equal thread counts
# (matmul reduction order depends on it on some CPUs).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from compress.models.dit import DiT, DiTConfig  # noqa: E402
from compress.models.provenance import stamp_source  # noqa: E402

TINY_NATIVE = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=4, num_heads=4,
                        num_classes=10, learn_sigma=False)


def randomized_dit(config: DiTConfig = TINY_NATIVE, seed: int = 0) -> DiT:
    """A tiny DiT with every weight random (adaLN-Zero init would make blocks no-ops)."""
    torch.manual_seed(seed)
    m = DiT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return stamp_source(m.eval(), "tiny-test", None)


@pytest.fixture
def tiny_native() -> DiT:
    return randomized_dit()
