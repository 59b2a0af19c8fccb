"""A terminal progress bar over training steps (rank 0): stage, steps done, the last loss, the
learning rate, time spent and left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """Context manager; ``stage(name, steps, done)`` starts a bar, ``step(done, loss, lr)``
    moves it. On stderr, so that stdout keeps the JSON log lines."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  lr {task.fields[lr]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: int | None = None

    def __enter__(self) -> StepProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def stage(self, name: str, steps: int, done: int = 0) -> None:
        self._task = self._bar.add_task(name, total=steps, completed=done, loss="-", lr="-")

    def step(self, done: int, loss: float, lr: float) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=done, loss=f"{loss:.4g}", lr=f"{lr:.3g}")
