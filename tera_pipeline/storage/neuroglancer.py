"""A neuroglancer viewer state for an OME-Zarr 0.5 store served over HTTP: pure functions of the
store's metadata (``read_metadata`` gathers it from the files).

The state shows the global dimensions x, y, z (in that order, metres, the finest level's voxel
spacing); one image layer per channel (stain), each reading the root multiscale as
``zarr3://<url>`` and picking its channel through the layer's local position on neuroglancer's
local channel dimension ``c'`` (what neuroglancer names an OME axis of type channel), coloured
and contrast-limited from the channel's OMERO ``color`` and ``window`` through shader controls,
blended additively; one segmentation layer per label image listed under ``labels/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from tera_pipeline.core.errors import TeraError
from tera_pipeline.storage.store import StoreError, read_meta

PUBLIC_CLIENT = "https://neuroglancer-demo.appspot.com/"
"""The public neuroglancer client (Google's demo deployment)."""
PER_METRE = {"nanometer": 1e9, "micrometer": 1e6, "millimeter": 1e3, "meter": 1.0}
"""OME space units per metre (the unit the store writes and its neighbours)."""
SHADER = """#uicontrol vec3 color color(default="{color}")
#uicontrol invlerp contrast(range=[{start}, {end}], window=[{low}, {high}])
void main() {{
  emitRGB(color * contrast());
}}
"""
"""Per channel: its colour times its intensity, mapped 0..1 over the window start..end."""
_SAFE = "~@$&()*!+=:;,.?/'"
"""Characters left unquoted in a state URL (the neuroglancer Python package's, less ``#``)."""


class NotViewable(TeraError):
    """A folder that is not an OME-Zarr 0.5 store (no zarr.json, no multiscales)."""


@dataclass(frozen=True)
class Multiscale:
    """One OME multiscale image: its group (relative to the store, "" for the root), axes
    (name, type, unit), level-0 scale, translation and shape, and OMERO channels."""

    group: str
    axes: tuple[tuple[str, str, str], ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    shape: tuple[int, ...]
    channels: tuple[dict[str, Any], ...] = ()
    label_colors: dict[int, str] = field(default_factory=dict)


def _read(path: Path) -> dict:
    """A node's zarr.json (the store's reader; its refusal as this module's)."""
    try:
        return read_meta(path)
    except StoreError as err:
        raise NotViewable(str(err)) from None


def _multiscale(root: Path, group: str) -> Multiscale:
    """The first multiscale of the group at ``root/group`` (a one-line refusal if it has none)."""
    where = root / group if group else root
    ome = _read(where / "zarr.json").get("attributes", {}).get("ome")
    if not isinstance(ome, dict) or not ome.get("multiscales"):
        raise NotViewable(
            f"{where} has no OME-Zarr 0.5 multiscales metadata (not a finished tera-pipeline "
            "store? it is written after the last step)"
        )
    try:
        ms = ome["multiscales"][0]
        dataset = ms["datasets"][0]
        transforms = {t["type"]: t for t in dataset.get("coordinateTransformations", [])}
        axes = tuple(
            (a["name"], a.get("type", ""), a.get("unit", "")) for a in ms["axes"]
        )  # fmt: skip
        scale = tuple(map(float, transforms.get("scale", {}).get("scale", [1.0] * len(axes))))
        translation = transforms.get("translation", {}).get("translation", [0.0] * len(axes))
        shape = tuple(_read(where / dataset["path"] / "zarr.json")["shape"])
        channels = tuple(ome.get("omero", {}).get("channels", ()))
        colors = ome.get("image-label", {}).get("colors", ())
        label_colors = {int(c["label-value"]): _hex(c["rgba"][:3]) for c in colors if "rgba" in c}
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise NotViewable(f"{where}: malformed OME-Zarr metadata ({err!r})") from None
    if not len(axes) == len(scale) == len(translation) == len(shape):
        raise NotViewable(f"{where}: axes, scale, translation and shape differ in length")
    return Multiscale(group, axes, scale, tuple(map(float, translation)), shape, channels,
                      label_colors)  # fmt: skip


def _hex(rgb: list[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def read_metadata(root: Path) -> tuple[Multiscale, list[Multiscale]]:
    """The store's image multiscale and its label images (``labels/`` with the OME ``labels``
    list; none when the group is absent)."""
    root = Path(root)
    if not root.is_dir():
        raise NotViewable(f"{root} is not a folder")
    image = _multiscale(root, "")
    labels_meta = root / "labels" / "zarr.json"
    if not labels_meta.is_file():
        return image, []
    names = _read(labels_meta).get("attributes", {}).get("ome", {}).get("labels", [])
    if any(not isinstance(n, str) or n in ("", ".", "..") or "/" in n for n in names):
        raise NotViewable(f"{labels_meta}: label names must be folder names, got {names}")
    return image, [_multiscale(root, f"labels/{name}") for name in names]


def _color(channel: dict[str, Any], index: int) -> str:
    color = str(channel.get("color", "")).lstrip("#")
    if len(color) == 6:
        return f"#{color.lower()}"
    return ("#0000ff", "#00ff00", "#ff0000", "#ffffff")[index % 4]


def _image_layer(source: str, channel: dict[str, Any], index: int, c_axis: str | None) -> dict:
    window = channel.get("window", {})
    low, high = window.get("min", 0), window.get("max", 255)
    start, end = window.get("start", low), window.get("end", high)
    color = _color(channel, index)
    picked = (
        {} if c_axis is None else {"localDimensions": {c_axis: [1, ""]}, "localPosition": [index]}
    )
    return {
        "type": "image",
        "name": str(channel.get("label", f"channel {index}")),
        "source": source,
        **picked,
        "shader": SHADER.format(color=color, start=start, end=end, low=low, high=high),
        "shaderControls": {
            "color": color,
            "contrast": {"range": [start, end], "window": [low, high]},
        },
        "blend": "additive",
        "opacity": 1.0,
        "visible": bool(channel.get("active", True)),
    }


def _dimension(scale: float, unit: str) -> list:
    """A neuroglancer dimension: [scale, "m"] for a length, else [scale, ""]."""
    return [scale / PER_METRE[unit], "m"] if unit in PER_METRE else [scale, ""]


def _channel_axis(ms: Multiscale) -> str | None:
    """Neuroglancer's name of the multiscale's channel axis (primed: a local dimension)."""
    return next((f"{name}'" for name, kind, _ in ms.axes if kind == "channel"), None)


def viewer_state(image: Multiscale, labels: list[Multiscale], base_url: str) -> dict:
    """The neuroglancer state of the store served at ``base_url`` (ending in ``/``)."""
    space = {
        name: (unit, s, t, n)
        for (name, kind, unit), s, t, n in zip(
            image.axes, image.scale, image.translation, image.shape
        )
        if kind != "channel"
    }
    order = [a for a in "xyz" if a in space] + [a for a in space if a not in "xyz"]
    dims = {a: _dimension(space[a][1], space[a][0]) for a in order}
    # global coordinates count voxels of level 0; neuroglancer takes an OME translation t as the
    # centre of voxel 0, so voxel i spans t / s + i -+ 1/2 (and channel i is at local position i)
    position = [space[a][2] / space[a][1] - 0.5 + space[a][3] / 2 for a in order]
    plane = [space[a][3] for a in order if a in "xy"] or [1]
    source = f"zarr3://{base_url}"
    c_axis = _channel_axis(image)
    if c_axis is None:
        channel = image.channels[0] if image.channels else {"label": "image"}
        layers = [_image_layer(source, channel, 0, None)]
    else:
        count = next(n for (_, kind, _), n in zip(image.axes, image.shape) if kind == "channel")
        channels = list(image.channels[:count])
        channels += [{} for _ in range(count - len(channels))]
        layers = [_image_layer(source, ch, i, c_axis) for i, ch in enumerate(channels)]
    for label in labels:
        layer: dict[str, Any] = {
            "type": "segmentation",
            "name": f"{label.group.rsplit('/', 1)[-1]} (labels)",
            "source": f"{source}{label.group}/",
        }
        if label.label_colors:
            layer["segmentColors"] = {str(k): v for k, v in label.label_colors.items()}
        if (axis := _channel_axis(label)) is not None:
            layer |= {"localDimensions": {axis: [1, ""]}, "localPosition": [0]}
        layers.append(layer)
    return {
        "dimensions": dims,
        "position": position,
        "crossSectionScale": max(max(plane) / 300, 1e-3),  # y-x extent over ~300 px
        "projectionScale": max(max(plane) * 1.5, 1.0),
        "layers": layers,
        "selectedLayer": {"layer": layers[0]["name"]},
        "layout": "4panel",
    }


def state_url(state: dict, client: str = PUBLIC_CLIENT) -> str:
    """A link that opens ``state`` in the neuroglancer client at ``client``."""
    return f"{client}#!{quote(json.dumps(state, separators=(',', ':')), safe=_SAFE)}"


def state_from_url(url: str) -> dict:
    """The state a neuroglancer link carries after ``#!``."""
    return json.loads(unquote(url.split("#!", 1)[1]))


def bundled_client() -> Path | None:
    """The static neuroglancer client the neuroglancer Python package ships, if installed (found
    without importing the package)."""
    from importlib.util import find_spec

    spec = find_spec("neuroglancer")
    if spec is None or not spec.origin:
        return None
    client = Path(spec.origin).parent / "static" / "client"
    return client if (client / "index.html").is_file() else None
