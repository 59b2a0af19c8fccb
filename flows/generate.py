"""Prefect flow ``generate``: one task per phase (store, conditioning, each DDIM step, pyramid,
finalise), then the run's artifacts (figures table, orthogonal slices).

Each phase task hands its blocks to Dask as plain functions (never one Prefect task per block),
so workers need no Prefect server and the flow scales to millions of blocks.

Retries and results, deliberately:

- Block failures are retried by Dask (``config.retries`` per block); a phase task is retried by
  Prefect only for errors outside the blocks (``OSError``: a lost scheduler connection, a
  timeout, a filesystem hiccup of the driver), and then recomputes only the blocks the ledger does
  not record as done. ``prepare_store`` is never retried: its errors (bad input, a held lock, an
  existing store) are the same the second time. The flow itself is not retried: a stopped run is
  continued with ``resume=True``, which checks that the job is the same.
- No Prefect result is persisted: task inputs hold a live Dask client, and the authoritative
  record of what is done is the store's ledger (beside the data, on the shared filesystem),
  which ``--resume`` and ``tera status`` read; Prefect's local result storage would hold only
  copies of small reports on the flow's host.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.artifacts import StepProgress, publish_run_artifacts
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import integrity, lifecycle
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.runtime.progress import BlockProgress


def _outside_blocks(task, task_run, state) -> bool:
    """Retry a phase for an ``OSError`` raised outside the blocks (connection, timeout, driver
    filesystem); block errors reach here as ``GenerationError`` after Dask's own retries."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


_task = task(cache_policy=NONE, persist_result=False)
_phase = task(
    cache_policy=NONE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_outside_blocks,
)


@_task
def prepare_store(config: JobConfig, overwrite: bool, resume: bool, break_lock: bool) -> Path:
    return lifecycle.prepare_store(config, overwrite, resume, break_lock)


@_task
def repair_blocks(config: JobConfig, client, checkpoint: Path, repair: bool, progress) -> str:
    """Before a resume continues: refuse a damaged store, or with ``repair`` restore it."""
    if not repair:
        integrity.check_before_resume(config, repair=False)
        return "intact"
    damage = integrity.repair(config, client, checkpoint, progress)
    text = damage.describe(config.diffusion.steps) if damage else "nothing to repair"
    get_run_logger().info("repair: %s", text)
    return text


@_phase(task_run_name="{name}")
def run_phase(name: str, phase) -> object:
    """One phase of the job (``lifecycle.run_phases`` names them) as a Prefect task."""
    result = phase()
    if isinstance(result, tasks.PhaseReport):
        get_run_logger().info(
            "%s: %d blocks, %d patches in %.1f s",
            name,
            result.blocks,
            result.stats.items,
            result.wall_s,
        )
    return result


def _reporting(steps: StepProgress | None):
    """Run each phase as a task; after each DDIM step, the step-progress artifact moves on."""

    done = 0

    def run(name: str, phase):
        nonlocal done
        result = run_phase(name, phase)
        if steps and name.startswith("denoise step"):
            done += 1
            steps.done(done)
        return result

    return run


@flow(name="generate", validate_parameters=True, retries=0, persist_result=False)
def generate_flow(
    config: JobConfig,
    overwrite: bool = False,
    show_progress: bool = True,
    resume: bool = False,
    artifacts: bool = True,
    break_lock: bool = False,
    repair: bool = False,
    verified: bool = False,
) -> str:
    """Generate the volume described by ``config`` (a JobConfig; a bad field fails the run at once,
    named) into its store; with ``resume``, continue a stopped run from its ledger (refused if a
    finished block is missing or corrupt, unless ``repair``: then exactly those are recomputed;
    ``verified``: the caller has just checked).
    The store's lock is held from before the cluster starts until after it has closed."""
    job = config if isinstance(config, JobConfig) else JobConfig.model_validate(config)
    logger = get_run_logger()
    with lifecycle.writing(job, resume, break_lock), cluster_client(job.cluster) as client:
        logger.info("Dask dashboard: %s", client.dashboard_link)
        checkpoint = prepare_store(job, overwrite, resume, break_lock)
        grid = job.grid()
        logger.info(
            "volume %s, %d blocks of %s, %d DDIM steps",
            job.volume.shape,
            grid.num_blocks,
            job.storage.block,
            job.diffusion.steps,
        )
        steps = StepProgress(job.out, job.diffusion.steps) if artifacts else None
        bar = BlockProgress() if show_progress else nullcontext()
        with lifecycle.holding(job), bar as progress:
            if resume and (repair or not verified):
                repair_blocks(job, client, checkpoint, repair, progress)
            lifecycle.run_phases(job, checkpoint, client, progress, run=_reporting(steps))
    if artifacts:
        state = publish_run_artifacts(str(job.out), return_state=True)
        if state.is_failed():  # the volume is complete; a missing artifact does not undo it
            logger.warning("run artifacts not published: %s", state.message)
    return str(job.out)
