"""Real data that ships inside packages, fetched as wheels from the package registry and read as
it is: bento-tools' 10x Xenium crop (a SpatialData store, BSD-2-Clause, bento-tools 2.1.4.post2),
inspected, then generated from, with the conditioning equal to an independent count; stardist's
3-D nuclei image and its instance mask (BSD-3-Clause, stardist 0.9.2), its nuclei the cells of a
generation (``benchmarks/stardist_nuclei.py`` trains on the image and measures the result)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.transcript_spec import TranscriptSpec
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs.inspection import inspect_input
from tera_pipeline.storage import layout, store

from .conditioning_counts import binned_counts
from .conftest import write_random_checkpoint

BENTO = "bento-tools==2.1.4.post2"
SAMPLE = "bento/datasets/bt_small_data.zarr/"
ORIGIN = (0.0, 2540.0, 2540.0)  # the crop spans x, y in [2550, 2657) µm
runner = CliRunner()


def _wheel(folder: Path, requirement: str) -> None:
    """Download ``requirement``'s wheel with pip into ``folder`` (skip if the registry is out of
    reach)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
               "--only-binary", ":all:", "-d", str(folder), requirement]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(folder)})  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 300 s")
    if done.returncode:
        pytest.skip(f"the package registry is out of reach: {done.stderr.strip()[-200:]}")


@pytest.fixture(scope="module")
def xenium_crop(tmp_path_factory) -> Path:
    """bento's Xenium crop, extracted from its wheel (downloaded with pip, nothing else)."""
    folder = tmp_path_factory.mktemp("bento")
    _wheel(folder, BENTO)
    with zipfile.ZipFile(next(folder.glob("bento_tools-*.whl"))) as wheel:
        names = [n for n in wheel.namelist() if n.startswith(SAMPLE) or "licenses/LICENSE" in n]
        wheel.extractall(folder, names)
    licence = next(folder.glob("bento_tools-*.dist-info/licenses/LICENSE")).read_text()
    assert "BSD 2-Clause" in licence
    return folder / SAMPLE


def _points(root: Path) -> pd.DataFrame:
    return pd.concat(
        pd.read_parquet(f)
        for f in sorted((root / "points/transcripts/points.parquet").rglob("*.parquet"))
        if f.is_file()
    )


def test_the_xenium_crop_is_inspected_as_it_is(xenium_crop):
    points = _points(xenium_crop)
    info = inspect_input(xenium_crop, TranscriptSpec(min_qv=20))
    assert info["format"].startswith("spatialdata points 'transcripts'")
    assert info["rows"] == len(points) == 11_773
    controls = points.feature_name.astype(str).str.match("NegControl|BLANK_")
    low = points.qv < 20
    assert info["dropped"] == {
        "qv below 20": int(low.sum()),
        "control, blank or unassigned codewords": int((controls & ~low).sum()),
    }
    assert info["kept"] == int((~low & ~controls).sum())
    assert info["cells"] == len(set(points.cell_boundaries) - {""})
    result = runner.invoke(app, ["inspect", str(xenium_crop), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == len(points)


def test_a_generation_from_the_xenium_crop_counts_its_transcripts(xenium_crop, tmp_path, client):
    points = _points(xenium_crop)
    kept = points[
        (points.qv >= 20) & ~points.feature_name.astype(str).str.match("NegControl|BLANK_")
    ]
    panel = tuple(kept.feature_name.astype(str).value_counts().index[:32])
    checkpoint = write_random_checkpoint(tmp_path / "xenium.safetensors", genes=panel)
    job = JobConfig.model_validate({
        "out": str(tmp_path / "xenium.zarr"),
        "volume": {"shape": (4, 128, 128), "origin_um": ORIGIN},
        "storage": {"block": (4, 64, 64)}, "diffusion": {"steps": 1},
        "conditioning": {"source": str(xenium_crop), "transcripts": {"min_qv": 20}},
        "checkpoint": str(checkpoint),
    })  # fmt: skip
    lifecycle.generate(job, client)
    cond = store.open_array(job.out, layout.CONDITIONING).read().result()
    mine = kept[kept.feature_name.astype(str).isin(panel)]
    xyz = np.stack([mine.x.to_numpy(np.float64), mine.y.to_numpy(np.float64),
                    np.zeros(len(mine))], axis=1)  # fmt: skip
    want = binned_counts(xyz, mine.feature_name.astype(str).to_numpy(), panel, job)
    np.testing.assert_array_equal(cond, want)
    assert cond.sum() == len(mine) > 4000 and cond[:, 1:].sum() == 0  # a section: z plane 0


STARDIST = "stardist==0.9.2"
NUCLEI = ("stardist/data/images/img3d.tif", "stardist/data/images/mask3d.tif")


@pytest.fixture(scope="module")
def stardist_nuclei(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """stardist's 3-D nuclei image and its instance mask, from its wheel."""
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path_factory.mktemp("stardist")
    _wheel(folder, STARDIST)
    with zipfile.ZipFile(next(folder.glob("stardist-*.whl"))) as wheel:
        wheel.extractall(folder, [*NUCLEI, "stardist-0.9.2.dist-info/licenses/LICENSE.txt"])
    licence = (folder / "stardist-0.9.2.dist-info/licenses/LICENSE.txt").read_text()
    assert "BSD 3-Clause" in licence
    return tuple(tifffile.imread(folder / name) for name in NUCLEI)


def test_stardist_nuclei_condition_a_generation_one_cell_each(stardist_nuclei, tmp_path, client):
    """Each labelled nucleus of the mask is a cell at its centroid; a generation of the image's
    shape is conditioned on exactly one count per nucleus, in the bin of its centroid."""
    from scipy import ndimage

    from .conftest import TINY

    image, mask = stardist_nuclei
    assert image.shape == mask.shape == (31, 61, 57) and image.dtype == np.uint16
    labels = np.unique(mask[mask > 0])
    assert len(labels) == 51
    zyx = np.asarray(ndimage.center_of_mass(np.ones_like(mask), mask, labels)) + 0.5
    table = pd.DataFrame({"x": zyx[:, 2], "y": zyx[:, 1], "z": zyx[:, 0], "nucleus": 1})
    table.to_csv(tmp_path / "nuclei.csv", index=False)
    one_gene = dataclasses.replace(TINY, genes=1)
    checkpoint = write_random_checkpoint(tmp_path / "n.safetensors", one_gene, genes=("nucleus",))
    job = JobConfig.model_validate({
        "out": str(tmp_path / "nuclei.zarr"),
        "volume": {"shape": image.shape, "spacing_um": (1.0, 1.0, 1.0)},
        "storage": {"block": (16, 64, 64)}, "diffusion": {"steps": 1},
        "conditioning": {"source": str(tmp_path / "nuclei.csv")}, "checkpoint": str(checkpoint),
    })  # fmt: skip
    lifecycle.generate(job, client)
    cond = store.open_array(job.out, layout.CONDITIONING).read().result()
    want = binned_counts(zyx[:, ::-1], ["nucleus"] * len(zyx), ("nucleus",), job)
    np.testing.assert_array_equal(cond, want)
    assert cond.sum() == 51
    counted = store.open_array(job.out, layout.CELL_COUNT).read().result()
    np.testing.assert_array_equal(counted, want[0])
