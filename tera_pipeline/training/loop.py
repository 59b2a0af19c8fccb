"""The one training loop: every model of the project (and each stage of SPATIA) trains with it.

A ``Stage`` names what is a model's own: the module whose parameters it optimises, how a batch
is drawn (``batch(step, sample indices)``: ``training/sampling.py``), the loss of a batch, the
validation, and sample images. The loop owns the rest: AdamW with the warm-up-cosine learning
rate; data-parallel processes (``torchrun``: each rank draws its share of the global batch, DDP
averages the gradients); gradient accumulation; bf16 autocast on GPUs; the optimiser step with
gradient clipping and the EMA of the weights; the log entry every ``log_every`` steps (and at the
last), with the validation at each entry (of the EMA weights too); training states to resume
from, figures to watch (``training/trainer.py``), and the checkpoint with its training record
and the command line that made it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import torch

from models.checkpoint import save_checkpoint
from tera_pipeline.runtime.memory import keep_freed_memory
from tera_pipeline.training.distributed import env_ranks, mean_over_ranks, wrap
from tera_pipeline.training.sampling import shard
from tera_pipeline.training.trainer import Trainer, TrainingStopped

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
        seed torch's global generator (the initial weights: the same on every rank), and return
        the run's numpy and torch running streams (one per rank when there are several)."""
        keep_freed_memory()
        torch.manual_seed(self.seed)
        ranks = env_ranks()
        if not ranks.distributed:
            return np.random.default_rng(self.seed), torch.Generator().manual_seed(self.seed)
        seq = np.random.SeedSequence((self.seed, ranks.rank))
        torch_seed = int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))
        return np.random.default_rng(seq), torch.Generator().manual_seed(torch_seed)

    def to_dict(self) -> dict[str, int | float]:
        """The training record's ``batch``, ``lr`` and ``seed``."""
        return {"batch": self.batch, "lr": self.lr, "seed": self.seed}


@dataclass(frozen=True)
class Stage(Generic[Batch]):
    """One optimisation of ``module``'s parameters for ``steps`` steps.

    Step ``s`` minimises the mean of ``loss(batch(s, indices)).objective`` over the global batch
    of ``batch_size`` samples, each process and micro-batch drawing its ``indices``. A log entry
    holds ``"stage": name`` (if named), ``"step"``, each loss term (``summary="mean"``:
    ``train_<term>``, its mean since the previous entry; ``"last"``: ``<term>``, the last
    step's value), rounded to ``digits`` if given, then ``validate()``'s numbers (and, with an
    EMA, ``ema_<name>`` of the averaged weights), the learning rate (``log_lr``) and
    ``elapsed_s``. ``streams``: running random streams the draws or the loss take from (saved
    with a training state); ``samples()``: labelled rows of images to look at (figures);
    ``find_unused``: parameters the loss may leave out (DDP must look for them);
    ``validate_every``: validate only at entries of such steps and the last (0: at every one).
    """

    module: torch.nn.Module
    steps: int
    lr: float
    batch: Callable[[int, Sequence[int]], Batch]
    loss: Callable[[Batch], Losses]
    batch_size: int
    validate: Callable[[], dict[str, float]] | None = None
    name: str | None = None
    log_every: int = 100
    warmup_cap: int = 100
    clip: float | None = 1.0
    summary: Literal["mean", "last"] = "mean"
    digits: int | None = None
    log_lr: bool = False
    streams: tuple[np.random.Generator | torch.Generator, ...] = ()
    samples: Callable[[], dict[str, np.ndarray]] | None = None
    find_unused: bool = False
    validate_every: int = 0


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


class _LossOf(torch.nn.Module):
    """A stage's loss as a module over its parameters, so that DDP runs it (its forward
    prepares the gradients' allreduce)."""

    def __init__(self, module: torch.nn.Module, loss: Callable[[Any], Losses]) -> None:
        super().__init__()
        self.module, self.loss = module, loss

    def forward(self, batch: Any) -> Losses:
        return self.loss(batch)


def run_stage(
    stage: Stage[Batch],
    report: Callable[[dict], None],
    started: float | None = None,
    trainer: Trainer | None = None,
) -> None:
    """Train ``stage`` within ``trainer``'s run (default: one process, no EMA, no state),
    handing each log entry to ``report`` (rank 0); ``elapsed_s`` counts from ``started`` (a
    ``time.perf_counter()``; default: the stage's start) plus the time before a resume."""
    trainer = trainer or Trainer.single(stage.module)
    key = stage.name or ""
    if trainer.skips(key):
        return
    opt = torch.optim.AdamW(stage.module.parameters(), lr=stage.lr, weight_decay=WEIGHT_DECAY)
    lr_schedule = warmup_cosine(opt, stage.steps, stage.warmup_cap)
    first, sums, before = trainer.restore(key, opt, lr_schedule, stage.streams)
    net = wrap(_LossOf(stage.module, stage.loss), trainer.ranks, stage.find_unused)
    t0 = (time.perf_counter() if started is None else started) - before
    if trainer.progress is not None:
        trainer.progress.stage(key or "train", stage.steps, first)
    for i in range(first, stage.steps):
        last = _train_step(stage, net, opt, lr_schedule, i, trainer)
        for name, value in last.items():
            sums[name] = sums.get(name, 0.0) + value
        if trainer.progress is not None:
            trainer.progress.step(i + 1, next(iter(last.values())), lr_schedule.get_last_lr()[0])
        if (i + 1) % stage.log_every == 0 or i + 1 == stage.steps:
            entry = _entry(stage, i, sums, last, lr_schedule, trainer, t0)
            sums = {}
            if trainer.ranks.main:
                report(entry)  # a TrainingLog over ``trainer.entries`` where states are saved
        _after_step(stage, i + 1, opt, lr_schedule, sums, trainer, time.perf_counter() - t0)
    trainer.finish(key, stage.steps)


def _train_step(
    stage: Stage, net: torch.nn.Module, opt, schedule, step: int, trainer: Trainer
) -> dict[str, float]:
    """One optimiser step on this rank's share of step ``step``'s global batch, in
    ``accumulate`` micro-batches (gradients synchronised over the ranks at the last); returns
    the loss terms' means over the global batch."""
    parts, ranks = trainer.options.accumulate, trainer.ranks
    opt.zero_grad(set_to_none=True)
    totals: torch.Tensor | None = None
    names: list[str] = []
    for part in range(parts):
        indices = shard(stage.batch_size, ranks.rank, ranks.world, parts, part)
        batch = to_device(stage.batch(step, indices), trainer.device)
        sync = part == parts - 1 or not ranks.distributed
        with _synchronised(net, sync), trainer.autocast():
            losses = net(batch)
        (losses.objective if parts == 1 else losses.objective / parts).backward()
        names = list(losses.terms)
        values = torch.stack([t.detach().float() for t in losses.terms.values()])
        totals = values if totals is None else totals + values
    assert totals is not None
    means = mean_over_ranks(totals if parts == 1 else totals / parts, ranks)
    if stage.clip is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, stage.clip)
    opt.step()
    schedule.step()
    if trainer.ema is not None:
        trainer.ema.update(trainer.model)
    return dict(zip(names, means.tolist(), strict=True))


def _synchronised(net: torch.nn.Module, sync: bool):
    """DDP's gradient allreduce on (``sync``) or deferred to a later micro-batch."""
    if sync or not hasattr(net, "no_sync"):
        return nullcontext()
    return net.no_sync()


def _entry(stage: Stage, i: int, sums, last, schedule, trainer: Trainer, t0: float) -> dict:
    """The log entry after step ``i`` (validation on rank 0 alone, of the EMA weights too)."""
    since_entry = i % stage.log_every + 1
    entry: dict[str, Any] = {"stage": stage.name} if stage.name is not None else {}
    entry["step"] = i + 1
    if stage.summary == "mean":
        means = {f"train_{k}": v / since_entry for k, v in sums.items()}
        entry.update({k: _rounded(v, stage.digits) for k, v in means.items()})
    else:
        entry.update({k: _rounded(v, stage.digits) for k, v in last.items()})
    every = stage.validate_every
    due = not every or (i + 1) % every == 0 or i + 1 == stage.steps
    if stage.validate is not None and trainer.ranks.main and due:
        entry.update(stage.validate())
        if trainer.ema is not None:
            with trainer.averaged():
                entry.update({f"ema_{k}": v for k, v in stage.validate().items()})
    if stage.log_lr:
        entry["lr"] = schedule.get_last_lr()[0]
    entry["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return entry


def _after_step(stage: Stage, done: int, opt, schedule, sums, trainer: Trainer, elapsed: float):
    """A training state every ``checkpoint_every`` steps and at a stop, figures every
    ``figures_every`` steps and at the stage's end; the stop itself."""
    options, key = trainer.options, stage.name or ""
    stop = trainer.stop_due(done) and done < stage.steps
    every = options.checkpoint_every
    if stop or (every and done % every == 0):
        trainer.save(key, done, opt, schedule, stage.streams, sums, elapsed)
    figure_every = options.figures_every
    if done == stage.steps or stop or (figure_every and done % figure_every == 0):
        trainer.watch(done, stage.samples, stage.name or "")
    if stop:
        raise TrainingStopped(
            f"stopped after {trainer.done + done} steps; continue with --resume "
            f"{trainer.state_file}"
        )


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors (in tuples, lists, dicts and dataclasses) on ``device``."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if is_dataclass(batch) and not isinstance(batch, type):
        return replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                 for f in fields(batch) if f.init})  # fmt: skip
    return batch


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
    trainer: Trainer | None = None,
) -> None:
    """Save ``model`` as a ``kind`` checkpoint with ``meta`` (which holds its "config"), then the
    ``training`` record closed by the last log entry ("final"), then the command line. Within a
    ``trainer``'s run: rank 0 alone saves, the EMA weights where there is an EMA (what sampling
    then loads), and the record names the EMA, the processes and the accumulation."""
    record = {**training, "final": log.final}
    if trainer is not None:
        if not trainer.ranks.main:
            return
        ema = trainer.ema
        record |= {
            "weights": "ema" if ema is not None else "last",
            "ema_decay": None if ema is None else ema.decay,
            "processes": trainer.ranks.world,
            "accumulate": trainer.options.accumulate,
        }
    meta = {**meta, "training": record, "command": command_line()}
    with trainer.averaged() if trainer is not None else nullcontext(model):
        save_checkpoint(Path(out), model, kind, meta)
