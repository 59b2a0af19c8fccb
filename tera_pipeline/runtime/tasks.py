"""Block tasks on a Dask client: ``run_blocks`` (bounded in flight, retries, a watchdog on lost
workers, a stop request honoured within a second, short blocks run in groups) and the
statistics a block returns."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import GenerationError, RunStopped
from tera_pipeline.runtime.cluster import block_resources

log = logging.getLogger("tera_pipeline")

Blocks = Sequence[Sequence[int]]
Progress = Callable[[str, int, int], None]
"""Called as progress(phase, blocks done, blocks total)."""


STOP = threading.Event()
"""Set (by the CLI's signal handler) to stop a run between blocks: ``run_blocks`` then cancels
what is in flight and raises ``RunStopped`` within a second."""


@dataclass
class BlockStats:
    """What one block task did and how long it took, for efficiency accounting."""

    items: int = 0
    """Work items: patch evaluations in generation (each lattice patch once per step when every
    seam is shared), cells in SPATIA, bins in MagNet, patches in the attention analysis."""
    shared: int = 0
    """Patch predictions taken from a neighbour's seam file instead of computed."""
    model_s: float = 0.0
    read_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    digest: int | None = None
    """CRC-32 of the bytes the block wrote (kept in the ledger's digests)."""


@dataclass
class PhaseReport:
    """One phase of block tasks (conditioning, a DDIM step, a pyramid level, an analysis): its
    blocks, wall time and summed block statistics."""

    phase: str
    blocks: int
    wall_s: float
    stats: BlockStats = field(default_factory=BlockStats)

    def add(self, s: BlockStats) -> None:
        for name in ("items", "shared", "model_s", "read_s", "write_s", "total_s"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(s, name))


OnDone = Callable[[list[tuple[tuple[int, ...], BlockStats]]], None]
"""Called with the blocks (index, statistics) finished since the last call, after the next
blocks were submitted: recording a block (the ledger) never keeps a worker waiting."""

WORKERS_LOST_S = 120.0
"""A phase fails when the cluster has had no worker for this long (``workers_lost_s``)."""

IN_FLIGHT_PER_WORKER = 4
"""Blocks submitted at once per worker, unless the job sets ``blocks_in_flight``."""

TASK_S = 0.25
"""Blocks shorter than this run several to a Dask task, a task of about this long: Dask's own
cost, a few milliseconds of scheduler and worker time per task, is then paid once per group."""

_BLOCK_S: dict[str, float] = {}
"""Seconds per block last measured for each block function (in this process), so that a phase
groups its blocks from its first submission when an earlier phase ran the same function."""


class BlockError(Exception):
    """A block of a group task failed: its index, and the error's message."""

    def __init__(self, index: tuple[int, ...], message: str) -> None:
        super().__init__(index, message)
        self.index, self.message = index, message

    def __str__(self) -> str:
        return self.message


def run_group(fn: Callable[..., BlockStats], args: tuple, indices: list) -> list[BlockStats]:
    """``fn(*args, index)`` for each block of a group, in order (one Dask task)."""
    out = []
    for index in indices:
        try:
            out.append(fn(*args, index))
        except Exception as err:
            raise BlockError(tuple(int(i) for i in index), str(err)) from err
    return out


def group_size(block_s: float | None, left: int, threads: int, rounds: int = 1) -> int:
    """Blocks in each task of what is ``left`` of a phase: about ``TASK_S`` of work, the blocks
    split evenly over the threads in whole rounds, at least ``rounds`` tasks per thread. Fixed
    for the phase once set: equal tasks, no tail of single blocks, each costing a task's
    scheduling. A phase of less than ``TASK_S`` of work per thread runs as one task per thread:
    each task's end costs a round trip to the scheduler before the thread starts the next, which
    two rounds paid once more per step (a zero-cost step 13 % slower at 16 x 128 x 128, 6 % at
    16 x 64 x 64, alternated on one cluster), and a phase that short leaves little to balance."""
    if not block_s or block_s >= TASK_S or left <= threads:
        return 1
    most = max(1, int(TASK_S / block_s))
    rounds = max(rounds, math.ceil(left / (threads * most)))
    return max(1, math.ceil(left / (threads * rounds)))


def run_blocks(
    client,
    fn: Callable[..., BlockStats],
    args: tuple,
    indices: Iterable[tuple[int, ...]],
    total: int,
    phase: str,
    in_flight: int | None,
    progress: Progress | None = None,
    on_done: OnDone | None = None,
    retries: int = 0,
    workers_lost_s: float = WORKERS_LOST_S,
) -> PhaseReport:
    """Run ``fn(*args, index)`` for every block on the Dask client, at most ``in_flight`` at once
    (None: 4 per worker).

    Blocks are drawn lazily from ``indices``, so the grid is never materialised as a task list.
    The first failing block raises with its coordinates, and so does a cluster left without any
    worker for ``workers_lost_s`` (a run never hangs on a dead cluster). Workers get a block
    only when they have a free thread (the rest wait in the scheduler's queue), so blocks of
    unequal cost (seam sharing makes them so) balance over the workers instead of being dealt
    out in advance. Blocks shorter than ``TASK_S`` run several to a task (``group_size``); each
    is still recorded, and a failure still names its block.
    """
    from distributed import wait

    in_flight, threads = _assign_on_demand(client, total, in_flight)
    report = PhaseReport(phase, total, 0.0)
    t0 = time.perf_counter()
    it = iter(indices)
    watchdog = _WorkerWatchdog(client, workers_lost_s, phase)
    timing = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    resources = block_resources(client, fn)  # {"GPU": 1} for model tasks on GPU workers
    where: dict[str, list[tuple[int, ...]]] = {}
    submitted = 0
    size: int | None = None

    def submit() -> bool:
        """Submit the next task (a block, or a group of short blocks); False when none is left."""
        nonlocal submitted, size
        if size is None or size == 1:  # until the blocks are timed and short: then fixed
            size = group_size(_BLOCK_S.get(timing), total - submitted, threads)
        group = [tuple(i) for i in itertools.islice(it, size)]
        if not group:
            return False
        submitted += len(group)
        key = f"{phase}-{'-'.join(map(str, group[0]))}-{len(group)}-{time.monotonic_ns()}"
        where[key] = group
        call = (fn, *args, group[0]) if len(group) == 1 else (run_group, fn, args, group)
        pending.add(client.submit(*call, key=key, pure=False, retries=retries, resources=resources))
        return True

    pending: set = set()
    while len(pending) < in_flight and submit():
        pass
    done = 0
    while pending:
        if STOP.is_set():
            client.cancel(list(pending))
            raise RunStopped(f"{phase}: stopped on request; continue with --resume")
        try:
            finished, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:
            watchdog.check()
            continue
        batch: list[tuple[tuple[int, ...], BlockStats]] = []
        for fut in finished:
            group = where.pop(fut.key)
            try:
                result = _result(fut, watchdog)
            except RunStopped:
                client.cancel(list(pending))
                if on_done and batch:
                    on_done(batch)
                raise
            except Exception as err:
                for other in pending:
                    other.cancel()
                if on_done and batch:
                    on_done(batch)
                failed = err.index if isinstance(err, BlockError) else group[0]
                raise GenerationError(
                    f"{phase}: block {failed} failed after {retries} retries: {err}; "
                    "the finished blocks are kept: continue with --resume"
                ) from err
            stats = result if isinstance(result, list) else [result]
            for s in stats:
                report.add(s)
            batch.extend(zip(group, stats, strict=True))
            block_s = sum(s.total_s for s in stats) / len(stats)
            _BLOCK_S[timing] = 0.5 * (_BLOCK_S.get(timing, block_s) + block_s)
        while len(pending) < in_flight and submit():  # workers first, then the records
            pass
        if on_done:
            on_done(batch)
        done += len(batch)
        if progress:
            progress(phase, done, total)
        watchdog.check()
    report.wall_s = time.perf_counter() - t0
    return report


def _result(fut, watchdog: _WorkerWatchdog) -> BlockStats:
    """A finished future's result; it can still wait (a result lost with its worker is
    recomputed), so the wait is in steps that look at the stop request and the watchdog."""
    while True:
        try:
            return fut.result(timeout=1.0)
        except TimeoutError:
            if STOP.is_set():
                raise RunStopped(
                    f"{watchdog.phase}: stopped on request; continue with --resume"
                ) from None
            watchdog.check()


class _WorkerWatchdog:
    """Raises once the cluster has had no worker for longer than its limit."""

    def __init__(self, client, limit_s: float, phase: str) -> None:
        self.client, self.limit_s, self.phase = client, limit_s, phase
        self.since: float | None = None
        self.last_check = time.monotonic()  # the first look a second in

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last_check < 1.0:
            return
        self.last_check = now
        workers = len(self.client.scheduler_info(n_workers=-1)["workers"])
        if workers:
            self.since = None
            return
        self.since = self.since or now
        if now - self.since > self.limit_s:
            raise GenerationError(
                f"{self.phase}: every Dask worker was lost and none came back within "
                f"{self.limit_s:.0f} s; the finished blocks are kept: continue with --resume"
            )


_SATURATED: weakref.WeakSet = weakref.WeakSet()
"""Clients whose scheduler ``_assign_on_demand`` has set to assign on demand."""


def _assign_on_demand(client, total: int, in_flight: int | None) -> tuple[int, int]:
    """Have each task go to the first worker with a free thread; returns the in-flight bound
    (``in_flight``, or 4 per worker) and the cluster's threads, from one look at the cluster.

    Dask deals tasks out to workers in advance: a group of more than twice the threads is queued
    but each worker still gets ``ceil(1.1 x threads)`` (its default worker-saturation), and a
    smaller group is assigned entirely at submission. On the demo's 4 blocks of 448, 392, 392 and
    343 patch evaluations that left one worker idle 11 % of each step. Saturation 1.0, and no
    more blocks in flight than threads for a small group, fix both.
    """
    try:
        if client not in _SATURATED:  # once per client: a round trip to the scheduler
            client.run_on_scheduler(
                lambda dask_scheduler: setattr(dask_scheduler, "WORKER_SATURATION", 1.0)
            )
            _SATURATED.add(client)
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        threads = sum(w.get("nthreads", 1) for w in workers) or 1
        in_flight = in_flight_bound(in_flight, len(workers))
    except Exception as err:  # a scheduler that refuses: keep its own policy
        log.warning("could not set the scheduler's worker-saturation: %s", err)
        return in_flight_bound(in_flight, 1), 1
    return (min(in_flight, threads) if total <= 2 * threads else in_flight), threads


@dataclass
class BlockTask:
    """One phase of block tasks: ``fn(*args, index)`` for every index of ``indices`` (``total``
    of them). Generation, the pyramid and every analysis describe their phases this way, and
    ``run_task`` runs them all alike: the job's retries, in-flight bound and worker-loss limit
    are the framework's, not each caller's."""

    name: str
    fn: Callable[..., BlockStats]
    args: tuple
    indices: Iterable[tuple[int, ...]]
    total: int
    on_done: OnDone | None = None


def run_task(
    client, job: JobConfig, task: BlockTask, progress: Progress | None = None
) -> PhaseReport:
    """Run a phase on the Dask client under the job's scheduling settings; returns its report."""
    return run_blocks(
        client,
        task.fn,
        task.args,
        task.indices,
        task.total,
        task.name,
        job.blocks_in_flight or None,  # None: 4 per worker, counted with the threads
        progress,
        on_done=task.on_done,
        retries=job.retries,
        workers_lost_s=job.workers_lost_s,
    )


def in_flight_bound(configured: int | None, workers: int) -> int:
    """Blocks submitted at once: the job's ``blocks_in_flight``, or 4 per worker."""
    return configured or IN_FLIGHT_PER_WORKER * max(1, workers)


def in_flight(config: JobConfig, client) -> int:
    """Blocks submitted at once on ``client``'s cluster (``in_flight_bound``)."""
    workers = 0 if config.blocks_in_flight else len(client.scheduler_info(n_workers=-1)["workers"])
    return in_flight_bound(config.blocks_in_flight, workers)
