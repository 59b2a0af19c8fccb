"""Prefect flow ``analyze_spatia``: SPATIA over a store's chunk grid; thin, it calls
tera_pipeline.analysis.spatia (block tasks are plain functions handed to Dask)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from tera_pipeline.analysis import spatia
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.storage.layout import job_of


@flow(name="analyze_spatia")
def analyze_spatia(
    store: str,
    workers: int | None = None,
    checkpoint: str | None = None,
    impute: list[str] | None = None,
    block: list[int] | None = None,
) -> dict:
    """Cell embeddings, types and imputed genes (``<stem>.spatia.h5ad`` beside the store) and
    niche / tissue embeddings (arrays in the store); returns the paths and counts."""
    root = Path(store)
    job = job_of(root)
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with cluster_client(spec) as client:
        get_run_logger().info("Dask dashboard: %s", client.dashboard_link)
        result = spatia.run(
            root,
            client,
            Path(checkpoint) if checkpoint else None,
            impute or (),
            block=tuple(block) if block else None,
        )
    get_run_logger().info("SPATIA: %d cells -> %s", result["cells"], result["h5ad"])
    return result
