"""Prefect flow: MagNet over a store's chunk grid; thin, it calls tera_pipeline.analysis.magnet."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from tera_pipeline.analysis import magnet
from tera_pipeline.cluster import cluster_client
from tera_pipeline.report import job_of


@task(name="magnet-blocks")
def predict(store: str, workers: int | None, checkpoint: str | None) -> dict:
    job = job_of(Path(store))
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with cluster_client(spec) as client:
        get_run_logger().info("Dask dashboard: %s", client.dashboard_link)
        report = magnet.run(Path(store), client, Path(checkpoint) if checkpoint else None)
    return {"blocks": report.blocks, "wall_s": round(report.wall_s, 2)}


@task(name="magnet-cycle-consistency")
def score(store: str) -> dict:
    return magnet.cycle_consistency(Path(store))


@flow(name="analyze_magnet")
def analyze_magnet(
    store: str, workers: int | None = None, checkpoint: str | None = None, metrics: bool = True
) -> dict:
    """Predict expression from the image into ``magnet_expression``; with ``metrics``, compare it
    with the conditioning (cycle consistency) and write ``<store>.magnet.json``."""
    result = {"store": store, "run": predict(store, workers, checkpoint)}
    if metrics:
        result["cycle_consistency"] = score(store)
        out = Path(store).with_suffix(".magnet.json")
        out.write_text(json.dumps(result, indent=2))
        result["report"] = str(out)
    return result
