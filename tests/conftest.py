import os

# One thread everywhere, set before torch is imported: child processes the tests start inherit the same
# OMP_NUM_THREADS, and bit-identity of outputs holds only between processes with equal thread counts
# (matmul reduction order depends on it on some CPUs).
os.environ["OMP_NUM_THREADS"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

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


ROOT = Path(__file__).resolve().parent.parent


def run_torchrun(args: list[str], port: int, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc --master_port port ARGS`` (a script path, or ``-m module``) on CPU,
    which makes gloo ranks; must succeed. One torch thread per rank and this checkout first on the path, so
    the ranks run the code under test; each test passes its own port (tests run in parallel workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", str(port), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r
