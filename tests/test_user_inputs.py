"""Users' inputs (.h5ad, parquet transcripts, CSV cells) drive a generation; bad inputs are
refused with one line, a non-zero exit, and an existing output store left byte-for-byte as is."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs.synthetic import GENE_PANEL, SyntheticBrain
from tera_pipeline.storage import layout, store

SHAPE = (4, 64, 64)
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")
runner = CliRunner()


def _cells():
    return SyntheticBrain(2).cells(Box((0, 0, 0), SHAPE))


def write_h5ad(path: Path, cells, spatial=None, genes=GENE_PANEL) -> Path:
    xyz = cells.position_um[:, ::-1] if spatial is None else spatial
    adata = anndata.AnnData(
        X=scipy.sparse.csr_matrix(cells.counts[:, : len(genes)]),
        var=pd.DataFrame(index=list(genes)),
    )
    adata.obsm["spatial"] = np.asarray(xyz)
    adata.write_h5ad(path)
    return path


def write_cell_csv(path: Path, cells, counts=None, positions=None) -> Path:
    pos = cells.position_um if positions is None else positions
    frame = pd.DataFrame({"x": pos[:, 2], "y": pos[:, 1], "z": pos[:, 0]})
    values = cells.counts if counts is None else counts
    for g, name in enumerate(GENE_PANEL):
        frame[name] = values[:, g]
    frame.to_csv(path, index=False)
    return path


def write_transcripts(path: Path, cells) -> Path:
    rows = []
    for pos, counts in zip(cells.position_um, cells.counts.astype(int)):
        for g in np.flatnonzero(counts):
            rows.extend([(pos[2], pos[1], pos[0], GENE_PANEL[g])] * counts[g])
    frame = pd.DataFrame(rows, columns=["x", "y", "z", "gene"])
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def _job(tmp_path: Path, name: str, source: Path, checkpoint: Path) -> JobConfig:
    return JobConfig.model_validate(
        {
            "out": str(tmp_path / f"{name}.zarr"),
            "volume": {"shape": SHAPE},
            "storage": {"block": (4, 32, 32)},
            "diffusion": {"steps": 1},
            "conditioning": {"source": str(source)},
            "checkpoint": str(checkpoint),
        }
    )


def test_h5ad_parquet_and_csv_drive_generation_with_equal_conditioning(
    tmp_path, tiny_checkpoint, client
):
    cells = _cells()
    inputs = {
        "h5ad": write_h5ad(tmp_path / "cells.h5ad", cells),
        "parquet": write_transcripts(tmp_path / "transcripts.parquet", cells),
        "csv": write_cell_csv(tmp_path / "cells.csv", cells),
    }
    rasters = {}
    for name, path in inputs.items():
        job = _job(tmp_path, name, path, tiny_checkpoint)
        lifecycle.generate(job, client)
        box = Box((0, 0, 0), job.volume.shape)
        image = store.read_box(store.open_array(job.out, layout.IMAGE), box)
        assert image.std() > 0
        cond = store.open_array(job.out, layout.CONDITIONING).read().result()
        rasters[name] = cond
    assert rasters["h5ad"].sum() == pytest.approx(float(cells.counts.sum()))
    np.testing.assert_array_equal(rasters["h5ad"], rasters["parquet"])
    np.testing.assert_array_equal(rasters["h5ad"], rasters["csv"])


# -- bad inputs --------------------------------------------------------------------------------
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def existing_store(tmp_path_factory, tiny_checkpoint):
    """An output store the bad runs below aim at (with --overwrite) and must leave untouched."""
    tmp = tmp_path_factory.mktemp("existing")
    source = write_cell_csv(tmp / "good.csv", _cells())
    job = _job(tmp, "out", source, tiny_checkpoint)
    result = runner.invoke(
        app,
        [
            "generate",
            "--out",
            str(job.out),
            "--shape",
            "4,64,64",
            "--block",
            "4,32,32",
            "--steps",
            "1",
            "--workers",
            "1",
            "--cells",
            str(source),
            "--checkpoint",
            str(tiny_checkpoint),
        ],
    )
    assert result.exit_code == 0, result.output
    return job.out


# Deliberate repetition (duplicates lists its shape): one branch per kind of bad input,
# spelled out so that each reads as the case it tests.
def _bad(tmp: Path, kind: str) -> tuple[list[str], str]:
    """Extra CLI arguments for one kind of bad input, and the words its error must contain."""
    cells = _cells()
    n = len(cells)
    if kind == "nan-coordinates":
        pos = cells.position_um.copy()
        pos[3, 1] = np.nan
        return ["--cells", str(write_cell_csv(tmp / "a.csv", cells, positions=pos))], "NaN"
    if kind == "infinite-coordinates":
        pos = cells.position_um.copy()
        pos[0, 0] = np.inf
        return ["--cells", str(write_cell_csv(tmp / "a.csv", cells, positions=pos))], "infinite"
    if kind == "nan-counts":
        counts = cells.counts.copy()
        counts[1, 2] = np.nan
        return ["--cells", str(write_cell_csv(tmp / "a.csv", cells, counts=counts))], "counts"
    if kind == "negative-counts":
        counts = cells.counts.copy()
        counts[1, 2] = -3
        return ["--cells", str(write_cell_csv(tmp / "a.csv", cells, counts=counts))], "negative"
    if kind == "cells-outside":
        pos = cells.position_um.copy()
        pos[:5, 2] += 1000.0
        path = write_cell_csv(tmp / "a.csv", cells, positions=pos)
        return ["--cells", str(path)], f"5 of {n} cells lie outside the volume"
    if kind == "duplicated-genes":
        path = write_h5ad(tmp / "a.h5ad", cells, genes=(*GENE_PANEL[:-1], GENE_PANEL[0]))
        return ["--cells", str(path)], "duplicated gene names"
    if kind == "missing-genes":
        frame = pd.read_csv(write_cell_csv(tmp / "a.csv", cells)).drop(columns=["Th", "Gad1"])
        frame.to_csv(tmp / "b.csv", index=False)
        return ["--cells", str(tmp / "b.csv")], "'Gad1', 'Th'"
    if kind == "empty-table":
        (tmp / "a.csv").write_text("x,y,z," + ",".join(GENE_PANEL) + "\n")
        return ["--cells", str(tmp / "a.csv")], "empty table"
    if kind == "wrong-dimensionality":
        four = np.column_stack([cells.position_um, cells.position_um[:, :1]])  # (x, y, z, ?)
        path = write_h5ad(tmp / "a.h5ad", cells, spatial=four)
        return ["--cells", str(path)], "wrong dimensionality"
    if kind == "panel-mismatch":
        (tmp / "panel.txt").write_text("\n".join(reversed(GENE_PANEL)) + "\n")
        good = write_cell_csv(tmp / "a.csv", cells)
        return ["--cells", str(good), "--gene-panel", str(tmp / "panel.txt")], "gene panel"
    if kind == "missing-file":
        return ["--cells", str(tmp / "nope.h5ad")], "no such file"
    if kind == "unsupported-format":
        (tmp / "a.xlsx").write_text("?")
        return ["--cells", str(tmp / "a.xlsx")], "unsupported suffix"
    raise AssertionError(kind)


KINDS = [
    "nan-coordinates",
    "infinite-coordinates",
    "nan-counts",
    "negative-counts",
    "cells-outside",
    "duplicated-genes",
    "missing-genes",
    "empty-table",
    "wrong-dimensionality",
    "panel-mismatch",
    "missing-file",
    "unsupported-format",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused_and_store_untouched(kind, tmp_path, existing_store, tiny_checkpoint):
    before = _digest(existing_store)
    extra, words = _bad(tmp_path, kind)
    result = runner.invoke(
        app,
        [
            "generate",
            "--out",
            str(existing_store),
            "--overwrite",
            "--shape",
            "4,64,64",
            "--block",
            "4,32,32",
            "--checkpoint",
            str(tiny_checkpoint),
            *extra,
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert words in lines[0], lines[0]
    assert _digest(existing_store) == before
