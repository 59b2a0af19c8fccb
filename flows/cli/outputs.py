"""``tera export``: a finished store in a format older readers open."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import GeneratedStore, app, fail, refusing


@app.command()
def export(
    store_path: GeneratedStore,
    out: Annotated[Path, typer.Option(help="The copy to write: a new or empty folder.")],
    export_format: Annotated[
        str, typer.Option("--format", help="ome-zarr-0.4: unsharded zarr v2, OME-Zarr 0.4.")
    ] = "ome-zarr-0.4",
    threads: Annotated[int, typer.Option(min=1, help="Shards copied at once.")] = 4,
) -> None:
    """Copy a finished store, shard by shard, as an unsharded zarr v2 OME-Zarr 0.4 image with
    its pyramid (levels 0/image, 1/image, ...) and per-bin arrays, for Fiji/BigDataViewer
    (n5-zarr), older napari readers and xarray's open_datatree."""
    from tera_pipeline.runtime.progress import BlockProgress
    from tera_pipeline.storage.export import FORMAT, check_dest, check_source, export_ome_zarr_04

    if export_format != FORMAT:
        fail(f"--format must be {FORMAT}, got {export_format!r}")
    with refusing(str(store_path)):
        check_source(store_path)  # refusals first, without a progress bar
        check_dest(out, store_path)
        with BlockProgress() as progress:
            written = export_ome_zarr_04(store_path, out, progress, threads)
    levels = ", ".join(f"{p} {'x'.join(map(str, s))}" for p, s in written["levels"].items())
    bins = f"; bins/{', bins/'.join(written['bins'])}" if written["bins"] else ""
    typer.echo(f"wrote {out} ({FORMAT}, zarr v2): {levels}{bins}")
