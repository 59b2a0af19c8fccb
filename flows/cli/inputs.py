"""``tera inspect``: what an input file holds, before a job is run on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    KeepControls,
    MinQv,
    ModelCheckpoint,
    PixelSize,
    TableFormat,
    Units,
    ZStep,
    app,
    parse_spacing,
    refusing,
    transcript_overrides,
)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="A cell or transcript table.")],
    # the transcript-table options of `generate` and `inspect` (typer declares them per command)
    table_format: TableFormat = None,
    units: Units = None,
    pixel_size: PixelSize = None,
    z_step: ZStep = None,
    min_qv: MinQv = None,
    keep_controls: KeepControls = False,
    checkpoint: ModelCheckpoint = None,
    spacing: Annotated[str, typer.Option(help="Voxel spacing Z,Y,X in µm.")] = "4,1,1",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Detected format, units, extent in µm, genes (and the checkpoint's panel among them),
    rows kept and dropped, cells, and the volume the input fills; read out of core."""
    from pydantic import ValidationError

    from models.checkpoint_files import DEFAULT_DENOISER, read_metadata
    from tera_pipeline.core.transcript_spec import TranscriptSpec
    from tera_pipeline.inputs.inspection import inspect_input, summary_lines

    fields = transcript_overrides(table_format, units, pixel_size, z_step, min_qv, keep_controls)
    values = {k.rsplit(".", 1)[1]: v for k, v in fields.items() if v is not None}
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
