"""Prefect deployments of the project's flows on a process work pool.

``register()`` (or ``tera deploy`` / ``python -m flows.deployments``) creates the work pool if
needed and one deployment per flow: ``generate``, ``attention``, ``analyze_magnet`` and
``analyze_spatia`` (when their modules are installed), ``pipeline`` (generate, then the
analyses) and ``train`` (``tera train``, under torchrun for several processes). Runs are
picked up by a worker on the machine that drives the Dask cluster:

    prefect worker start --pool tera

Why a process work pool and a worker rather than ``serve``: the deployments live on the server
independently of any running process (registered once, e.g. from CI); the worker is the one piece
that sits where the flows must run (a login or driver node with the shared filesystem and the
scheduler's network), polls for runs and starts each in its own process, so a crashed or killed
run (continued later with ``resume``) never takes the worker or other runs with it; the pool's
concurrency limit bounds how many jobs share the cluster. Entrypoints are module paths
(``flows.generate.generate_flow``) resolved from the installed package, so no code storage or
image is needed: the worker's environment is the workers' environment.

Relative paths in parameters (``config.out``) resolve against ``working_dir``, by default the
directory ``register`` was called from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment, deploy
from prefect.exceptions import ObjectNotFound

from flows.analyze import attention_flow
from flows.generate import generate_flow
from flows.pipeline import analysis_flows, pipeline_flow
from flows.train import train_flow

WORK_POOL = "tera"
DEPLOYMENT = "tera"
TAGS = ["tera-pipeline"]


def project_flows() -> list[Flow]:
    """Every flow to deploy: generate, the analyses installed, the pipeline, and training."""
    analyses = analysis_flows()
    analyses.setdefault("attention", attention_flow)
    return [generate_flow, *analyses.values(), pipeline_flow, train_flow]


def deployments(
    name: str = DEPLOYMENT, working_dir: Path | None = None, env: dict | None = None
) -> list[RunnerDeployment]:
    """One deployment per flow, entrypoint by module path, parameters checked against each
    flow's signature (JobConfig for ``config``) by the server when a run is created."""
    job_variables: dict = {"working_dir": str(Path(working_dir or Path.cwd()).resolve())}
    if env:
        job_variables["env"] = dict(env)
    return [
        f.to_deployment(
            name=name,
            entrypoint_type=EntrypointType.MODULE_PATH,
            tags=TAGS,
            description=(f.description or "").strip().splitlines()[0] if f.description else None,
            job_variables=job_variables,
            enforce_parameter_schema=True,
        )
        for f in project_flows()
    ]


def ensure_work_pool(pool: str = WORK_POOL, concurrency_limit: int | None = None) -> None:
    """Create the process work pool ``pool`` unless it exists."""
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return
        except ObjectNotFound:
            pass
        client.create_work_pool(
            WorkPoolCreate(
                name=pool,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit,
                description="tera-pipeline flows; start a worker where the flows should run",
            )
        )


def register(
    pool: str = WORK_POOL,
    name: str = DEPLOYMENT,
    working_dir: Path | None = None,
    concurrency_limit: int | None = None,
    env: dict | None = None,
) -> dict[str, UUID]:
    """Create the work pool if needed and (re)register every deployment; returns
    ``{"<flow>/<deployment>": id}``."""
    ensure_work_pool(pool, concurrency_limit)
    deps = deployments(name, working_dir, env)
    ids = deploy(
        *deps,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    return {f"{d.flow_name}/{d.name}": i for d, i in zip(deps, ids, strict=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=WORK_POOL, help="process work pool (created if absent)")
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name")
    parser.add_argument("--working-dir", type=Path, default=None)
    parser.add_argument("--concurrency-limit", type=int, default=None)
    args = parser.parse_args(argv)
    ids = register(args.pool, args.name, args.working_dir, args.concurrency_limit)
    for full_name in ids:
        print(f"deployment {full_name}")
    print(f"start a worker where the flows should run: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
