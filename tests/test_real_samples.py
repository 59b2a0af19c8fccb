"""Real data that ships inside a package: bento-tools' 10x Xenium crop (a SpatialData store,
BSD-2-Clause, bento-tools 2.1.4.post2), fetched as a wheel from the package registry and read
as it is: inspected, then generated from, with the conditioning equal to an independent count."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def xenium_crop(tmp_path_factory) -> Path:
    """bento's Xenium crop, extracted from its wheel (downloaded with pip, nothing else)."""
    folder = tmp_path_factory.mktemp("bento")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
               "-d", str(folder), BENTO]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(folder)})  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 300 s")
    if done.returncode:
        pytest.skip(f"the package registry is out of reach: {done.stderr.strip()[-200:]}")
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
