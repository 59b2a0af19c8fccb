"""The training-state file that lets a run stop anywhere and continue exactly.

Beside the output checkpoint ``<out>``: ``<out stem>.resume.pt`` (torch's zip format, written
atomically: a temporary file, fsynced, renamed). It holds the run's identity (what must not
change on resuming: model config, steps, batch, learning rate, seed, ...), the model's weights,
its EMA, the stages finished and, of the stage under way, the optimiser, the learning-rate
schedule's position, the step, the loss sums since the last log entry and the log so far, and
the running random streams of models that draw from them (one per rank). Keyed draws need
nothing but the step.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from tera_pipeline.core.errors import InputError
from tera_pipeline.storage.atomic import write_with

FORMAT = 1
"""The layout of the state file; a file of another layout is refused."""


def resume_path(out: Path) -> Path:
    """The state file of a run writing the checkpoint ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume.pt")


def figures_dir(out: Path) -> Path:
    """The folder beside the checkpoint ``out`` for its loss curve, samples and log."""
    out = Path(out)
    return out.with_name(f"{out.stem}_training")


def is_training_state(path: Path) -> bool:
    """Whether ``path`` is a training-state file (a zip), not a safetensors checkpoint."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_state(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The state in ``path`` (on the CPU), refused unless it is of the run ``run``."""
    if not is_training_state(path):
        raise InputError(f"{path} is not a training-state file (*.resume.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign zip
        raise InputError(f"{path} is unreadable as a training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a training state of format {FORMAT}")
    saved = state["run"]
    changed = sorted(k for k in run.keys() | saved.keys() if run.get(k) != saved.get(k))
    if changed:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {run.get(k)!r}" for k in changed)
        raise InputError(f"{path} is of another run; resuming it cannot change {pairs}")
    return state
