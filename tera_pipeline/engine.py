"""The generation engine: synchronised patch diffusion with an exact halo, block by block.

For each DDIM step (a barrier between steps), every block reads the state over the span of all
lattice patches touching its core, runs the denoiser on those patches (a patch straddling blocks is
computed by one of them and shared through a scratch file: ``seams``), blends the predictions with
a positive window normalised by the summed weights, applies the DDIM update to its core and writes
the core (one whole shard) to the other scratch array; the last step writes the uint8 image.
The initial noise is a pure function of (seed, position) and is never stored. Because patches sit
on a global lattice, every voxel sees exactly the patches of whole-volume sampling: the result
does not depend on block size, worker count or order.

Block tasks are plain functions of (config, checkpoint, step, block index) that any executor can
call; ``run_blocks`` feeds them to a Dask client with a bounded number in flight.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.checkpoint import DEFAULT_DENOISER, file_digest, read_metadata
from tera_pipeline import ledger, lock, ownership, store
from tera_pipeline.blending import Accumulator, patch_window
from tera_pipeline.cluster import block_resources, gpu_task
from tera_pipeline.conditioning import CELLS_DIR, bin_box, open_source, patch_bins
from tera_pipeline.config import JobConfig
from tera_pipeline.diffusion import DDIMSchedule, position_noise
from tera_pipeline.errors import TeraError
from tera_pipeline.geometry import Box
from tera_pipeline.inference import get_predictor
from tera_pipeline.partition import PartitionedSource, partition
from tera_pipeline.seams import fetch as fetch_seams
from tera_pipeline.seams import plan as plan_seams
from tera_pipeline.seams import publish as publish_seams
from tera_pipeline.status import record_error

log = logging.getLogger("tera_pipeline")

IMAGE = "image"
CONDITIONING = "conditioning"
CELL_COUNT = "cell_count"
STATES = (f"{store.SCRATCH}/state0", f"{store.SCRATCH}/state1")

Blocks = Sequence[Sequence[int]]
Progress = Callable[[str, int, int], None]
"""Called as progress(phase, blocks done, blocks total)."""


class GenerationError(TeraError):
    """A job that cannot start or continue (bad checkpoint for the layout, ...)."""


class RunStopped(GenerationError):
    """The run was asked to stop (Ctrl-C, SIGTERM): finished blocks are kept, to resume."""


STOP = threading.Event()
"""Set (by the CLI's signal handler) to stop a run between blocks: ``run_blocks`` then cancels
what is in flight and raises ``RunStopped`` within a second."""


@dataclass
class BlockStats:
    """Timings of one block task, for efficiency accounting."""

    patches: int = 0
    """Patch evaluations (each lattice patch once per step when every seam is shared)."""
    shared: int = 0
    """Patch predictions taken from a neighbour's seam file instead of computed."""
    model_s: float = 0.0
    read_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    digest: int | None = None
    """CRC-32 of the bytes the block wrote (kept in the ledger's digests)."""


@dataclass
class StepReport:
    phase: str
    blocks: int
    wall_s: float
    stats: BlockStats = field(default_factory=BlockStats)

    def add(self, s: BlockStats) -> None:
        for name in ("patches", "shared", "model_s", "read_s", "write_s", "total_s"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(s, name))


def schedule_of(config: JobConfig, prediction: str = "epsilon") -> DDIMSchedule:
    """The job's DDIM schedule for a model that outputs ``prediction`` (from its checkpoint)."""
    return DDIMSchedule(
        steps=config.diffusion.steps, eta=config.diffusion.eta, prediction=prediction
    )


def resolve_checkpoint(config: JobConfig) -> Path:
    return Path(config.checkpoint) if config.checkpoint else DEFAULT_DENOISER


def check_checkpoint(config: JobConfig, genes: Sequence[str], meta: dict | None = None) -> dict:
    """Check the checkpoint's metadata (read unless given) fits the job; raise before any
    block runs."""
    path = resolve_checkpoint(config)
    meta = read_metadata(path) if meta is None else meta
    model_cfg = meta.get("config", {})
    patch = tuple(model_cfg.get("patch", ()))
    if patch != tuple(config.lattice.patch):
        raise GenerationError(
            f"checkpoint {path} was trained on patches {patch}, the job uses {config.lattice.patch}"
        )
    window = tuple(p // b for p, b in zip(config.lattice.patch, config.conditioning.bin))
    if tuple(model_cfg.get("cond_window", ())) != window:
        raise GenerationError(
            f"checkpoint {path} expects gene windows {tuple(model_cfg.get('cond_window', ()))} "
            f"bins, the job's patch and bin give {window}"
        )
    if list(meta.get("genes", [])) != list(genes):
        missing = sorted(set(meta.get("genes", [])) ^ set(genes))
        raise GenerationError(
            f"checkpoint {path} gene panel does not match the conditioning's "
            f"({len(meta.get('genes', []))} vs {len(genes)} genes; differing: {missing[:8]})"
        )
    return meta


# -- the store --------------------------------------------------------------------------------
def array_specs(config: JobConfig, genes: Sequence[str]) -> list[store.ArraySpec]:
    """Every array of a generation job, on one grid: shards of one block each."""
    vol, st, b = config.volume.shape, config.storage, config.conditioning.bin
    c = len(config.volume.stains)
    bins = bin_box(Box((0, 0, 0), vol), b).shape
    bin_shard = tuple(s // n for s, n in zip(st.shard_shape, b))
    bin_chunk = bin_shard  # gene rasters are small: one inner chunk per shard
    lvl = st.compression_level
    specs = [
        store.ArraySpec(
            IMAGE,
            (c, *vol),
            "uint8",
            ("c", "z", "y", "x"),
            (c, *st.shard_shape),
            (c, *st.chunk_shape),
            attributes={"long_name": "generated stains"},
            compression_level=lvl,
        ),
        store.ArraySpec(
            CONDITIONING,
            (len(genes), *bins),
            "float32",
            ("gene", "zbin", "ybin", "xbin"),
            (len(genes), *bin_shard),
            (len(genes), *bin_chunk),
            attributes={"long_name": "transcript counts per bin", "bin_voxels": list(b)},
            compression_level=lvl,
        ),
        store.ArraySpec(
            CELL_COUNT,
            bins,
            "float32",
            ("zbin", "ybin", "xbin"),
            bin_shard,
            bin_chunk,
            attributes={"long_name": "cell centroids per bin"},
            compression_level=lvl,
        ),
    ]
    for name in STATES:
        specs.append(
            store.ArraySpec(
                name,
                (c, *vol),
                st.scratch_dtype,
                ("c", "z", "y", "x"),
                (c, *st.shard_shape),
                (c, *st.chunk_shape),
                compression_level=1,
            )
        )
    return specs


def coordinates(config: JobConfig, genes: Sequence[str]) -> dict:
    """1-D coordinates in µm (voxel and bin centres), stain and gene names."""
    vol, sp, org, b = (
        config.volume.shape,
        config.volume.spacing_um,
        config.volume.origin_um,
        config.conditioning.bin,
    )
    um = {"units": "micrometer"}
    names = {"c": config.volume.stains, "gene": genes}
    coords = {k: (np.asarray(list(v), dtype=object), {}) for k, v in names.items()}
    for axis, name in enumerate("zyx"):
        n = vol[axis]
        coords[name] = (org[axis] + (np.arange(n) + 0.5) * sp[axis], um)
        nb = -(-n // b[axis])
        coords[f"{name}bin"] = (org[axis] + (np.arange(nb) + 0.5) * b[axis] * sp[axis], um)
    return coords


def bytes_needed(config: JobConfig, genes: Sequence[str]) -> int:
    """An upper bound of the bytes a job writes: every array uncompressed (the two scratch
    states are noise, which does not compress), plus the pyramid (under 1/7 of the image)."""
    total = 0
    for spec in array_specs(config, genes):
        size = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        total += size + (size // 7 if spec.name == IMAGE else 0)
    return total


class DiskSpaceError(GenerationError):
    """The output's filesystem cannot hold the job."""


def check_disk_space(config: JobConfig, genes: Sequence[str]) -> None:
    """Refuse a job whose output filesystem lacks the bytes it will write (``bytes_needed``)."""
    import shutil

    need = bytes_needed(config, genes)
    where = Path(config.out).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise DiskSpaceError(
            f"{config.out} needs up to {need / 2**30:.1f} GiB and its filesystem has "
            f"{free / 2**30:.1f} GiB free; free space, choose another --out, or pass "
            "--ignore-disk-space"
        )


def preflight(
    config: JobConfig,
    overwrite: bool = False,
    resume: bool = False,
    break_lock: bool = False,
):
    """Every check that can fail before anything is written: the output (only a store of ours
    is ever replaced, and only with ``overwrite``), its lock, the checkpoint, the conditioning
    input against its panel, and for a resume, that the job is the same. Returns (cell source,
    checkpoint metadata)."""
    checkpoint = resolve_checkpoint(config)
    meta = read_metadata(checkpoint)
    panel = tuple(meta.get("genes", ())) or None
    root = Path(config.out)
    exists = ownership.has_content(root)
    if resume:
        if not root.is_dir():
            raise ledger.ResumeError(f"nothing to resume: {root} does not exist")
        if exists and not ownership.is_our_store(root):
            raise ledger.ResumeError(f"cannot resume {root}: it is not a tera-pipeline store")
        lock.check(root, resume=True, break_lock=break_lock)
        if (root / ledger.LEDGER / "zarr.json").is_file():
            ledger.check_identity(root, ledger.output_identity(config, file_digest(checkpoint)))
    elif exists:
        if not overwrite:
            raise store.StoreError(
                f"{root} already exists; continue it with --resume, or replace it with --overwrite"
            )
        if root.is_dir() and not root.is_symlink():
            lock.check(root, break_lock=break_lock)
        ownership.check_replaceable(root)
    cells_dir = root / CELLS_DIR if resume else _staging(config)
    source = open_source(config, panel, cells_dir=cells_dir)
    if config.check_disk_space and not resume:
        check_disk_space(config, source.genes)
    if isinstance(source, PartitionedSource) and not resume:  # partition a transcript table once
        partition(config, source.genes, source.folder)
    check_checkpoint(config, source.genes, meta)
    return source, meta


def _staging(config: JobConfig) -> Path:
    """Where a transcript table is partitioned before the store exists (beside it)."""
    out = Path(config.out)
    return out.parent / f".{out.name}.cells-staging"


@contextmanager
def writing(config: JobConfig, resume: bool = False, break_lock: bool = False):
    """Hold the output store's lock (creating its folder if needed) for the whole run: taken
    before anything is written, released once the run has stopped. A folder this made and left
    empty is removed again. Re-entrant within a process."""
    root = Path(config.out)
    made = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    nothing_written = not ownership.has_content(root)  # a stale lock there guards nothing
    try:
        with lock.held(root, resume=resume or nothing_written, break_lock=break_lock) as lease:
            yield lease
    finally:
        if made and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def prepare_store(
    config: JobConfig, overwrite: bool = False, resume: bool = False, break_lock: bool = False
) -> Path:
    """Run the preflight checks, then create the job's store (or, resuming, continue it) under
    its lock; returns the checkpoint path. The ledger is written first: a store whose creation
    was cut short is recognised as ours, and a resume creates it again."""
    with writing(config, resume, break_lock):
        source, meta = preflight(config, overwrite, resume, break_lock)
        root = Path(config.out)
        checkpoint = resolve_checkpoint(config)
        if resume and has_ledger(root) and ledger.created(root):
            attrs = store.group_attrs(root)["tera_pipeline"]
            attrs.update(status="running", resumed=time.strftime("%Y-%m-%d %H:%M:%S"))
            attrs.pop("last_error", None)
            store.update_attrs(root, {"tera_pipeline": attrs})
            return checkpoint
        if resume:  # creation was cut short: nothing was computed, start it again
            source, meta = preflight(config, overwrite=True, break_lock=break_lock)
        ownership.clear_store(root)  # only entries of a store of ours; keeps the lock
        store.forget_handles()
        digest = file_digest(checkpoint)
        ledger.create(root, config, ledger.output_identity(config, digest))
        attrs = {
            "tera_pipeline": {
                "config": config.model_dump(mode="json"),
                "seed": config.diffusion.seed,
                "spacing_um": list(config.volume.spacing_um),
                "checkpoint": {
                    "path": str(checkpoint),
                    "sha256": digest,
                    "trained_with": meta.get("command"),
                },
                "genes": list(source.genes),
                "version": _version(),
                "status": "running",
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        }
        store.create_group(root, coordinates(config, source.genes), attrs)
        for spec in array_specs(config, source.genes):
            store.create_array(root, spec)
        if isinstance(source, PartitionedSource):
            source.folder.rename(root / CELLS_DIR)
        ledger.set_created(root)
        return checkpoint


def has_ledger(root: Path) -> bool:
    return (Path(root) / ledger.LEDGER / "zarr.json").is_file()


@lru_cache(maxsize=8)
def job_genes(root: Path) -> tuple[str, ...]:
    """The gene panel of a job's store (read once per process)."""
    return tuple(store.group_attrs(root)["tera_pipeline"]["genes"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tera-pipeline")
    except PackageNotFoundError:
        return "unknown"


# -- block tasks ----------------------------------------------------------------------------------
def rasterize_block(config: JobConfig, index: tuple[int, ...]) -> BlockStats:
    """Conditioning of one block: the gene bins and cell counts of its core, from the source."""
    t0 = time.perf_counter()
    core = config.grid().block(index).core
    b, sp = config.conditioning.bin, config.volume.spacing_um
    root = Path(config.out)
    bins = bin_box(core, b)
    genes, counts = open_source(config, job_genes(root)).rasters(core, bins, sp, b)
    crc = store.write_box(store.open_array(root, CONDITIONING), bins, genes)
    crc = store.write_box(store.open_array(root, CELL_COUNT), bins, counts, crc)
    return BlockStats(total_s=time.perf_counter() - t0, digest=crc)


def read_span(grid, core: Box) -> tuple[list[Box], Box]:
    """The lattice patches touching a block's core, and the box they cover (what a step of the
    block reads: its core and the exact halo)."""
    patches = grid.lattice.patches_touching(core, grid.volume)
    span = Box.from_bounds(
        [min(p.begin[a] for p in patches) for a in range(3)],
        [max(p.end[a] for p in patches) for a in range(3)],
    )
    return patches, span


@gpu_task
def denoise_block(
    config: JobConfig, checkpoint: str, step: int, index: tuple[int, ...]
) -> BlockStats:
    """One DDIM step of one block: read with halo, denoise patches, blend, update, write core.

    The block's own seam patches are computed first and published; those its lower neighbours
    own are taken from their files when published (``tera_pipeline.seams``), else computed.
    """
    predictor = get_predictor(checkpoint, config.batch_size)  # loaded once per worker
    t0 = time.perf_counter()
    stats = BlockStats()
    grid = config.grid()
    core = grid.block(index).core
    patches, span = read_span(grid, core)
    sched = schedule_of(config, predictor.meta.get("prediction", "epsilon"))
    root, channels = Path(config.out), len(config.volume.stains)
    if step == 0:
        x = position_noise(config.diffusion.seed, 0, span, channels)
        outside = span.intersect(grid.volume_box)
        mask = np.zeros(span.shape, dtype=bool)
        mask[outside.slices(span)] = True
        x[:, ~mask] = 0.0  # beyond the volume the state reads as the fixed fill, as in scratch
    else:
        x = store.read_box(store.open_array(root, STATES[step % 2]), span).astype(np.float32)
    b, context = config.conditioning.bin, predictor.config.cond_context
    cond_span = patch_bins(span, b, context)
    cond = store.read_box(store.open_array(root, CONDITIONING), cond_span)
    stats.read_s = time.perf_counter() - t0

    t = sched.timestep(step)
    batch = max(config.batch_size, 1)
    key = tuple(int(i) for i in index)
    seams = plan_seams(grid, key, patches, share=config.share_seams)
    preds = np.empty((len(patches), channels, *config.lattice.patch), dtype=np.float32)
    todo = deque(seams.outgoing + seams.interior)  # outgoing first: neighbours wait on them
    unpublished, resolved = len(seams.outgoing), not seams.incoming
    while todo or not resolved:
        if not resolved and len(todo) < batch:  # as late as possible; fills the last batch
            tr = time.perf_counter()
            missing = fetch_seams(root, grid, step, patches, seams, preds)
            stats.read_s += time.perf_counter() - tr
            stats.shared = sum(map(len, seams.incoming.values())) - len(missing)
            todo.extend(missing)
            resolved = True
            continue
        group = [todo.popleft() for _ in range(min(batch, len(todo)))]
        xs = np.stack([x[(slice(None), *patches[i].slices(span))] for i in group])
        windows = [patch_bins(patches[i], b, context).slices(cond_span) for i in group]
        cs = np.stack([cond[(slice(None), *w)] for w in windows])
        tm = time.perf_counter()
        preds[group] = predictor(xs, t, cs)
        stats.model_s += time.perf_counter() - tm
        stats.patches += len(group)
        if unpublished > 0:
            unpublished -= len(group)
            if unpublished <= 0:
                tw = time.perf_counter()
                publish_seams(root, grid, step, key, preds[seams.outgoing])
                stats.write_s += time.perf_counter() - tw

    window = patch_window(tuple(config.lattice.patch), config.lattice.window)
    acc = Accumulator(core, channels)
    for p, e in zip(patches, preds, strict=True):  # lattice order, whoever computed them
        acc.add(p, e, window)

    noise = None
    if sched.sigma(step) > 0:
        noise = position_noise(config.diffusion.seed, step + 1, core, channels)
    x_next = sched.ddim_update(x[(slice(None), *core.slices(span))], acc.result(), step, noise)
    tw = time.perf_counter()
    if step == sched.steps - 1:
        stats.digest = store.write_box(store.open_array(root, IMAGE), core, to_uint8(x_next))
    else:
        state = store.open_array(root, STATES[(step + 1) % 2])
        stats.digest = store.write_box(state, core, x_next)
    stats.write_s += time.perf_counter() - tw
    stats.total_s = time.perf_counter() - t0
    return stats


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map the model's [-1, 1] range to uint8 intensities."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# -- scheduling ---------------------------------------------------------------------------
WORKERS_LOST_S = 120.0
"""A phase fails when the cluster has had no worker for this long (``workers_lost_s``)."""


def run_blocks(
    client,
    fn: Callable[..., BlockStats],
    args: tuple,
    indices: Iterable[tuple[int, ...]],
    total: int,
    phase: str,
    in_flight: int,
    progress: Progress | None = None,
    on_done: Callable[[tuple[int, ...], BlockStats], None] | None = None,
    retries: int = 0,
    workers_lost_s: float = WORKERS_LOST_S,
) -> StepReport:
    """Run ``fn(*args, index)`` for every block on the Dask client, at most ``in_flight`` at once.

    Blocks are drawn lazily from ``indices``, so the grid is never materialised as a task list.
    The first failing block raises with its coordinates, and so does a cluster left without any
    worker for ``workers_lost_s`` (a run never hangs on a dead cluster). Workers get a block
    only when they have a free thread (the rest wait in the scheduler's queue), so blocks of
    unequal cost (seam sharing makes them so) balance over the workers instead of being dealt
    out in advance.
    """
    from distributed import wait

    in_flight = _assign_on_demand(client, total, in_flight)
    report = StepReport(phase, total, 0.0)
    t0 = time.perf_counter()
    it = iter(indices)
    watchdog = _WorkerWatchdog(client, workers_lost_s, phase)

    where: dict[str, tuple[int, ...]] = {}

    def submit(index):
        key = f"{phase}-{'-'.join(map(str, index))}-{time.monotonic_ns()}"
        where[key] = index
        resources = block_resources(client, fn)  # {"GPU": 1} for model tasks on GPU workers
        return client.submit(
            fn, *args, index, key=key, pure=False, retries=retries, resources=resources
        )

    pending = {submit(i) for i in itertools.islice(it, in_flight)}
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
        for fut in finished:
            try:
                stats = _result(fut, watchdog)
            except RunStopped:
                client.cancel(list(pending))
                raise
            except Exception as err:
                for other in pending:
                    other.cancel()
                raise GenerationError(
                    f"{phase}: block {where[fut.key]} failed after {retries} retries: {err}; "
                    "the finished blocks are kept: continue with --resume"
                ) from err
            report.add(stats)
            if on_done:
                on_done(where[fut.key], stats)
            del where[fut.key]
            done += 1
            if progress:
                progress(phase, done, total)
            nxt = next(it, None)
            if nxt is not None:
                pending.add(submit(nxt))
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
        self.last_check = 0.0

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


def _assign_on_demand(client, total: int, in_flight: int) -> int:
    """Have each block go to the first worker with a free thread; returns the in-flight bound.

    Dask deals tasks out to workers in advance: a group of more than twice the threads is queued
    but each worker still gets ``ceil(1.1 x threads)`` (its default worker-saturation), and a
    smaller group is assigned entirely at submission. On the demo's 4 blocks of 448, 392, 392 and
    343 patch evaluations that left one worker idle 11 % of each step. Saturation 1.0, and no
    more blocks in flight than threads for a small group, fix both.
    """
    try:
        client.run_on_scheduler(
            lambda dask_scheduler: setattr(dask_scheduler, "WORKER_SATURATION", 1.0)
        )
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        threads = sum(w.get("nthreads", 1) for w in workers) or 1
    except Exception as err:  # a scheduler that refuses: keep its own policy
        log.warning("could not set the scheduler's worker-saturation: %s", err)
        return in_flight
    return min(in_flight, threads) if total <= 2 * threads else in_flight


def in_flight(config: JobConfig, client) -> int:
    """Blocks submitted at once: the config's, or 4 per worker."""
    if config.blocks_in_flight:
        return config.blocks_in_flight
    return 4 * max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


def conditioning_pass(
    config: JobConfig, client, progress: Progress | None = None, indices: Blocks | None = None
) -> StepReport:
    """Rasterise the conditioning of every block not yet done (or of ``indices``)."""
    return _run_phase(
        config, client, 0, "conditioning", rasterize_block, (config,), progress, indices
    )


def denoise_step(
    config: JobConfig,
    checkpoint: Path,
    step: int,
    client,
    progress: Progress | None = None,
    indices: Blocks | None = None,
) -> StepReport:
    """One DDIM step over every block not yet done (or ``indices``, in that order); returns when
    all finished: the barrier between steps."""
    phase = f"step {step + 1}/{config.diffusion.steps}"
    return _run_phase(
        config,
        client,
        step + 1,
        phase,
        denoise_block,
        (config, str(checkpoint), step),
        progress,
        indices,
    )


def _run_phase(config, client, row, phase, fn, args, progress, indices) -> StepReport:
    """Run one phase's blocks; the ledger records each finished block (and skips done ones)."""
    root = Path(config.out)
    if indices is None:
        todo, total = ledger.pending(root, row), ledger.count_pending(root, row)
    else:
        todo = [tuple(i) for i in indices]
        total = len(todo)
    return run_blocks(
        client,
        fn,
        args,
        todo,
        total,
        phase,
        in_flight(config, client),
        progress,
        on_done=lambda index, stats: ledger.mark(root, row, index, stats.digest),
        retries=config.retries,
        workers_lost_s=config.workers_lost_s,
    )


def finalize_store(config: JobConfig, reports: Sequence[StepReport]) -> None:
    """Remove scratch, record the run's figures, consolidate metadata."""
    root = Path(config.out)
    store.remove(root, store.SCRATCH)
    attrs = store.group_attrs(root)["tera_pipeline"]
    attrs["status"] = "complete"
    attrs["run"] = {
        "blocks": config.grid().num_blocks,
        "voxels": int(np.prod(config.volume.shape)) * len(config.volume.stains),
        "phases": [
            {
                "phase": r.phase,
                "blocks": r.blocks,
                "wall_s": round(r.wall_s, 3),
                "patches": r.stats.patches,
                "model_s": round(r.stats.model_s, 3),
            }
            for r in reports
        ],
    }
    store.update_attrs(root, {"tera_pipeline": attrs})
    store.consolidate(root)


def generate(
    config: JobConfig,
    client,
    progress: Progress | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> list[StepReport]:
    """The whole job without an orchestrator: store, conditioning, every step, final image.
    With ``resume``, only blocks the ledger does not record as done are computed."""
    from tera_pipeline.pyramid import build as build_pyramid

    with writing(config, resume):
        checkpoint = prepare_store(config, overwrite=overwrite, resume=resume)
        with holding(config):
            reports = [conditioning_pass(config, client, progress)]
            for step in range(config.diffusion.steps):
                reports.append(denoise_step(config, checkpoint, step, client, progress))
            build_pyramid(config, client, progress)  # multiscale levels + OME-NGFF metadata
            finalize_store(config, reports)
    return reports


@contextmanager
def holding(config: JobConfig) -> Iterator[None]:
    """While a prepared job runs: an error, or an interruption, is kept in the store."""
    root = Path(config.out)
    try:
        yield
    except RunStopped:
        record_error(root, None)
        raise
    except Exception as err:
        record_error(root, err)
        raise
    except BaseException:  # KeyboardInterrupt: stopped, to be resumed
        record_error(root, None)
        raise
