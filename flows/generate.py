"""Prefect flow ``generate``: one task per phase (store, conditioning, each DDIM step, finalise).

Each step task hands that step's blocks to Dask as plain functions (never one Prefect task per
block), so workers need no Prefect server and the flow scales to millions of blocks.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from tera_pipeline import engine
from tera_pipeline.cluster import cluster_client
from tera_pipeline.config import JobConfig
from tera_pipeline.progress import BlockProgress

_task = task(cache_policy=NONE, persist_result=False)


@_task
def prepare_store(config: JobConfig, overwrite: bool, resume: bool) -> Path:
    return engine.prepare_store(config, overwrite=overwrite, resume=resume)


@_task
def rasterize_conditioning(config: JobConfig, client, progress) -> engine.StepReport:
    return engine.conditioning_pass(config, client, progress)


@_task(task_run_name="denoise step {step}")
def denoise_step(
    config: JobConfig, checkpoint: Path, step: int, client, progress
) -> engine.StepReport:
    report = engine.denoise_step(config, checkpoint, step, client, progress)
    get_run_logger().info(
        "step %d: %d blocks, %d patches in %.1f s",
        step + 1,
        report.blocks,
        report.stats.patches,
        report.wall_s,
    )
    return report


@_task
def finalize_store(config: JobConfig, reports: list) -> None:
    engine.finalize_store(config, reports)


@flow(name="generate", validate_parameters=True)
def generate_flow(
    config: dict, overwrite: bool = False, show_progress: bool = True, resume: bool = False
) -> str:
    """Generate the volume described by ``config`` (a JobConfig as a dict) into its store;
    with ``resume``, continue a stopped run from its ledger."""
    job = JobConfig.model_validate(config)
    logger = get_run_logger()
    with cluster_client(job.cluster) as client:
        logger.info("Dask dashboard: %s", client.dashboard_link)
        checkpoint = prepare_store(job, overwrite, resume)
        grid = job.grid()
        logger.info(
            "volume %s, %d blocks of %s, %d DDIM steps",
            job.volume.shape,
            grid.num_blocks,
            job.storage.block,
            job.diffusion.steps,
        )
        bar = BlockProgress() if show_progress else nullcontext()
        with engine.holding(job), bar as progress:
            reports = [rasterize_conditioning(job, client, progress)]
            for step in range(job.diffusion.steps):
                reports.append(denoise_step(job, checkpoint, step, client, progress))
            finalize_store(job, reports)
    return str(job.out)
