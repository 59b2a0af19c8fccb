"""A generation job from start to end: preflight (every check before anything is written), the
store created or reopened under its lock, the phases (conditioning, every DDIM step, the
pyramid), and the finished store. ``generate`` reads top-down as that lifecycle; the Prefect
flow runs the same phases as tasks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from models.checkpoint_files import file_digest, read_metadata
from tera_pipeline.core import frames
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import GenerationError, RunStopped
from tera_pipeline.generation.block_step import denoise_block, rasterize_block
from tera_pipeline.generation.image_phase import unroll_block
from tera_pipeline.generation.predictor import check_checkpoint, resolve_checkpoint
from tera_pipeline.inputs.conditioning import CELLS_DIR, open_source
from tera_pipeline.inputs.partition import PartitionedSource, partition
from tera_pipeline.inputs.transcript_cells import CELL_COUNTS
from tera_pipeline.runtime.tasks import (
    Blocks,
    BlockStats,
    BlockTask,
    PhaseReport,
    Progress,
    run_task,
)
from tera_pipeline.storage import ledger, lock, ownership, store
from tera_pipeline.storage.layout import array_specs, bytes_needed, coordinates
from tera_pipeline.storage.ledger import has_ledger
from tera_pipeline.storage.status import record_error

log = logging.getLogger("tera_pipeline")


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
                "cell_count": getattr(source, "cell_count_kind", CELL_COUNTS),
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tera-pipeline")
    except PackageNotFoundError:
        return "unknown"


def conditioning_pass(
    config: JobConfig, client, progress: Progress | None = None, indices: Blocks | None = None
) -> PhaseReport:
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
) -> PhaseReport:
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


def image_pass(
    config: JobConfig, client, progress: Progress | None = None, indices: Blocks | None = None
) -> PhaseReport:
    """The image phase, where the last step rolled: each block's core of the last step's image,
    stored rolled, written in place."""
    row = frames.image_phase(config)
    return _run_phase(config, client, row, "image", unroll_block, (config,), progress, indices)


def _run_phase(config, client, row, phase, fn, args, progress, indices) -> PhaseReport:
    """Run one phase's blocks; the ledger records each finished block (and skips done ones)."""
    root = Path(config.out)
    if indices is None:
        todo, total = ledger.pending(root, row), ledger.count_pending(root, row)
    else:
        todo = [tuple(i) for i in indices]
        total = len(todo)

    def mark(finished: list[tuple[tuple[int, ...], BlockStats]]) -> None:
        ledger.mark(root, row, [(index, stats.digest) for index, stats in finished])

    return run_task(client, config, BlockTask(phase, fn, args, todo, total, mark), progress)


def finalize_store(config: JobConfig, reports: Sequence[PhaseReport]) -> None:
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
                "patches": r.stats.items,
                "model_s": round(r.stats.model_s, 3),
            }
            for r in reports
        ],
    }
    store.update_attrs(root, {"tera_pipeline": attrs})
    store.consolidate(root)


PhaseRunner = Callable[[str, Callable[[], object]], object]
"""Runs one named phase (``run(name, phase)``); the Prefect flow makes each a task."""


def _direct(name: str, phase: Callable[[], object]) -> object:
    return phase()


def run_phases(
    config: JobConfig,
    checkpoint: Path,
    client,
    progress: Progress | None = None,
    run: PhaseRunner = _direct,
) -> list[PhaseReport]:
    """The job's phases in order: conditioning, every DDIM step (a barrier between steps), the
    image phase where the last step rolled, the pyramid (multiscale levels and OME-NGFF
    metadata), the finished store. Each phase computes only the blocks its ledger row does not
    record as done."""
    from tera_pipeline.generation.pyramid import build as build_pyramid

    config = ledger.as_laid_out(config, Path(config.out))
    reports = [run("conditioning", lambda: conditioning_pass(config, client, progress))]
    for step in range(config.diffusion.steps):
        phase = partial(denoise_step, config, checkpoint, step, client, progress)
        reports.append(run(f"denoise step {step + 1}", phase))
    if frames.unrolls(config):
        reports.append(run("image", lambda: image_pass(config, client, progress)))
    run("pyramid", lambda: build_pyramid(config, client, progress))
    run("finalize", lambda: finalize_store(config, reports))
    release_workers(client)
    return reports


def release_workers(client) -> None:
    """Have the workers drop what they keep of a store: decoded conditioning, and scratch files
    kept mapped, whose disk space a mapping holds after ``finalize_store`` deleted them."""
    try:
        client.run(store.forget_handles)
    except Exception as err:  # noqa: BLE001 - a worker gone: its end released them
        log.warning("could not have the workers release the store's files: %s", err)


def generate(
    config: JobConfig,
    client,
    progress: Progress | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> list[PhaseReport]:
    """The whole job without an orchestrator: under the store's lock, create (or, with
    ``resume``, reopen) the store, then run its phases."""
    with writing(config, resume):
        checkpoint = prepare_store(config, overwrite=overwrite, resume=resume)
        with holding(config):
            return run_phases(config, checkpoint, client, progress)


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
