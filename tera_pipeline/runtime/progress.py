"""A terminal progress bar over blocks, one line per phase (conditioning, each DDIM step)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class BlockProgress:
    """Context manager usable as the engine's ``progress(phase, done, total)`` callback."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description:>14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> BlockProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(self._tasks[phase], completed=done)
