"""Prefect flows for the downstream analyses; thin: they call tera_pipeline.analysis."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact

from flows.artifacts import artifact_key, png_data_uri
from tera_pipeline.analysis import attention, labels
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.storage import ownership
from tera_pipeline.storage.layout import job_of


@flow(name="attention")
def attention_flow(store: str, pairs: str | None = None, workers: int | None = None) -> str:
    """Gene-gene attention over the store's chunk grid; writes arrays and a heat-map PNG."""
    root = Path(store)
    job = job_of(root)
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with cluster_client(spec) as client:
        get_run_logger().info("Dask dashboard: %s", client.dashboard_link)
        result = attention.run(root, client, pairs)
    with ownership.side_file(root, root.parent / f"{root.stem}.attention.png") as target:
        png = attention.heatmap_png(result, root, target)
    create_image_artifact(
        png_data_uri(png),
        key=artifact_key(root, "attention"),
        description=f"Gene-gene attention of {root} ({png})",
    )
    return str(png)


@flow(name="labels")
def labels_flow(store: str, workers: int | None = None, block: list[int] | None = None) -> dict:
    """Nuclei instance labels of the DAPI stain into the OME-Zarr label image ``labels/nuclei``,
    block by block (``block``: the labels' block, default the job's; the labels are the same)."""
    root = Path(store)
    job = job_of(root)
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with cluster_client(spec) as client:
        get_run_logger().info("Dask dashboard: %s", client.dashboard_link)
        return labels.run(root, client, tuple(block) if block else None)
