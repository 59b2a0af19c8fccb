"""``tera generate``, ``demo``, ``evaluate``, ``verify``, ``status`` and ``deploy``."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    REFUSALS,
    GeneratedStore,
    JobStore,
    Lattice,
    ModelCheckpoint,
    Verbose,
    Workers,
    app,
    fail,
    one_line,
    refusing,
    running_flows,
    setup_logging,
    transcript_options,
    triple,
)

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.


@app.command()
@transcript_options
def generate(
    config: Annotated[Path | None, typer.Argument(help="YAML job config (optional).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output zarr store.")] = None,
    shape: Annotated[str | None, typer.Option(help="Volume Z,Y,X in voxels.")] = None,
    block: Annotated[str | None, typer.Option(help="Block core Z,Y,X (whole shards).")] = None,
    workers: Workers = None,
    seed: Annotated[int | None, typer.Option(help="Noise seed.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps.")] = None,
    lattice: Lattice = None,
    sampler: Annotated[
        str | None, typer.Option(help="Sampler: ddim, or dpmpp_2m (DPM-Solver++(2M)).")
    ] = None,
    checkpoint: ModelCheckpoint = None,
    cells: Annotated[
        Path | None, typer.Option(help="Cells or transcripts: .h5ad, .parquet, .csv.")
    ] = None,
    gene_panel: Annotated[Path | None, typer.Option(help="Gene panel file.")] = None,
    drop_outside: Annotated[
        bool | None, typer.Option("--drop-outside", help="Drop cells outside the volume.")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Existing Dask scheduler address.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output store.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue a stopped run of the same job.")] = False,
    repair: Annotated[
        bool, typer.Option(help="With --resume: recompute blocks found missing or corrupt.")
    ] = False,
    break_lock: Annotated[
        bool,
        typer.Option(help="Take the store from another host's run even if it looks alive."),
    ] = False,
    ignore_disk_space: Annotated[
        bool, typer.Option(help="Start even if the output filesystem looks too small.")
    ] = False,
    verbose: Verbose = False,
    transcripts: dict | None = None,
) -> None:
    """Generate a volume from a YAML config, with command-line overrides."""
    from pydantic import ValidationError

    from tera_pipeline.core.config import JobConfig, lattice_preset

    setup_logging(verbose)
    overrides = {
        "out": str(out) if out else None,
        "volume.shape": triple(shape, "--shape"),
        "storage.block": triple(block, "--block"),
        "cluster.workers": workers,
        "diffusion.seed": seed,
        "diffusion.steps": steps,
        "diffusion.sampler": sampler,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "conditioning.source": str(cells) if cells else None,
        "conditioning.gene_panel": str(gene_panel) if gene_panel else None,
        "conditioning.drop_outside": drop_outside,
        "cluster.address": address,
        "cluster.kind": "address" if address else None,
        "check_disk_space": False if ignore_disk_space else None,
        **(transcripts or {}),
    }
    try:
        job = (
            JobConfig.from_yaml(config, **overrides)
            if config
            else JobConfig().with_overrides(**overrides)
        )
        if lattice:
            job = job.with_overrides(**lattice_preset(lattice, job.lattice.patch))
    except (ValidationError, OSError, ValueError) as err:
        fail(one_line(err))
    if repair and not resume:
        fail("--repair goes with --resume")
    run_job(job, overwrite, resume, break_lock, repair)


def run_job(
    job, overwrite: bool, resume: bool = False, break_lock: bool = False, repair: bool = False
) -> None:
    """Check, take the store's lock, then run the flow; the lock goes only once the run (its
    cluster and its Prefect server) has stopped. Ctrl-C and SIGTERM stop it the same way."""
    from prefect.exceptions import TerminationSignal

    from flows.api_server import prefect_api
    from flows.generate import generate_flow
    from tera_pipeline.core.errors import RunStopped
    from tera_pipeline.generation.integrity import check_before_resume
    from tera_pipeline.generation.lifecycle import preflight, writing

    try:
        preflight(job, overwrite, resume, break_lock)  # fast, in one line, before Prefect
        with _interrupts_stop_the_run(), writing(job, resume, break_lock):
            if resume:
                check_before_resume(job, repair)
            with prefect_api():
                generate_flow(
                    job.model_dump(mode="json"),
                    overwrite=overwrite,
                    resume=resume,
                    break_lock=break_lock,
                    repair=repair,
                    verified=resume,
                )
    except (RunStopped, KeyboardInterrupt, TerminationSignal):  # Prefect's form of SIGTERM
        typer.secho(
            f"stopped: {job.out} is kept as it was; continue it with --resume",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(130) from None
    except REFUSALS as err:
        fail(str(err))
    typer.echo(f"wrote {job.out}")


@contextmanager
def _interrupts_stop_the_run():
    """Ctrl-C (SIGINT, to the process or its whole group) and SIGTERM ask the run to stop: the
    engine stops between blocks, the cluster and the Prefect server are closed, and only then
    is the lock released. Further signals while it stops are ignored (an impatient second
    Ctrl-C must not leave the store locked by a half-stopped run)."""
    import signal

    from tera_pipeline.runtime.tasks import STOP

    def stop(signum, frame):
        if not STOP.is_set():
            STOP.set()
            typer.secho("stopping after the blocks in flight ...", err=True)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    STOP.clear()
    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.clear()


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("tera_demo"),
    workers: Workers = None,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the job's).")] = None,
    lattice: Lattice = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo output.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue a stopped demo.")] = False,
    verbose: Verbose = False,
) -> None:
    """Synthetic brain -> conditioning -> generation under the Prefect flow, then a summary."""
    import xarray as xr

    from flows.cli.analyze import demo_spatia, echo_labels, echo_magnet
    from tera_pipeline.core.config import JobConfig, lattice_preset
    from tera_pipeline.evaluation.fidelity import conditioning_fidelity
    from tera_pipeline.evaluation.views import orthoslices_png
    from tera_pipeline.storage.ownership import side_file

    setup_logging(verbose)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "demo.zarr"
    job = JobConfig(out=store_path).with_overrides(
        **{"cluster.workers": workers, "diffusion.steps": steps}
    )
    if lattice:
        try:
            job = job.with_overrides(**lattice_preset(lattice, job.lattice.patch))
        except ValueError as err:
            fail(one_line(err))
    run_job(job, overwrite, resume)
    ds = xr.open_zarr(store_path)
    typer.echo(ds)
    from flows.analyze import labels_flow
    from flows.magnet import analyze_magnet

    with running_flows():
        echo_labels(labels_flow(str(store_path), workers))  # before the slices: drawn on them
        fidelity = conditioning_fidelity(store_path)
        with (
            side_file(store_path, out / "demo_orthoslices.png") as target,
            side_file(store_path, out / "demo_fidelity.json") as report,
        ):
            png = orthoslices_png(store_path, target)
            report.write_text(json.dumps(fidelity, indent=2))
        typer.echo(f"orthogonal slices: {png}")
        typer.echo(
            f"conditioning fidelity (per-bin DAPI vs cell count): r = {fidelity['pearson_r']:.3f}"
        )
        typer.echo("MagNet: expression predicted back from the generated image")
        echo_magnet(analyze_magnet(str(store_path), workers))
        demo_spatia(store_path, out, workers)


@app.command()
def evaluate(
    store_path: GeneratedStore,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: beside STORE).")] = None,
    workers: Annotated[int | None, typer.Option(help="Dask workers for the naive run.")] = None,
    verbose: Verbose = False,
) -> None:
    """Fidelity, seam score (engine vs naive tiling), SSIM/PSNR, nuclei: JSON and PNG."""
    from tera_pipeline.evaluation.report import check_finished, check_outputs
    from tera_pipeline.evaluation.report import evaluate as run_evaluation
    from tera_pipeline.runtime.cluster import cluster_client
    from tera_pipeline.storage.layout import job_of

    setup_logging(verbose)
    with refusing(f"cannot evaluate {store_path}"):  # all before a cluster starts
        job = job_of(store_path)
        check_finished(store_path)
        json_path, png_path = check_outputs(store_path, out)
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    with refusing(f"cannot evaluate {store_path}"), cluster_client(spec) as client:
        report = run_evaluation(store_path, client, out)
    seams = report["seams"]
    typer.echo(f"fidelity r = {report['fidelity']['pearson_r']:.3f}")
    typer.echo(
        f"seam score: engine {seams['engine']['seam_score']:.3f}, "
        f"naive tiling {seams['naive_tiling']['seam_score']:.3f}"
    )
    if "truth" in report:
        typer.echo(f"SSIM (DAPI, PolyT) vs ground truth: {report['truth']['ssim_mean']}")
    n = report["nuclei"]
    typer.echo(
        f"nuclei: generated {n['generated']['count']}, "
        f"ground truth {n.get('ground_truth', {}).get('count', '-')}, "
        f"cells {n['cells_in_conditioning']}"
    )
    typer.echo(f"report: {json_path} and {png_path}")


@app.command()
def verify(
    store_path: JobStore,
) -> None:
    """Read back every block the ledger calls done and compare it with its digest; exit 1 and
    name the blocks when any is missing or corrupt."""
    from tera_pipeline.generation.integrity import verify as verify_store
    from tera_pipeline.storage.layout import job_of

    with refusing():
        job = job_of(store_path)
        damage = verify_store(job)
    if damage:
        typer.secho(
            f"{store_path}: damaged: {damage.describe(job.diffusion.steps)}; restore it with "
            "tera generate --resume --repair",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"{store_path}: {damage.checked} finished blocks verified, all intact")


@app.command()
def status(
    store_path: JobStore,
) -> None:
    """Progress of a running, finished or dead job: blocks done per phase, time, holder, last
    error."""
    from tera_pipeline.storage.status import format_status, job_status

    with refusing():
        info = job_status(store_path)
    for line in format_status(info):
        typer.echo(line)


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="Process work pool (created if absent).")] = "tera",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "tera",
    working_dir: Annotated[
        Path | None, typer.Option(help="Where runs resolve relative paths (default: here).")
    ] = None,
    concurrency_limit: Annotated[int | None, typer.Option(help="Runs at once in the pool.")] = None,
) -> None:
    """Register the Prefect deployments (generate, analyses, pipeline, train) on a process work
    pool of the server at PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        fail("PREFECT_API_URL is not set: start a server (prefect server start) and point to it")
    from flows.deployments import register

    for full_name in register(pool, name, working_dir, concurrency_limit):
        typer.echo(f"deployment {full_name}")
    typer.echo(f"start a worker where the flows should run: prefect worker start --pool {pool}")
