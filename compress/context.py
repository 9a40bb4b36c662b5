"""What a run of passes has, whatever the passes do: device, seed, a log, progress bars, a work directory,
its place in a process group.

The calibration source (whose trajectories calibration and training record) is separate:
``compress.calibration.CalibrationSource``. A pass receives both in a ``compress.passes.PassContext``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compress.io import WorkDir


def world() -> tuple[int, int]:
    """(rank, world size) of this process in the torch.distributed group, (0, 1) when there is none: how training
    passes shard their data and how ``bench`` shards its samples under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class RunContext:
    """Shared by every pass of one recipe run."""

    device: str = "cpu"
    seed: int = 0
    console: Console | None = None
    show_progress: bool = True
    notes: list[str] = field(default_factory=list)  # the running pass's log (recorded in the manifest)
    # Training passes checkpoint under ``workdir`` and, with ``resume``, continue from their last checkpoint.
    workdir: WorkDir | None = None
    resume: bool = False
    pass_index: int = 0  # position of the running pass in its recipe (names its checkpoints)

    def note(self, message: str) -> None:
        """Recorded in the manifest under the current pass."""
        self.notes.append(message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None):
        """A progress bar; yields ``advance(n=1, info="")``."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"), console=self.console, transient=True,
                       disable=not self.show_progress)
        with bar:
            task = bar.add_task(description, total=total, info="")
            yield lambda n=1, info="": bar.update(task, advance=n, info=info)
