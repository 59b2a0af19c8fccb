"""``tera view``: a generated store served on loopback (byte ranges, CORS, no way out of the
folder) and the neuroglancer state it prints, decoded from the link; the state builder as a pure
function of a store's metadata, with and without OME-Zarr label images."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import pyramid
from tera_pipeline.storage import neuroglancer, serve
from tera_pipeline.storage.serve import Unsatisfiable, byte_range

SPACING = (2.0, 0.5, 0.5)


@pytest.fixture(scope="module")
def view_store(tmp_path_factory, tiny_checkpoint, client) -> JobConfig:
    """A generated 8 x 128 x 64 volume (blocks 4 x 32 x 32, one step) with one pyramid level."""
    from tera_pipeline.generation import lifecycle

    home = tmp_path_factory.mktemp("home")
    job = JobConfig.model_validate(
        {
            "out": str(tmp_path_factory.mktemp("view") / "v.zarr"),
            "volume": {"shape": (8, 128, 64), "spacing_um": SPACING, "origin_um": (0, 10, -4)},
            "storage": {"block": (4, 32, 32)},
            "diffusion": {"steps": 1, "seed": 3},
            "checkpoint": str(tiny_checkpoint),
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.chdir(home)
        lifecycle.generate(job, client)
    return job


def _tera(*args: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"HOME": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _lines(proc: subprocess.Popen, wanted: int, timeout: float = 60.0) -> list[str]:
    """The first ``wanted`` lines of stdout, waiting at most ``timeout`` seconds."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    out, deadline = [], time.monotonic() + timeout
    while len(out) < wanted:
        try:
            out.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"tera view printed {out} in {timeout} s; stderr: {proc.stderr.read()}")
    return out


def _get(port: int, path: str, method: str = "GET", **headers: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_view_serves_the_store_and_prints_its_neuroglancer_state(view_store, tmp_path):
    root = Path(view_store.out)
    (root.parent / "secret.txt").write_text("not to be served")
    proc = _tera("view", str(root), "--port", "0", cwd=tmp_path)
    try:
        lines = _lines(proc, 4)
        port = int(lines[0].split("http://127.0.0.1:")[1].split("/")[0])
        link = next(x.split(": ", 1)[1] for x in lines if x.startswith("neuroglancer: "))
        assert link.startswith(neuroglancer.PUBLIC_CLIENT + "#!")
        assert lines[3].strip() == f"napari: napari --plugin napari-ome-zarr {root.resolve()}"
        state = neuroglancer.state_from_url(link.strip())
        assert list(state["dimensions"]) == ["x", "y", "z"]
        assert state["dimensions"] == {"x": [5e-07, "m"], "y": [5e-07, "m"], "z": [2e-06, "m"]}
        ome = json.loads((root / "zarr.json").read_text())["attributes"]["ome"]
        channels = ome["omero"]["channels"]
        images = [layer for layer in state["layers"] if layer["type"] == "image"]
        assert [layer["name"] for layer in images] == list(view_store.volume.stains)
        for i, (layer, channel) in enumerate(zip(images, channels, strict=True)):
            assert layer["source"] == f"zarr3://http://127.0.0.1:{port}/"
            assert layer["localDimensions"] == {"c'": [1, ""]}
            assert layer["localPosition"] == [i]  # channel i (OME translations are centres)
            controls = layer["shaderControls"]
            assert controls["color"] == "#" + channel["color"].lower()
            window = channel["window"]
            assert controls["contrast"] == {
                "range": [window["start"], window["end"]], "window": [window["min"], window["max"]]
            }  # fmt: skip
        assert not [layer for layer in state["layers"] if layer["type"] != "image"]

        shard = next(p for p in sorted((root / "image" / "c").rglob("*")) if p.is_file())
        data, key = shard.read_bytes(), "/" + shard.relative_to(root).as_posix()
        size = len(data)
        response, body = _get(port, key, Range="bytes=-100")  # the shard index
        assert response.status == 206 and body == data[-100:]
        assert response.getheader("Content-Range") == f"bytes {size - 100}-{size - 1}/{size}"
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert "Content-Range" in response.getheader("Access-Control-Expose-Headers")
        response, body = _get(port, key, Range="bytes=3-9")
        assert (response.status, body) == (206, data[3:10])
        response, body = _get(port, key, Range=f"bytes={size - 5}-")
        assert (response.status, body) == (206, data[-5:])
        response, _ = _get(port, key, Range=f"bytes={size}-")
        assert response.status == 416 and response.getheader("Content-Range") == f"bytes */{size}"
        response, body = _get(port, key, "HEAD")
        assert (response.status, body, response.getheader("Content-Length")) == (
            200,
            b"",
            str(size),
        )
        response, body = _get(port, "/zarr.json")
        assert response.status == 200 and json.loads(body)["attributes"]["ome"] == ome
        response, _ = _get(port, key, "OPTIONS", Origin="https://x.org",
                           **{"Access-Control-Request-Headers": "range",
                              "Access-Control-Request-Private-Network": "true"})  # fmt: skip
        assert response.status == 204
        assert response.getheader("Access-Control-Allow-Headers") == "range"
        assert response.getheader("Access-Control-Allow-Private-Network") == "true"
        for escape in ("/../secret.txt", "/image/../../secret.txt", "/%2e%2e/secret.txt"):
            response, body = _get(port, escape)
            assert response.status == 403 and b"not to be served" not in body
        assert _get(port, "/no/such/file")[0].status == 404
        assert _get(port, key, "PUT")[0].status == 501  # read-only
        if "offline" in lines[2] and "http://" in lines[2]:  # neuroglancer's client is installed
            response, body = _get(port, "/neuroglancer/v/tera/")
            assert response.status == 200 and b"<html" in body
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a normal stop
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_folder_that_is_not_a_store_is_refused_in_one_line(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)  # zarr, but no OME metadata
    for target, says in ((plain, "no OME-Zarr"), (tmp_path, "no zarr.json")):
        proc = _tera("view", str(target), cwd=tmp_path)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 2
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err


def _metadata_store(root: Path, labels: bool) -> JobConfig:
    """A store's metadata as the pipeline writes it (tiny arrays), with a label image if asked."""
    job = JobConfig.model_validate(
        {"out": str(root), "volume": {"shape": (8, 64, 64), "spacing_um": (4, 1, 1),
                                      "stains": ("DAPI", "PolyT", "NeuN")}}
    )  # fmt: skip
    levels = pyramid.plan_levels(job)
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    group.attrs["ome"] = pyramid.ome_metadata(job, levels)
    group.create_array("image", shape=(3, 8, 64, 64), dtype="uint8")
    if labels:
        multiscale = {
            "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [4.0, 1.0, 1.0]}]}],
        }  # fmt: skip
        cells = group.create_group("labels").create_group("cells")
        group["labels"].attrs["ome"] = {"version": "0.5", "labels": ["cells"]}
        cells.attrs["ome"] = {
            "version": "0.5", "multiscales": [multiscale],
            "image-label": {"colors": [{"label-value": 1, "rgba": [255, 0, 128, 255]}]},
        }  # fmt: skip
        cells.create_array("0", shape=(8, 64, 64), dtype="uint32")[:] = np.arange(
            8 * 64 * 64, dtype=np.uint32
        ).reshape(8, 64, 64)
    return job


@pytest.mark.parametrize("labels", [False, True])
def test_the_state_shows_each_stain_and_each_label_image(tmp_path, labels):
    job = _metadata_store(tmp_path / "m.zarr", labels)
    image, label_images = neuroglancer.read_metadata(tmp_path / "m.zarr")
    state = neuroglancer.viewer_state(image, label_images, "http://127.0.0.1:1234/")
    assert state["dimensions"] == {"x": [1e-06, "m"], "y": [1e-06, "m"], "z": [4e-06, "m"]}
    assert state["position"] == [32, 32, 4]  # the middle of the volume, in voxels
    names = [(layer["type"], layer["name"]) for layer in state["layers"]]
    expected = [("image", s) for s in job.volume.stains]
    assert names == expected + ([("segmentation", "cells (labels)")] if labels else [])
    colours = [layer["shaderControls"]["color"] for layer in state["layers"][:3]]
    assert colours == ["#0000ff", "#00ff00", "#ff0000"]
    assert [layer["localPosition"] for layer in state["layers"][:3]] == [[0], [1], [2]]
    assert '#uicontrol vec3 color color(default="#00ff00")' in state["layers"][1]["shader"]
    if labels:
        segmentation = state["layers"][3]
        assert segmentation["source"] == "zarr3://http://127.0.0.1:1234/labels/cells/"
        assert segmentation["segmentColors"] == {"1": "#ff0080"}
        assert "localDimensions" not in segmentation  # no channel axis
    link = neuroglancer.state_url(state, "http://127.0.0.1:1234/neuroglancer/v/tera/")
    assert " " not in link and neuroglancer.state_from_url(link) == state


def test_the_state_is_valid_for_neuroglancers_own_state_classes(tmp_path):
    ng = pytest.importorskip("neuroglancer")
    _metadata_store(tmp_path / "m.zarr", labels=True)
    state = neuroglancer.viewer_state(
        *neuroglancer.read_metadata(tmp_path / "m.zarr"), "http://127.0.0.1:1234/"
    )
    parsed = ng.ViewerState(state)
    assert list(parsed.dimensions.names) == ["x", "y", "z"]
    assert [layer.type for layer in parsed.layers] == ["image"] * 3 + ["segmentation"]
    assert parsed.layers["NeuN"].local_position.tolist() == [2]
    assert parsed.layers["PolyT"].shader_controls["contrast"].range.tolist() == [0, 255]


@pytest.mark.parametrize(
    ("header", "expected"),
    [("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)),
     ("bytes=-500", (0, 99)), ("bytes=90-500", (90, 99)), (None, None), ("bytes=0-1,4-5", None),
     ("items=0-1", None), ("bytes=9-2", None)],
)  # fmt: skip
def test_byte_ranges(header, expected):
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_byte_ranges(header):
    with pytest.raises(Unsatisfiable):
        byte_range(header, 100)


def test_links_out_of_the_store_are_refused_and_the_server_stops_when_asked(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "store" / "inside.txt").write_text("ok")
    (tmp_path / "store" / "link.txt").symlink_to(tmp_path / "outside.txt")
    server = serve.serve(tmp_path / "store")
    port = server.server_address[1]
    try:
        assert _get(port, "/inside.txt")[1] == b"ok"
        assert _get(port, "/link.txt")[0].status == 403
        assert _get(port, "/")[0].status == 404  # no listings
    finally:
        waiter = threading.Thread(target=serve.wait, args=(server,))
        waiter.start()
        server.closing.set()  # what the CLI's SIGTERM handler does
        waiter.join(timeout=10)
    assert not waiter.is_alive()
    with pytest.raises(OSError):
        _get(port, "/inside.txt")
