"""``tera view``: a store served read-only on loopback, with a neuroglancer link and the napari
command that open it."""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import Annotated

import typer

from flows.cli.common import GeneratedStore, app, refusing

CLIENT = "/neuroglancer/v/tera/"
"""Where neuroglancer's bundled client is served (its build expects a ``/v/<token>/`` path)."""
CLIENT_EVENTS = "/neuroglancer/events/"
"""The bundled client's subscription to its Python server, answered by a silent stream."""


@app.command()
def view(
    store_path: GeneratedStore,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (default: a free one).")] = 0,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the neuroglancer link in a browser.")
    ] = False,
    seconds: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: at Ctrl-C).")
    ] = None,
) -> None:
    """Serve the store read-only on 127.0.0.1 (byte ranges, CORS) and print a neuroglancer link
    (x, y, z in µm, a layer per stain in its OMERO colour and window, a segmentation layer per
    label image) and the napari command; runs until Ctrl-C."""
    import signal
    import webbrowser

    from tera_pipeline.core.errors import TeraError
    from tera_pipeline.storage import neuroglancer, serve

    root = store_path.resolve()
    with refusing(str(store_path)):
        image, labels = neuroglancer.read_metadata(root)
        client = neuroglancer.bundled_client()
        extra = (serve.Mount(CLIENT, client, "index.html"),) if client else ()
        try:
            server = serve.serve(root, port, extra, (CLIENT_EVENTS,) if client else ())
        except OSError as err:
            raise TeraError(f"cannot serve on 127.0.0.1:{port}: {err.strerror or err}") from None
    state = neuroglancer.viewer_state(image, labels, server.url)
    public = neuroglancer.state_url(state)
    local = neuroglancer.state_url(state, server.url.rstrip("/") + CLIENT) if client else None
    lines = [
        f"serving {root} read-only at {server.url} (Ctrl-C stops)",
        f"neuroglancer: {public}",
        f"neuroglancer, offline (the neuroglancer package's client): {local}"
        if local
        else "neuroglancer, offline: pip install neuroglancer, then serve again",
        f"napari: napari --plugin napari-ome-zarr {shlex.quote(str(root))}",
    ]
    typer.echo("\n".join(lines))
    sys.stdout.flush()
    if open_browser:
        webbrowser.open(local or public)
    signal.signal(signal.SIGTERM, lambda *_: server.closing.set())
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a normal stop
        serve.wait(server, seconds)
    counts = ", ".join(f"{n} x {code}" for code, n in sorted(server.answered.items()))
    typer.echo(f"stopped; requests answered: {counts or 'none'}")
