"""What one training run shares across its stages: its processes and device, the root model
and the EMA of its weights, the options (accumulation, checkpoints, figures, stop), the state it
resumed from, and the watching (progress bar, figures folder). Rank 0 alone logs and saves.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tera_pipeline.core.errors import InputError, TeraError
from tera_pipeline.training import figures
from tera_pipeline.training.distributed import (
    Ranks,
    barrier,
    device_for,
    env_ranks,
    gather,
    join,
)
from tera_pipeline.training.ema import EMA
from tera_pipeline.training.progress import StepProgress
from tera_pipeline.training.resume import figures_dir, load_state, resume_path, save_state


class TrainingStopped(TeraError):
    """The run stopped where it was asked to (``stop_after``), its state saved to resume."""


@dataclass(frozen=True)
class TrainOptions:
    """How a run is carried out, whatever the model: ``accumulate`` micro-batches per step, the
    EMA ``ema_decay`` (None: no EMA), a training state every ``checkpoint_every`` steps of a
    stage (0: none), the log, loss curves and sample images every ``figures_every`` steps and
    at each stage's end (0: at the end alone; None: none), ``stop_after`` steps of the run
    (the state saved; None: to the end), a progress bar, the state file to ``resume`` from."""

    accumulate: int = 1
    ema_decay: float | None = None
    checkpoint_every: int = 0
    figures_every: int | None = None
    stop_after: int | None = None
    progress: bool = False
    resume: Path | None = None

    def __post_init__(self) -> None:
        if self.accumulate < 1 or self.checkpoint_every < 0 or (self.figures_every or 0) < 0:
            raise InputError("accumulate must be >= 1, checkpoint and figure intervals >= 0")
        if self.stop_after is not None and self.stop_after < 1:
            raise InputError(f"stop_after must be >= 1, got {self.stop_after}")


class Trainer:
    """A run writing ``out`` (None: no state, no figures) of identity ``run`` (what a resumed
    state must match), training ``model``; ``entries`` is the run's log (restored on resume).
    A context manager: it joins the process group (``torchrun``) and shows the progress bar."""

    def __init__(
        self,
        model: torch.nn.Module,
        options: TrainOptions | None = None,
        out: Path | None = None,
        run: dict[str, Any] | None = None,
        entries: list[dict] | None = None,
    ) -> None:
        self.options = options or TrainOptions()
        self.ranks: Ranks = env_ranks()
        self.device = device_for(self.ranks)
        self.model = model.to(self.device)
        self.out = None if out is None else Path(out)
        self.entries = entries if entries is not None else []
        decay = self.options.ema_decay
        self.ema = EMA(self.model, decay) if decay is not None else None
        self.completed: list[str] = []
        self.done = 0  # steps of the stages finished
        self.started = time.perf_counter()
        self.run = run or {}
        self.state: dict[str, Any] | None = None
        if self.options.resume is not None:
            self._resume(load_state(self.options.resume, self.run))
        self.progress: StepProgress | None = None
        self._stack = ExitStack()

    @classmethod
    def single(cls, model: torch.nn.Module) -> Trainer:
        """Today's one-process training of ``model``: no EMA, no state, no figures."""
        return cls(model)

    def __enter__(self) -> Trainer:
        join(self.ranks, self.device)
        if self.options.progress and self.ranks.main:
            self.progress = self._stack.enter_context(StepProgress())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _resume(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.completed, self.done = list(state["completed"]), int(state["done"])
        self.entries[:] = state["log"]
        self.state = state

    @property
    def state_file(self) -> Path | None:
        """Where the run's training states go (None: nowhere)."""
        return None if self.out is None else resume_path(self.out)

    @property
    def folder(self) -> Path | None:
        """The figures folder beside the checkpoint (rank 0's; None where it writes none)."""
        return figures_dir(self.out) if self.out is not None and self.ranks.main else None

    def skips(self, key: str) -> bool:
        """Whether stage ``key`` was finished before the state this run resumed."""
        return key in self.completed

    def restore(self, key: str, opt, schedule, streams) -> tuple[int, dict[str, float], float]:
        """The step stage ``key`` starts at, its loss sums and the seconds spent before: from the
        resumed state if it stopped in this stage (optimiser, schedule, streams restored)."""
        state = self.state
        if state is None or state["stage"] != key:
            return 0, {}, 0.0
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        saved = state["streams"]
        if streams and len(saved) != self.ranks.world:
            raise InputError(
                f"stage {key!r} draws from running streams saved by {len(saved)} processes; "
                f"resume it with as many, not {self.ranks.world}"
            )
        for stream, value in zip(streams, saved[self.ranks.rank] if streams else [], strict=True):
            _set_stream(stream, value)
        self.state = None
        return int(state["step"]), dict(state["sums"]), float(state["elapsed_s"])

    def finish(self, key: str, steps: int) -> None:
        self.completed.append(key)
        self.done += steps

    def save(self, key: str, step: int, opt, schedule, streams, sums, elapsed: float) -> None:
        """The training state after ``step`` steps of stage ``key`` (every rank calls it)."""
        states = gather([_stream_state(s) for s in streams], self.ranks)
        if self.ranks.main and self.state_file is not None:
            save_state(
                self.state_file,
                {
                    "run": self.run, "model": _cpu(self.model.state_dict()),
                    "ema": None if self.ema is None else self.ema.state_dict(),
                    "completed": self.completed, "done": self.done, "stage": key, "step": step,
                    "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                    "streams": states, "sums": sums, "elapsed_s": elapsed, "log": self.entries,
                },
            )  # fmt: skip
        barrier(self.ranks)

    def watch(self, step: int, samples=None, title: str = "") -> None:
        """Rank 0: the log as JSON lines, the loss curves and, from ``samples()`` (averaged
        weights swapped in), the sample images, into the figures folder."""
        folder = self.folder
        if folder is None or self.options.figures_every is None:
            return
        figures.write_log(folder, self.entries)
        figures.loss_png(folder, self.entries, title)
        if samples is not None:
            with self.averaged():
                rows = samples()
            figures.samples_png(folder, rows, self.done + step)

    def averaged(self) -> AbstractContextManager[torch.nn.Module]:
        """The model with its EMA weights for a block (its own weights without an EMA)."""
        return self.ema.swapped(self.model) if self.ema is not None else nullcontext(self.model)

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast on a GPU; nothing on the CPU (where bf16 is far slower)."""
        cuda = self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def stop_due(self, step: int) -> bool:
        stop = self.options.stop_after
        return stop is not None and self.done + step >= stop


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _stream_state(stream: np.random.Generator | torch.Generator) -> Any:
    if isinstance(stream, np.random.Generator):
        return stream.bit_generator.state
    return stream.get_state()


def _set_stream(stream: np.random.Generator | torch.Generator, state: Any) -> None:
    if isinstance(stream, np.random.Generator):
        stream.bit_generator.state = state
    else:
        stream.set_state(state)
