"""The one training loop: every model of the project (and each stage of SPATIA) trains with it.

A ``Stage`` names what is a model's own: the module whose parameters it optimises, how a batch
is drawn, the loss of a batch, and the validation. The loop owns the rest: AdamW with the
warm-up-cosine learning rate, the optimiser step with gradient clipping, the log entry every
``log_every`` steps (and at the last), with the validation at each entry, and the checkpoint
with its training record and the command line that made it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import torch

from models.checkpoint import save_checkpoint
from tera_pipeline.runtime.memory import keep_freed_memory

WEIGHT_DECAY = 1e-4
"""AdamW's weight decay, the same for every model."""

Batch = TypeVar("Batch")


class Losses(NamedTuple):
    """A step's loss to minimise (``objective``) and the named terms its log entries report."""

    objective: torch.Tensor
    terms: dict[str, torch.Tensor]

    @classmethod
    def single(cls, name: str, loss: torch.Tensor) -> Losses:
        """A loss that is its own only term, reported as ``name``."""
        return cls(loss, {name: loss})


@dataclass(frozen=True)
class Recipe:
    """How a model trains, whatever its data: patches (or windows, or cells) per step, the peak
    learning rate, and the seed of the weights and of every draw."""

    batch: int
    lr: float
    seed: int = 1

    def start(self) -> tuple[np.random.Generator, torch.Generator]:
        """Start a training process reproducibly: keep freed heap memory (``runtime.memory``),
        seed torch's global generator, and return the run's numpy and torch random streams."""
        keep_freed_memory()
        torch.manual_seed(self.seed)
        return np.random.default_rng(self.seed), torch.Generator().manual_seed(self.seed)

    def to_dict(self) -> dict[str, int | float]:
        """The training record's ``batch``, ``lr`` and ``seed``."""
        return {"batch": self.batch, "lr": self.lr, "seed": self.seed}


@dataclass(frozen=True)
class Stage(Generic[Batch]):
    """One optimisation of ``module``'s parameters for ``steps`` steps.

    Each step minimises ``loss(batch()).objective``. A log entry holds ``"stage": name`` (if
    named), ``"step"``, each loss term (``summary="mean"``: ``train_<term>``, its mean since the
    previous entry; ``"last"``: ``<term>``, the last step's value), rounded to ``digits`` if
    given, then ``validate()``'s numbers, the learning rate (``log_lr``) and ``elapsed_s``.
    """

    module: torch.nn.Module
    steps: int
    lr: float
    batch: Callable[[], Batch]
    loss: Callable[[Batch], Losses]
    validate: Callable[[], dict[str, float]] | None = None
    name: str | None = None
    log_every: int = 100
    warmup_cap: int = 100
    clip: float | None = 1.0
    summary: Literal["mean", "last"] = "mean"
    digits: int | None = None
    log_lr: bool = False


class TrainingLog:
    """A training's log entries, each also handed to ``on_log`` (default: ``logger.info``)."""

    def __init__(
        self, logger: logging.Logger, on_log: Callable[[dict], None] | None = None
    ) -> None:
        self.entries: list[dict] = []
        self._emit = on_log or (lambda entry: logger.info("%s", entry))

    def __call__(self, entry: dict) -> None:
        self.entries.append(entry)
        self._emit(entry)

    @property
    def final(self) -> dict | None:
        """The last entry (None before the first)."""
        return self.entries[-1] if self.entries else None


def warmup_cosine(
    opt: torch.optim.Optimizer, steps: int, warmup_cap: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over min(``warmup_cap``, steps / 10 + 1) steps, then a cosine decay to 0
    (the schedule every model of the project trains with)."""
    warmup = min(warmup_cap, steps // 10 + 1)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    clip: float | None = 1.0,
) -> None:
    """Backpropagate ``loss``, clip the optimizer's gradients to norm ``clip`` (None: no
    clipping), step the optimizer and its learning-rate schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    schedule.step()


def run_stage(
    stage: Stage[Batch], report: Callable[[dict], None], started: float | None = None
) -> None:
    """Train ``stage``, handing each log entry to ``report``; ``elapsed_s`` counts from
    ``started`` (a ``time.perf_counter()``; default: the stage's start)."""
    opt = torch.optim.AdamW(stage.module.parameters(), lr=stage.lr, weight_decay=WEIGHT_DECAY)
    lr_schedule = warmup_cosine(opt, stage.steps, stage.warmup_cap)
    t0 = time.perf_counter() if started is None else started
    sums: dict[str, float] = {}
    for i in range(stage.steps):
        losses = stage.loss(stage.batch())
        optimizer_step(losses.objective, opt, lr_schedule, stage.clip)
        last = {name: term.item() for name, term in losses.terms.items()}
        for name, value in last.items():
            sums[name] = sums.get(name, 0.0) + value
        if (i + 1) % stage.log_every == 0 or i + 1 == stage.steps:
            since_entry = i % stage.log_every + 1
            entry: dict[str, Any] = {"stage": stage.name} if stage.name is not None else {}
            entry["step"] = i + 1
            if stage.summary == "mean":
                means = {f"train_{k}": v / since_entry for k, v in sums.items()}
                entry.update({k: _rounded(v, stage.digits) for k, v in means.items()})
            else:
                entry.update({k: _rounded(v, stage.digits) for k, v in last.items()})
            if stage.validate is not None:
                entry.update(stage.validate())
            if stage.log_lr:
                entry["lr"] = lr_schedule.get_last_lr()[0]
            entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
            sums = {}
            report(entry)


def _rounded(value: float, digits: int | None) -> float:
    return value if digits is None else round(value, digits)


def command_line() -> str:
    """The command that is running, as the ``tera`` command line (a checkpoint's provenance)."""
    return " ".join(shlex.quote(a) for a in ["tera", *sys.argv[1:]])


def save_trained(
    out: Path,
    model: torch.nn.Module,
    kind: str,
    meta: dict[str, Any],
    training: dict[str, Any],
    log: TrainingLog,
) -> None:
    """Save ``model`` as a ``kind`` checkpoint with ``meta`` (which holds its "config"), then the
    ``training`` record closed by the last log entry ("final"), then the command line."""
    record = {**training, "final": log.final}
    save_checkpoint(Path(out), model, kind, {**meta, "training": record, "command": command_line()})
