"""Quality of the shipped reference model against the real digits (FD, class accuracy).

    python -m benchmarks.reference_quality --samples 1000 --steps 50 --out benchmarks/results/reference

Writes quality.json (figures, sampling settings, machine) and grid.png (one row per class).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from compress.evaluation import reference_quality_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=None, help="guidance (default: REFERENCE_CFG)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reference"))
    a = p.parse_args()
    reference_quality_report(a.samples, a.steps, a.out, Console(), cfg_scale=a.cfg)


if __name__ == "__main__":
    main()
