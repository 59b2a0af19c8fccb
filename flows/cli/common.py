"""The ``tera`` command's app, its command groups, and what every command shares: parsing of
Z,Y,X options, one-line refusals, logging, the Prefect API server for commands that run flows."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from models.checkpoint_files import CheckpointError
from tera_pipeline.core.errors import TeraError

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Generate brain volumes under gene conditioning, analyse them, train the models.",
)
train_app = typer.Typer(no_args_is_help=True, help="Train the project's models.")
app.add_typer(train_app, name="train")
# Options and arguments several commands share, written once.
GeneratedStore = Annotated[Path, typer.Argument(metavar="STORE", help="A generated store.")]
JobStore = Annotated[Path, typer.Argument(metavar="STORE", help="A job's store.")]
Workers = Annotated[int | None, typer.Option(help="Dask workers (default: one per GPU or core).")]
ModelCheckpoint = Annotated[
    Path | None, typer.Option(help="Model checkpoint (default: the committed one).")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]
TableFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Transcript table layout: xenium, merscope, cosmx, spatialdata or table "
        "(default: detected).",
    ),
]
Units = Annotated[
    str | None, typer.Option(help="Units of x, y: um, mm or px (default: the layout's).")
]
PixelSize = Annotated[float | None, typer.Option(help="µm per pixel, for px units.")]
ZStep = Annotated[
    float | None, typer.Option(help="µm between z planes (MERSCOPE, CosMx z are plane indices).")
]
MinQv = Annotated[float | None, typer.Option(help="Drop transcripts below this qv (Xenium: 20).")]
KeepControls = Annotated[bool, typer.Option(help="Keep control, blank and unassigned codewords.")]


TRANSCRIPT_OPTIONS: dict[str, tuple[object, object, str]] = {
    "table_format": (TableFormat, None, "format"), "units": (Units, None, "units"),
    "pixel_size": (PixelSize, None, "pixel_size_um"), "z_step": (ZStep, None, "z_step_um"),
    "min_qv": (MinQv, None, "min_qv"), "keep_controls": (KeepControls, False, "keep_controls"),
}  # fmt: skip
"""The transcript-table options: parameter -> (annotation, default, ``TranscriptSpec`` field)."""


def transcript_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the transcript-table options; it receives them as ``transcripts``, the
    ``conditioning.transcripts`` overrides they set (dotted keys; unset ones None)."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "transcripts"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
        for name, (a, d, _) in TRANSCRIPT_OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_options(*args: object, **kwargs: object) -> None:
        values = {n: kwargs.pop(n) for n in TRANSCRIPT_OPTIONS}
        values["keep_controls"] = values["keep_controls"] or None  # unset unless given
        overrides = {
            f"conditioning.transcripts.{TRANSCRIPT_OPTIONS[n][2]}": v for n, v in values.items()
        }
        return command(*args, transcripts=overrides, **kwargs)

    with_options.__signature__ = signature.replace(parameters=params + extra)  # type: ignore[attr-defined]
    with_options.__annotations__ = {p.name: p.annotation for p in params + extra}
    return with_options


Lattice = Annotated[
    str | None,
    typer.Option(
        help="Patch lattice: wrapped (the default: stride = patch, moved by voxels at every "
        "step, the volume's opposite faces meeting so the patch across a face is one patch), "
        "shifted (the same, one more patch per axis at the faces; the default before), "
        "bin-shifted (moved by whole gene bins), z-shifted (the default of 2026-12-02: "
        "overlapped in-plane, moved in z) or overlapped (the default before: stride half the "
        "patch on every axis). Stores written with another keep theirs on --resume."
    ),
]
CheckpointOut = Annotated[Path | None, typer.Option(help="Checkpoint to write.")]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate.")]
TrainingSteps = Annotated[int, typer.Option(help="Optimiser steps.")]
Batch = Annotated[int, typer.Option(help="Samples per step (patches, windows or cells).")]
Seed = Annotated[int, typer.Option(help="Seed of the weights and the synthetic training data.")]
Threads = Annotated[int, typer.Option(help="torch threads.")]
UserImages = Annotated[
    Path | None, typer.Option(help="Your image zarr (c, z, y, x) uint8, or a store.")
]
Spacing = Annotated[
    str | None,
    typer.Option(
        help="Voxel spacing z,y,x in µm of --images (default: what tera import-images recorded, "
        "else 4,1,1)."
    ),
]

analyze_app = typer.Typer(no_args_is_help=True, help="Downstream analyses of a generated store.")
app.add_typer(analyze_app, name="analyze")


def _three(text: str, what: str, kind: type, unit: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter(f"{what} must be three {unit}, got {text!r}")
    return values


def triple(text: str | None, what: str) -> tuple[int, int, int] | None:
    """Three integers Z,Y,X (an option left out stays None)."""
    return None if text is None else _three(text, what, int, "integers Z,Y,X")


def parse_spacing(text: str) -> tuple[float, float, float]:
    """A Z,Y,X voxel spacing in µm."""
    return _three(text, "--spacing", float, "numbers Z,Y,X in µm")


def user_data_spacing(images: Path | None, cells: Path | None, spacing: str | None):
    """For training on a user's data: the spacing of ``--images``: given, or as ``tera
    import-images`` recorded it, else 4,1,1 µm (None when neither ``--images`` nor ``--cells`` is
    given; a refusal when only one is)."""
    from tera_pipeline.inputs.images import recorded_spacing

    if (images is None) != (cells is None):
        fail("--images and --cells go together")
    if images is None:
        return None
    if spacing is None:
        return recorded_spacing(images) or (4.0, 1.0, 1.0)
    return parse_spacing(spacing)


def echo_log(entry: dict) -> None:
    """A training log entry as one JSON line, flushed (for tailing a long run)."""
    typer.echo(json.dumps(entry))
    sys.stdout.flush()


def fail(message: str) -> None:
    typer.secho(f"error: {' '.join(str(message).splitlines())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("tera_pipeline").setLevel(logging.INFO)


@contextmanager
def running_flows():
    """Where a command runs Prefect flows: the API server (retried if it does not come up;
    one line if it never does)."""
    from flows.api_server import ApiServerError, prefect_api

    try:
        with prefect_api():
            yield
    except ApiServerError as err:
        fail(str(err))


def one_line(err: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        return f"invalid config{' ' + where if where else ''}: {e['msg']}"
    return str(err)


REFUSALS: tuple[type[Exception], ...] = (TeraError, OSError, CheckpointError)
"""What a command reports as one ``error:`` line (exit 2) instead of a traceback: every refusal of
the project (``TeraError``), a checkpoint that does not load, a file that cannot be read."""


@contextmanager
def refusing(context: str = ""):
    """The one handler of refusals: ``error: <message>`` on one line, exit 2. The project's own
    refusals name what and where; a foreign one (a file, a checkpoint) gets ``context`` first."""
    try:
        yield
    except REFUSALS as err:
        fail(str(err) if isinstance(err, TeraError) or not context else f"{context}: {err}")
