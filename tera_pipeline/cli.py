"""The ``tera`` command: demo, generate, train."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from models.checkpoint import DEFAULT_DENOISER
from tera_pipeline.errors import TeraError

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
train_app = typer.Typer(no_args_is_help=True, help="Train the project's models.")
app.add_typer(train_app, name="train")
analyze_app = typer.Typer(no_args_is_help=True, help="Downstream analyses of a generated store.")
app.add_typer(analyze_app, name="analyze")


def _triple(text: str | None, what: str) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter(f"{what} must be three integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def _spacing(text: str) -> tuple[float, float, float]:
    """A Z,Y,X voxel spacing in µm."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter(f"--spacing must be three numbers Z,Y,X in µm, got {text!r}")
    return values  # type: ignore[return-value]


def _echo_log(entry: dict) -> None:
    """A training log entry as one JSON line, flushed (for tailing a long run)."""
    typer.echo(json.dumps(entry))
    sys.stdout.flush()


def _fail(message: str) -> None:
    typer.secho(f"error: {' '.join(str(message).splitlines())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("tera_pipeline").setLevel(logging.INFO)


@app.command()
def generate(
    config: Annotated[Path | None, typer.Argument(help="YAML job config (optional).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output zarr store.")] = None,
    shape: Annotated[str | None, typer.Option(help="Volume Z,Y,X in voxels.")] = None,
    block: Annotated[str | None, typer.Option(help="Block core Z,Y,X (whole shards).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Dask workers (default: per GPU or core).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Noise seed.")] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Denoiser checkpoint.")] = None,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a volume from a YAML config, with command-line overrides."""
    from pydantic import ValidationError

    from tera_pipeline.config import JobConfig

    _setup_logging(verbose)
    overrides = {
        "out": str(out) if out else None,
        "volume.shape": _triple(shape, "--shape"),
        "storage.block": _triple(block, "--block"),
        "cluster.workers": workers,
        "diffusion.seed": seed,
        "diffusion.steps": steps,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "conditioning.source": str(cells) if cells else None,
        "conditioning.gene_panel": str(gene_panel) if gene_panel else None,
        "conditioning.drop_outside": drop_outside,
        "cluster.address": address,
        "cluster.kind": "address" if address else None,
        "check_disk_space": False if ignore_disk_space else None,
    }
    try:
        job = (
            JobConfig.from_yaml(config, **overrides)
            if config
            else JobConfig().with_overrides(**overrides)
        )
    except (ValidationError, OSError, ValueError) as err:
        _fail(_one_line(err))
    if repair and not resume:
        _fail("--repair goes with --resume")
    _run(job, overwrite, resume, break_lock, repair)


@contextmanager
def _flows():
    """Where a command runs Prefect flows: the API server (retried if it does not come up;
    one line if it never does)."""
    from flows.api_server import ApiServerError, prefect_api

    try:
        with prefect_api():
            yield
    except ApiServerError as err:
        _fail(str(err))


def _one_line(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        return f"invalid config{' ' + where if where else ''}: {e['msg']}"
    return str(err)


def _generation_errors() -> tuple[type[Exception], ...]:
    from models.checkpoint import CheckpointError
    from tera_pipeline.inputs import InputError

    return (CheckpointError, InputError, TeraError)  # TeraError: store, ledger, lock, engine, ...


def _run(
    job, overwrite: bool, resume: bool = False, break_lock: bool = False, repair: bool = False
) -> None:
    """Check, take the store's lock, then run the flow; the lock goes only once the run (its
    cluster and its Prefect server) has stopped. Ctrl-C and SIGTERM stop it the same way."""
    from prefect.exceptions import TerminationSignal

    from flows.api_server import prefect_api
    from flows.generate import generate_flow
    from tera_pipeline.engine import RunStopped, preflight, writing
    from tera_pipeline.integrity import check_before_resume

    errors = _generation_errors()
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
    except errors as err:
        _fail(str(err))
    typer.echo(f"wrote {job.out}")


@contextmanager
def _interrupts_stop_the_run():
    """Ctrl-C (SIGINT, to the process or its whole group) and SIGTERM ask the run to stop: the
    engine stops between blocks, the cluster and the Prefect server are closed, and only then
    is the lock released. Further signals while it stops are ignored (an impatient second
    Ctrl-C must not leave the store locked by a half-stopped run)."""
    import signal

    from tera_pipeline.engine import STOP

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
    workers: Annotated[int | None, typer.Option(help="Dask workers.")] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 15,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo output.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue a stopped demo.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Synthetic brain -> conditioning -> generation under the Prefect flow, then a summary."""
    import xarray as xr

    from tera_pipeline.config import JobConfig
    from tera_pipeline.ownership import side_file
    from tera_pipeline.quality import conditioning_fidelity
    from tera_pipeline.views import orthoslices_png

    _setup_logging(verbose)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "demo.zarr"
    job = JobConfig(out=store_path).with_overrides(
        **{"cluster.workers": workers, "diffusion.steps": steps}
    )
    _run(job, overwrite, resume)
    ds = xr.open_zarr(store_path)
    typer.echo(ds)
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
    from flows.magnet import analyze_magnet

    typer.echo("MagNet: expression predicted back from the generated image")
    with _flows():
        _echo_magnet(analyze_magnet(str(store_path), workers))
        _demo_spatia(store_path, out, workers)


@app.command()
def evaluate(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: beside STORE).")] = None,
    workers: Annotated[int | None, typer.Option(help="Dask workers for the naive run.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fidelity, seam score (engine vs naive tiling), SSIM/PSNR, nuclei: JSON and PNG."""
    from tera_pipeline.cluster import cluster_client
    from tera_pipeline.report import EvaluateError, check_finished, check_outputs, job_of
    from tera_pipeline.report import evaluate as run_evaluation
    from tera_pipeline.store import StoreError

    _setup_logging(verbose)
    try:  # every refusal before a cluster starts: an unfinished store, a path not ours
        job = job_of(store_path)
        check_finished(store_path)
        json_path, png_path = check_outputs(store_path, out)
    except (EvaluateError, StoreError, OSError, ValueError) as err:
        _fail(err if isinstance(err, EvaluateError) else f"cannot evaluate {store_path}: {err}")
    spec = job.cluster.model_copy(update={"workers": workers or job.cluster.workers})
    try:
        with cluster_client(spec) as client:
            report = run_evaluation(store_path, client, out)
    except (EvaluateError, OSError) as err:
        _fail(err if isinstance(err, EvaluateError) else f"cannot evaluate {store_path}: {err}")
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


@analyze_app.command("attention")
def analyze_attention(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")],
    pairs: Annotated[
        str | None, typer.Option(help="Gene pairs A/B,C/D (default: Tera-MIND's pathways).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Dask workers.")] = None,
) -> None:
    """Gene-gene self-attention maps over the chunk grid, written into the store, plus a PNG."""
    from flows.analyze import attention_flow
    from tera_pipeline.analysis.attention import AnalysisError, parse_pairs
    from tera_pipeline.store import StoreError, group_attrs

    try:
        genes = group_attrs(store_path).get("tera_pipeline", {}).get("genes")
        if not genes:
            raise StoreError(f"{store_path} is not a tera-pipeline store")
        parse_pairs(pairs, genes)
    except (AnalysisError, StoreError, OSError, TeraError) as err:
        _fail(str(err))
    with _flows():
        png = attention_flow(str(store_path), pairs, workers)
    typer.echo(f"attention arrays written to {store_path}; heat map: {png}")


@app.command()
def verify(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A job's store.")],
) -> None:
    """Read back every block the ledger calls done and compare it with its digest; exit 1 and
    name the blocks when any is missing or corrupt."""
    from tera_pipeline.integrity import verify as verify_store
    from tera_pipeline.report import job_of
    from tera_pipeline.store import StoreError

    try:
        job = job_of(store_path)
        damage = verify_store(job)
    except (StoreError, OSError, TeraError) as err:
        _fail(str(err))
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
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A job's store.")],
) -> None:
    """Progress of a running, finished or dead job: blocks done per phase, time, holder, last
    error."""
    from tera_pipeline.status import format_status, job_status
    from tera_pipeline.store import StoreError

    try:
        info = job_status(store_path)
    except (StoreError, OSError, TeraError) as err:
        _fail(str(err))
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
    """Register the Prefect deployments (generate, analyses, pipeline) on a process work pool of
    the server at PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("PREFECT_API_URL is not set: start a server (prefect server start) and point to it")
    from flows.deployments import register

    for full_name in register(pool, name, working_dir, concurrency_limit):
        typer.echo(f"deployment {full_name}")
    typer.echo(f"start a worker where the flows should run: prefect worker start --pool {pool}")


@train_app.command("denoiser")
def train_denoiser_cmd(
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = DEFAULT_DENOISER,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 3000,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brain.")] = 1,
    base_channels: Annotated[int, typer.Option(help="UNet base channels.")] = 16,
    prediction: Annotated[str, typer.Option(help="Model output: 'v' or 'epsilon'.")] = "v",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
) -> None:
    """Train the denoiser on synthetic-brain patches; writes a safetensors checkpoint."""
    import torch

    from models.denoiser import DenoiserConfig
    from tera_pipeline.training import train_denoiser

    torch.set_num_threads(threads)
    cfg = DenoiserConfig(base_channels=base_channels)
    train_denoiser(
        out,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        model_config=cfg,
        prediction=prediction,
        on_log=_echo_log,
    )
    typer.echo(f"wrote {out}")


@analyze_app.command("magnet")
def analyze_magnet_cmd(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="MagNet checkpoint (default: the committed one).")
    ] = None,
    metrics: Annotated[
        bool, typer.Option(help="Compare with the conditioning (cycle consistency).")
    ] = True,
    workers: Annotated[int | None, typer.Option(help="Dask workers.")] = None,
) -> None:
    """Gene expression predicted back from the image (MagNet), on the conditioning's bin grid."""
    from flows.magnet import analyze_magnet
    from models.checkpoint import CheckpointError
    from tera_pipeline.analysis import magnet
    from tera_pipeline.analysis.attention import AnalysisError
    from tera_pipeline.store import StoreError

    try:
        magnet.check(store_path, checkpoint, metrics)
    except (AnalysisError, CheckpointError, StoreError, OSError, TeraError) as err:
        _fail(str(err))
    checkpoint_text = str(checkpoint) if checkpoint else None
    with _flows():
        _echo_magnet(analyze_magnet(str(store_path), workers, checkpoint_text, metrics))


def _echo_magnet(result: dict) -> None:
    typer.echo(f"predicted expression written to {result['store']}/magnet_expression")
    for resolution, m in result.get("cycle_consistency", {}).items():
        typer.echo(
            f"  {resolution} bins vs conditioning: PCC per bin {m['pcc_bin']:.3f}, per gene "
            f"{m['pcc_gene']:.3f}, MSE {m['mse']:.3f}, MAE {m['mae']:.3f} (log1p counts)"
        )
    if "report" in result:
        typer.echo(f"report: {result['report']}")


@train_app.command("magnet")
def train_magnet_cmd(
    out: Annotated[Path | None, typer.Option(help="Checkpoint to write.")] = None,
    kind: Annotated[
        str, typer.Option(help="'magnet', or the baseline 'magnet_bin_cnn' (bin crop alone).")
    ] = "magnet",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch: Annotated[int, typer.Option(help="Windows (8 x 8 bins) per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brains.")] = 1,
    images: Annotated[
        Path | None, typer.Option(help="Your image zarr (c, z, y, x) uint8, or a store.")
    ] = None,
    cells: Annotated[
        Path | None, typer.Option(help="Its cells or transcripts (.h5ad, .parquet, .csv).")
    ] = None,
    spacing: Annotated[str, typer.Option(help="Voxel spacing z,y,x in µm of --images.")] = "4,1,1",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
) -> None:
    """Train MagNet on (image, expression per bin) pairs: synthetic renders, or yours."""
    import torch

    from tera_pipeline.analysis.magnet import DEFAULT_MAGNET
    from tera_pipeline.inputs import InputError
    from tera_pipeline.magnet_training import train_magnet

    torch.set_num_threads(threads)
    data = None
    if (images is None) != (cells is None):
        _fail("--images and --cells go together")
    if images is not None:
        from models.magnet import MagNetConfig
        from tera_pipeline.training import user_training_data

        side = MagNetConfig().region_bins * 16
        spacing_um = _spacing(spacing)
        try:
            train, val = user_training_data(
                images, cells, spacing_um, (1, 16, 16), patch=(1, side, side)
            )
        except (InputError, OSError, ValueError) as err:
            _fail(str(err))
        data = ([train], [val])
    history = train_magnet(
        out or DEFAULT_MAGNET.with_name(f"{kind}.safetensors"),
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        kind=kind,
        data=data,
        on_log=_echo_log,
    )
    typer.echo(f"wrote {out or DEFAULT_MAGNET.with_name(f'{kind}.safetensors')}: {history[-1]}")


# -- SPATIA -------------------------------------------------------------------------------------
def _spatia_errors() -> tuple[type[Exception], ...]:
    from models.checkpoint import CheckpointError
    from tera_pipeline.analysis.cells import CropError
    from tera_pipeline.analysis.perturb import PerturbError
    from tera_pipeline.analysis.spatia import SpatiaError
    from tera_pipeline.inputs import InputError
    from tera_pipeline.store import StoreError

    return (SpatiaError, CropError, PerturbError, CheckpointError, InputError, StoreError, OSError,
            TeraError)  # fmt: skip


def _genes_list(text: str | None) -> list[str]:
    return [g.strip() for g in (text or "").split(",") if g.strip()]


@analyze_app.command("spatia")
def analyze_spatia_cmd(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="SPATIA checkpoint (default: the committed one).")
    ] = None,
    impute: Annotated[
        str | None, typer.Option(help="Genes hidden from the input and imputed: A,B.")
    ] = None,
    block: Annotated[
        str | None, typer.Option(help="Analysis block Z,Y,X (default: the job's, whole niches).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Dask workers.")] = None,
) -> None:
    """SPATIA cell embeddings, types and imputed genes (.h5ad beside STORE) and niche / tissue
    embeddings (arrays in STORE)."""
    from flows.spatia import analyze_spatia
    from tera_pipeline.analysis import spatia

    masked, blk = _genes_list(impute), _triple(block, "--block")
    try:
        spatia.plan(store_path, checkpoint, masked, blk)
    except _spatia_errors() as err:
        _fail(str(err))
    blk_list = list(blk) if blk else None
    with _flows():
        result = analyze_spatia(str(store_path), workers, _str(checkpoint), masked, blk_list)
    _echo_spatia(result)


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def _demo_spatia(store_path: Path, out: Path, workers: int | None) -> None:
    """The demo's SPATIA step: embed the cells of the generated volume, score the predicted
    types against the synthetic truth, and perturb the nucleus-size driver of 8 cells."""
    import anndata

    from flows.spatia import analyze_spatia
    from tera_pipeline.analysis.perturb import perturb_store

    typer.echo("SPATIA: cell embeddings, types and niches from the generated image")
    result = analyze_spatia(str(store_path), workers)
    _echo_spatia(result)
    obs = anndata.read_h5ad(result["h5ad"], backed="r").obs
    if "cell_type" in obs and "predicted_type" in obs:
        agree = (obs["cell_type"].astype(str) == obs["predicted_type"].astype(str)).mean()
        typer.echo(f"  predicted cell types agree with the synthetic truth for {agree:.1%}")
    report = perturb_store(store_path, "Ccnd1=+20", 8, out_dir=out)
    typer.echo(
        f"  perturbation Ccnd1=+20: generated nucleus area "
        f"{report['nucleus_area_before_mean_px']:.0f} -> "
        f"{report['nucleus_area_after_mean_px']:.0f} px, larger in "
        f"{100 * report['nucleus_area_increased']:.0f}% of cells; panel: {report['png']}"
    )


def _echo_spatia(result: dict) -> None:
    typer.echo(
        f"SPATIA: {result['cells']} cells embedded in {result['blocks']} blocks -> "
        f"{result['h5ad']}; niche embeddings ({'x'.join(map(str, result['niches']))} niches) "
        f"in {result['store']}/spatia_niche"
    )


@app.command()
def perturb(
    store_path: Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")],
    genes: Annotated[
        str, typer.Option(help="Changes GENE=VALUE, GENE=xF or GENE=+N, comma-separated.")
    ] = "Ccnd1=+20",
    cells: Annotated[int, typer.Option(help="Random cells of the central block.")] = 8,
    cell_id: Annotated[
        list[int] | None, typer.Option(help="Specific cell ids (repeatable) instead.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Cell choice and generation noise.")] = 0,
    checkpoint: Annotated[Path | None, typer.Option(help="SPATIA checkpoint.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNG and JSON.")] = None,
) -> None:
    """Change named genes of chosen cells, generate each cell before and after (SPATIA's
    generator, same noise), report the morphology change and write a PNG panel."""
    from tera_pipeline.analysis.perturb import perturb_store

    try:
        report = perturb_store(store_path, genes, cells, cell_id or (), checkpoint, seed, out)
    except _spatia_errors() as err:
        _fail(str(err))
    typer.echo(
        f"{', '.join(report['changes'])} on {report['cells_changed']} cells: nucleus area "
        f"{report['nucleus_area_before_mean_px']:.1f} -> "
        f"{report['nucleus_area_after_mean_px']:.1f} px (mean), increased in "
        f"{100 * report['nucleus_area_increased']:.0f}% of cells"
    )
    typer.echo(f"panel: {report['png']}  report: {report['json']}")


@train_app.command("spatia")
def train_spatia_cmd(
    out: Annotated[Path | None, typer.Option(help="Checkpoint to write.")] = None,
    cell_steps: Annotated[int, typer.Option(help="Steps of the cell encoder.")] = 3000,
    context_steps: Annotated[int, typer.Option(help="Steps of the niche transformer.")] = 300,
    generator_steps: Annotated[int, typer.Option(help="Steps of the generator.")] = 1500,
    batch: Annotated[int, typer.Option(help="Cells per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic training brain.")] = 1,
    crop: Annotated[str, typer.Option(help="Crop Z,Y,X voxels (Z > 1: 3-D crops).")] = "1,32,32",
    images: Annotated[
        Path | None, typer.Option(help="Your image zarr (c, z, y, x) uint8, or a store.")
    ] = None,
    cells: Annotated[Path | None, typer.Option(help="Its cell table (.h5ad, cell .csv).")] = None,
    spacing: Annotated[str, typer.Option(help="Voxel spacing z,y,x in µm of --images.")] = "4,1,1",
    type_key: Annotated[
        str, typer.Option(help="obs / column with cell types in --cells, if any.")
    ] = "cell_type",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
) -> None:
    """Train SPATIA on cells with crops: the synthetic brain, or your images and cells."""
    import numpy as np
    import torch

    from models.spatia import DEFAULT_SPATIA, SpatiaConfig
    from tera_pipeline.spatia_training import train_spatia, user_cells

    torch.set_num_threads(threads)
    cfg = SpatiaConfig(crop=_triple(crop, "--crop"))
    data = None
    if (images is None) != (cells is None):
        _fail("--images and --cells go together")
    if images is not None:
        spacing_um = _spacing(spacing)
        try:
            every = user_cells(images, cells, spacing_um, cfg.crop, type_key=type_key)
        except _spatia_errors() as err:
            _fail(str(err))
        order = np.random.default_rng(seed).permutation(len(every))
        cut = max(1, len(every) // 10)
        data = (every.subset(order[cut:]), every.subset(order[:cut]))
    target = out or DEFAULT_SPATIA
    history = train_spatia(
        target,
        model_config=cfg,
        cell_steps=cell_steps,
        context_steps=context_steps,
        generator_steps=generator_steps,
        batch=batch,
        lr=lr,
        seed=seed,
        data=data,
        on_log=_echo_log,
    )
    typer.echo(f"wrote {target}: {history[-1]}")


if __name__ == "__main__":
    app()
