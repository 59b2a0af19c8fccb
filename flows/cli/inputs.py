"""``tera inspect``: what an input file holds, before a job is run on it; ``tera import-images``:
microscope images into the array training and the analyses read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    ModelCheckpoint,
    app,
    parse_spacing,
    refusing,
    transcript_options,
)


@app.command()
@transcript_options
def inspect(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="A cell or transcript table.")],
    checkpoint: ModelCheckpoint = None,
    spacing: Annotated[str, typer.Option(help="Voxel spacing Z,Y,X in µm.")] = "4,1,1",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    transcripts: dict | None = None,
) -> None:
    """Detected format, units, extent in µm, genes (and the checkpoint's panel among them),
    rows kept and dropped, cells, and the volume the input fills; read out of core."""
    from pydantic import ValidationError

    from models.checkpoint_files import DEFAULT_DENOISER, read_metadata
    from tera_pipeline.core.transcript_spec import TranscriptSpec
    from tera_pipeline.inputs.inspection import inspect_input, summary_lines

    values = {k.rsplit(".", 1)[1]: v for k, v in (transcripts or {}).items() if v is not None}
    with refusing(str(path)):
        try:
            spec = TranscriptSpec(**values)
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"]) from None
        panel = read_metadata(checkpoint or DEFAULT_DENOISER).get("genes")
        info = inspect_input(path, spec, panel, parse_spacing(spacing))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        for line in summary_lines(info):
            typer.echo(line)


@app.command("import-images")
def import_images_cmd(
    path: Annotated[
        Path, typer.Argument(metavar="IMAGES", help="An OME-TIFF, or a MERSCOPE output folder.")
    ],
    out: Annotated[Path, typer.Option(help="The (c, z, y, x) uint8 zarr array to write.")],
    channels: Annotated[
        str | None, typer.Option(help="Channels to keep, comma-separated (default: all).")
    ] = None,
    z_step: Annotated[
        float | None, typer.Option(help="µm between z planes, where the files do not say.")
    ] = None,
    downsample: Annotated[int, typer.Option(help="Average N x N pixels in-plane.")] = 1,
) -> None:
    """Read OME-TIFF or MERSCOPE mosaics a plane at a time into a (c, z, y, x) uint8 zarr array,
    with the µm spacing and origin from the files' metadata (``--images`` of ``tera train``)."""
    from tera_pipeline.inputs.images import import_images, open_images

    with refusing(str(path)):
        source = open_images(path, z_step)
        typer.echo(source.describe())
        chosen = channels.split(",") if channels else None
        written = import_images(source, out, chosen, downsample)
    z, y, x = written["spacing_um"]
    origin = tuple(round(v, 3) for v in written["origin_um"])
    typer.echo(
        f"wrote {written['out']}: {' x '.join(map(str, written['shape']))} (c, z, y, x) uint8, "
        f"{z:g} x {y:g} x {x:g} µm voxels, origin {origin} µm; intensity windows "
        f"{written['intensity_window']}"
    )
