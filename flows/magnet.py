"""Prefect flow: MagNet over a store's chunk grid; thin, it calls tera_pipeline.analysis.magnet."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from tera_pipeline.analysis import magnet
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.storage import ownership
from tera_pipeline.storage.layout import job_of


@task(name="magnet")
def predict_and_score(
    store: str, workers: int | None, checkpoint: str | None, metrics: bool
) -> dict:
    """Block tasks on the job's cluster, then the metrics as dask reductions on that cluster."""
    root = Path(store)
    job = job_of(root)
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with cluster_client(spec) as client:
        get_run_logger().info("Dask dashboard: %s", client.dashboard_link)
        report = magnet.run(root, client, Path(checkpoint) if checkpoint else None)
        result = {
            "store": store,
            "run": {"blocks": report.blocks, "wall_s": round(report.wall_s, 2)},
        }
        if metrics:
            result["cycle_consistency"] = magnet.cycle_consistency(root)
    return result


@flow(name="analyze_magnet")
def analyze_magnet(
    store: str, workers: int | None = None, checkpoint: str | None = None, metrics: bool = True
) -> dict:
    """Predict expression from the image into ``magnet_expression``; with ``metrics``, compare it
    with the conditioning (cycle consistency) and write ``<store>.magnet.json``."""
    magnet.check(Path(store), Path(checkpoint) if checkpoint else None, metrics)
    result = predict_and_score(store, workers, checkpoint, metrics)
    if metrics:
        out = Path(store).with_suffix(".magnet.json")
        with ownership.side_file(Path(store), out):
            out.write_text(json.dumps(result, indent=2))
        result["report"] = str(out)
    return result
