"""User inputs in atlas layouts (.h5ad, transcript parquet/CSV, cell CSV) and their validation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from tera_pipeline.core.config import VolumeSpec
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box, bin_box
from tera_pipeline.inputs.anndata_cells import read_anndata
from tera_pipeline.inputs.cells import (
    check_inside,
    load_cells,
    read_cell_csv,
    read_transcripts,
    to_volume_frame,
)
from tera_pipeline.inputs.conditioning import rasterize
from tera_pipeline.inputs.panel import check_panel, read_gene_panel, select_genes
from tera_pipeline.inputs.synthetic import CellTable

GENES = ("Snap25", "Mbp", "Gad1", "Aqp4")
SHAPE = (16, 64, 64)
SPACING = (4.0, 1.0, 1.0)
BIN = (1, 16, 16)
N = 40

pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")


@pytest.fixture
def cells() -> CellTable:
    """40 cells in a 64 µm cube, at voxel centres in y and x (never on a bin edge)."""
    rng = np.random.default_rng(0)
    zyx = np.floor(rng.random((N, 3)) * 64.0) + 0.5
    counts = rng.poisson(3.0, (N, len(GENES))).astype(np.float32)
    return CellTable(zyx, counts, GENES)


# -- writers in the atlas layouts ---------------------------------------------------------------
def write_h5ad(
    path: Path,
    cells: CellTable,
    sparse: bool = False,
    spatial: np.ndarray | None = None,
    genes: tuple[str, ...] | None = None,
) -> Path:
    """AnnData with obsm['spatial'] as (x, y, z) µm and X cells x genes."""
    x = scipy.sparse.csr_matrix(cells.counts) if sparse else cells.counts
    adata = anndata.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(cells))]),
        var=pd.DataFrame(index=list(genes or cells.genes)),
        obsm={"spatial": cells.position_um[:, ::-1] if spatial is None else spatial},
    )
    adata.write_h5ad(path)
    return path


def cell_frame(cells: CellTable) -> pd.DataFrame:
    """A cell table with x, y, z, one column per gene, and metadata columns."""
    z, y, x = cells.position_um.T
    frame = pd.DataFrame({"cell_id": np.arange(len(cells)) + 100, "x": x, "y": y, "z": z})
    for g, name in enumerate(cells.genes):
        frame[name] = cells.counts[:, g]
    frame["cell_type"] = "ExN"
    frame["fov"] = 3
    return frame


def write_cell_csv(path: Path, cells: CellTable) -> Path:
    cell_frame(cells).to_csv(path, index=False)
    return path


def transcript_frame(cells: CellTable) -> pd.DataFrame:
    """One row per transcript at its cell's position, shuffled, plus an unrequested gene."""
    rows = [
        (x, y, z, gene)
        for (z, y, x), row in zip(cells.position_um, cells.counts.astype(int))
        for gene, n in zip(cells.genes, row)
        for _ in range(n)
    ]
    rows.append((1.5, 2.5, 3.5, "Blank-0001"))
    frame = pd.DataFrame(rows, columns=["x", "y", "z", "gene"])
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def write_transcripts(path: Path, cells: CellTable) -> Path:
    frame = transcript_frame(cells)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def raster(table: CellTable) -> np.ndarray:
    bins = bin_box(Box((0, 0, 0), SHAPE), BIN)
    return rasterize(table, bins, SPACING, BIN)


# -- reading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_anndata_converts_xyz_to_zyx_and_keeps_counts(tmp_path, cells, sparse):
    path = write_h5ad(tmp_path / "atlas.h5ad", cells, sparse=sparse)
    table = read_anndata(path)
    np.testing.assert_array_equal(table.position_um, cells.position_um)
    np.testing.assert_array_equal(table.counts, cells.counts)
    assert table.genes == GENES and table.counts.dtype == np.float32
    assert table.position_um.dtype == np.float64 and table.position_um.shape == (N, 3)
    sub = read_anndata(path, genes=["Gad1", "Snap25"])
    assert sub.genes == ("Gad1", "Snap25")
    np.testing.assert_array_equal(sub.counts, cells.counts[:, [2, 0]])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_transcripts_are_one_hot_rows(tmp_path, cells, suffix):
    path = write_transcripts(tmp_path / f"transcripts{suffix}", cells)
    table = read_transcripts(path, genes=GENES)
    assert table.genes == GENES and len(table) == int(cells.counts.sum())
    assert table.counts.dtype == np.float32
    np.testing.assert_array_equal(table.counts.sum(axis=1), 1.0)
    np.testing.assert_array_equal(table.counts.sum(axis=0), cells.counts.sum(axis=0))
    everything = read_transcripts(path)
    assert everything.genes == tuple(sorted((*GENES, "Blank-0001")))
    assert len(everything) == len(table) + 1


def test_cell_csv_treats_other_columns_as_genes_and_skips_metadata(tmp_path, cells):
    table = read_cell_csv(write_cell_csv(tmp_path / "cells.csv", cells))
    assert table.genes == GENES  # not cell_id, cell_type, fov, x, y, z
    np.testing.assert_array_equal(table.position_um, cells.position_um)
    np.testing.assert_array_equal(table.counts, cells.counts)
    np.testing.assert_array_equal(table.cell_id, np.arange(N) + 100)


def test_all_formats_give_the_same_conditioning(tmp_path, cells):
    paths = [
        write_h5ad(tmp_path / "dense.h5ad", cells),
        write_h5ad(tmp_path / "sparse.h5ad", cells, sparse=True),
        write_cell_csv(tmp_path / "cells.csv", cells),
        write_transcripts(tmp_path / "transcripts.parquet", cells),
        write_transcripts(tmp_path / "transcripts.pq", cells),
        write_transcripts(tmp_path / "transcripts.csv", cells),
    ]
    expected = raster(cells)
    assert expected.shape == (len(GENES), 16, 4, 4)
    assert expected.sum() == cells.counts.sum() > 0
    for path in paths:
        table = load_cells(path, genes=GENES)
        assert table.genes == GENES, path.name
        np.testing.assert_array_equal(raster(table), expected, err_msg=path.name)


def test_gene_panel_file_sets_names_and_order(tmp_path, cells):
    panel = tmp_path / "panel.txt"
    panel.write_text("# checkpoint panel\nAqp4\n\n  Gad1  # inhibitory\nMbp\n")
    genes = read_gene_panel(panel)
    assert genes == ("Aqp4", "Gad1", "Mbp")
    table = load_cells(write_h5ad(tmp_path / "a.h5ad", cells), genes=genes)
    assert table.genes == genes
    np.testing.assert_array_equal(table.counts, cells.counts[:, [3, 2, 1]])


def test_select_genes_follows_the_requested_order(cells):
    table = select_genes(cells, ["Aqp4", "Snap25"])
    assert table.genes == ("Aqp4", "Snap25")
    np.testing.assert_array_equal(table.counts, cells.counts[:, [3, 0]])
    np.testing.assert_array_equal(table.position_um, cells.position_um)


def test_to_volume_frame_applies_affine_then_origin(tmp_path, cells):
    moved = to_volume_frame(cells, origin_um=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(moved.position_um, cells.position_um - [10.0, 20.0, 30.0])
    affine = np.array(
        [[0, 0, 2.0, 1.0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]]
    )  # z' = 2 x + 1, y' = y, x' = z
    mapped = to_volume_frame(cells, origin_um=(1.0, 0.0, 0.0), affine=affine)
    z, y, x = cells.position_um.T
    np.testing.assert_allclose(mapped.position_um, np.stack([2 * x, y, z], axis=1))
    loaded = load_cells(write_cell_csv(tmp_path / "c.csv", cells), None, (1.0, 0.0, 0.0), affine)
    np.testing.assert_allclose(loaded.position_um, mapped.position_um)


def test_check_inside_reports_or_drops_outside_cells(cells, caplog):
    shifted = to_volume_frame(cells, origin_um=(0.0, 0.0, 40.0))  # x in [-40, 24)
    outside = int((cells.position_um[:, 2] < 40.0).sum())
    assert 0 < outside < N
    with pytest.raises(InputError, match=f"^{outside} of {N} cells lie outside the volume"):
        check_inside(shifted, SHAPE, SPACING)
    with caplog.at_level(logging.WARNING, logger="tera_pipeline.inputs"):
        kept = check_inside(shifted, SHAPE, SPACING, drop_outside=True)
    assert len(kept) == N - outside and f"{outside} of {N} cells" in caplog.text
    assert (kept.position_um[:, 2] >= 0).all()
    assert check_inside(cells, SHAPE, SPACING) is cells


def test_load_cells_checks_the_volume(tmp_path, cells):
    path = write_cell_csv(tmp_path / "cells.csv", cells)
    small = VolumeSpec(shape=(16, 64, 32))
    with pytest.raises(InputError, match="outside the volume"):
        load_cells(path, volume=small)
    kept = load_cells(path, volume=small, drop_outside=True)
    assert len(kept) == int((cells.position_um[:, 2] < 32).sum())


def test_check_panel_accepts_the_same_panel():
    check_panel(GENES, list(GENES))


# -- bad inputs: one case per kind --------------------------------------------------------------
def _h5ad(**kwargs) -> Callable[[Path, CellTable], Callable[[], object]]:
    def build(tmp: Path, cells: CellTable) -> Callable[[], object]:
        path = write_h5ad(tmp / "bad.h5ad", cells, **kwargs)
        return lambda: load_cells(path)

    return build


def _with(cells: CellTable, **changes: tuple[tuple[int, int] | int, float]) -> CellTable:
    pos, counts = cells.position_um.copy(), cells.counts.copy()
    for key, (index, value) in changes.items():
        (pos if key == "pos" else counts)[index] = value
    return CellTable(pos, counts, cells.genes)


def _csv_text(text: str, genes: tuple[str, ...] | None = None):
    def build(tmp: Path, cells: CellTable) -> Callable[[], object]:
        path = tmp / "bad.csv"
        path.write_text(text)
        return lambda: load_cells(path, genes=genes)

    return build


def _file(name: str, text: str, reader: Callable[[Path], object]):
    def build(tmp: Path, cells: CellTable) -> Callable[[], object]:
        path = tmp / name
        path.write_text(text)
        return lambda: reader(path)

    return build


def _nan_coordinates(tmp: Path, cells: CellTable) -> Callable[[], object]:
    frame = cell_frame(cells)
    frame.loc[5, "y"] = np.nan
    frame.to_csv(tmp / "bad.csv", index=False)
    return lambda: load_cells(tmp / "bad.csv")


def _empty_transcripts(tmp: Path, cells: CellTable) -> Callable[[], object]:
    transcript_frame(cells).iloc[:0].to_parquet(tmp / "bad.parquet")
    return lambda: load_cells(tmp / "bad.parquet")


def _missing_transcript_gene(tmp: Path, cells: CellTable) -> Callable[[], object]:
    path = write_transcripts(tmp / "t.parquet", cells)
    return lambda: load_cells(path, genes=[*GENES, "Th"])


def _outside(tmp: Path, cells: CellTable) -> Callable[[], object]:
    path = write_cell_csv(tmp / "cells.csv", cells)
    return lambda: load_cells(path, origin_um=(0.0, 0.0, 40.0), volume=VolumeSpec(shape=SHAPE))


BAD_INPUTS = {
    "missing file": (lambda tmp, c: lambda: load_cells(tmp / "nope.h5ad"), "no such file"),
    "unsupported suffix": (_file("cells.xlsx", "x", load_cells), "unsupported suffix '.xlsx'"),
    "corrupt h5ad": (_file("cells.h5ad", "not hdf5", load_cells), "cannot read as h5ad"),
    "nan coordinates": (_nan_coordinates, "1 of 40 cells have non-finite (NaN or infinite) coord"),
    "inf coordinates": (
        lambda tmp, c: _h5ad(spatial=_with(c, pos=((3, 0), np.inf)).position_um)(tmp, c),
        "1 of 40 cells have non-finite (NaN or infinite) coordinates (first at row 3)",
    ),
    "nan counts": (
        _csv_text("x,y,z,Gad1,Mbp\n1,1,1,2,\n2,2,2,1,1\n"),
        "non-finite (NaN or infinite) counts in 1 cells (genes 'Mbp')",
    ),
    "inf counts": (
        lambda tmp, c: _h5ad()(tmp, _with(c, counts=((2, 1), np.inf))),
        "non-finite (NaN or infinite) counts in 1 cells (genes 'Mbp')",
    ),
    "negative counts": (
        lambda tmp, c: _h5ad(sparse=True)(tmp, _with(c, counts=((7, 2), -1.0))),
        "negative counts in 1 cells (genes 'Gad1')",
    ),
    "outside volume": (_outside, "cells lie outside the volume (16, 64, 64) voxels"),
    "duplicated genes h5ad": (
        _h5ad(genes=("Gad1", "Mbp", "Gad1", "Aqp4")),
        "duplicated gene names 'Gad1'",
    ),
    "duplicated genes csv": (
        _csv_text("x,y,z,Mbp,Gad1,Mbp\n1,1,1,2,3,4\n"),
        "duplicated gene names 'Mbp'",
    ),
    "duplicated genes requested": (
        _csv_text("x,y,z,Mbp,Gad1\n1,1,1,2,3\n", genes=("Mbp", "Mbp")),
        "duplicated gene names in the request: 'Mbp'",
    ),
    "missing genes": (
        _csv_text("x,y,z,Mbp,Gad1\n1,1,1,2,3\n", genes=("Th", "Mbp", "Foo")),
        "2 requested genes missing: 'Th', 'Foo'",
    ),
    "missing transcript genes": (_missing_transcript_gene, "1 requested genes missing: 'Th'"),
    "empty cell csv": (_csv_text("x,y,z,Mbp,Gad1\n"), "empty table (no cells)"),
    "empty h5ad": (
        lambda tmp, c: _h5ad()(tmp, c.select(np.zeros(len(c), bool))),
        "empty table (no cells)",
    ),
    "empty transcripts": (_empty_transcripts, "empty table (no transcripts)"),
    "no genes": (_csv_text("x,y,z,cell_type\n1,2,3,ExN\n"), "empty table (no genes)"),
    "2-d coordinates": (
        lambda tmp, c: _h5ad(spatial=c.position_um[:, :2])(tmp, c),
        "obsm['spatial'] holds (x, y) only: give z in µm as obs['z']",
    ),
    "missing columns": (_csv_text("x,y,gene\n1,2,Mbp\n"), "missing columns 'z'"),
    "transcript without gene": (_csv_text("x,y,z,gene\n1,2,3,\n"), "1 transcripts have no gene"),
    "non-numeric gene column": (
        _csv_text("x,y,z,Mbp,note\n1,2,3,4,hello\n"),
        "column 'note' is not numeric",
    ),
    "panel mismatch": (
        lambda tmp, c: lambda: check_panel([*GENES[:3], "Foo"], GENES),
        "missing 'Aqp4'; not in checkpoint 'Foo'",
    ),
    "panel order": (
        lambda tmp, c: lambda: check_panel(GENES[::-1], GENES),
        "order differs from the checkpoint at position 0 ('Aqp4' vs 'Snap25')",
    ),
    "panel file duplicates": (
        _file("panel.txt", "Mbp\nGad1\nMbp # again\n", read_gene_panel),
        "duplicated gene names 'Mbp'",
    ),
    "bad affine": (
        lambda tmp, c: lambda: to_volume_frame(c, affine=np.eye(3)),
        "affine must be 4 x 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_input_error(tmp_path, cells, case):
    build, message = BAD_INPUTS[case]
    call = build(tmp_path, cells)
    with pytest.raises(InputError) as info:
        call()
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message in text, text
    assert "\n" not in text and text.strip() == text
