"""Prefect flow ``pipeline``: generate a volume, then run the downstream analyses on its store
(gene-gene attention, nuclei labels, MagNet, SPATIA: those whose flow modules are installed), each
as a subflow.
"""

from __future__ import annotations

import importlib

from prefect import Flow, flow, get_run_logger

from flows.generate import generate_flow
from tera_pipeline.core.config import JobConfig

# analysis name -> (module, flow function); all take (store, workers)
ANALYSES = {
    "attention": ("flows.analyze", "attention_flow"),
    "labels": ("flows.analyze", "labels_flow"),
    "magnet": ("flows.magnet", "analyze_magnet"),
    "spatia": ("flows.spatia", "analyze_spatia"),
}


def analysis_flows() -> dict[str, Flow]:
    """The analysis flows present in this installation, by name (a missing module is skipped;
    an error inside a present one is raised)."""
    found: dict[str, Flow] = {}
    for name, (module, attr) in ANALYSES.items():
        try:
            found[name] = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return found


@flow(name="pipeline", validate_parameters=True, retries=0, persist_result=False)
def pipeline_flow(
    config: JobConfig,
    analyses: list[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Generate ``config``'s volume, then run ``analyses`` (default: every one installed) on it."""
    available = analysis_flows()
    chosen = list(available) if analyses is None else list(analyses)
    unknown = sorted(set(chosen) - set(available))
    if unknown:  # before anything is generated
        raise ValueError(f"unknown analyses {unknown}; available: {sorted(available)}")
    store = generate_flow(config, overwrite=overwrite, resume=resume, show_progress=False)
    results: dict = {"store": store}
    for name in chosen:
        get_run_logger().info("analysis %s on %s", name, store)
        results[name] = available[name](store=store, workers=workers)
    return results
