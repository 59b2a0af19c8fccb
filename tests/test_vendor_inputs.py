"""Transcript tables as Xenium, MERSCOPE and CosMx write them (their column names, units, plane
indices, quality values and control codewords) drive a generation as they are; the conditioning
equals an independent count of the transcripts kept, and what was dropped is reported. Inputs in
the wrong units, FOV pixels, a plane index without a z step and Ensembl ids are refused in one
line that says what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.core.geometry import Box
from tera_pipeline.core.transcript_spec import TranscriptSpec
from tera_pipeline.generation import lifecycle
from tera_pipeline.inputs import vendors
from tera_pipeline.inputs.inspection import inspect_input
from tera_pipeline.inputs.synthetic import GENE_PANEL, SyntheticBrain
from tera_pipeline.storage import layout, store

from .conditioning_counts import binned_counts

SHAPE = (4, 64, 64)
SPACING = (4.0, 1.0, 1.0)
Z_STEP = 4.0  # µm between the planes the MERSCOPE and CosMx tables index
COSMX_PX = 0.12028
runner = CliRunner()


def _transcripts(seed: int = 2) -> pd.DataFrame:
    """One row per transcript of the synthetic cells: x, y, z µm (z on whole planes), gene."""
    cells = SyntheticBrain(seed).cells(Box((0, 0, 0), SHAPE))
    rows = []
    for i, (pos, counts) in enumerate(zip(cells.position_um, cells.counts.astype(int))):
        plane = int(pos[0] // Z_STEP)
        for g in np.flatnonzero(counts):
            rows += [(pos[2], pos[1], plane * Z_STEP, plane, GENE_PANEL[g], i + 1)] * counts[g]
    return pd.DataFrame(rows, columns=["x", "y", "z", "plane", "gene", "cell"])


def _controls(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Control rows at the positions of the first transcripts, one per name."""
    extra = frame.iloc[: len(names)].copy()
    extra["gene"] = names
    return pd.concat([frame, extra], ignore_index=True)


def write_xenium(path: Path, frame: pd.DataFrame) -> Path:
    rng = np.random.default_rng(0)
    frame = _controls(frame, ["NegControlProbe_00042", "BLANK_0006", "UnassignedCodeword_0011"])
    qv = np.where(rng.random(len(frame)) < 0.1, 12.5, 35.0)  # a tenth below Xenium's 20
    pd.DataFrame({
        "transcript_id": np.arange(len(frame), dtype=np.uint64) + 281474976710656,
        "cell_id": [f"cell{c:05d}-1" if c % 5 else "UNASSIGNED" for c in frame["cell"]],
        "overlaps_nucleus": (frame["cell"] % 2).astype(np.uint8),
        "feature_name": pd.Categorical(frame["gene"]),
        "x_location": frame["x"].astype(np.float32), "y_location": frame["y"].astype(np.float32),
        "z_location": frame["z"].astype(np.float32), "qv": qv.astype(np.float32),
        "fov_name": "A1", "nucleus_distance": np.float32(0.0),
    }).to_parquet(path)  # fmt: skip
    return path


def write_merscope(path: Path, frame: pd.DataFrame) -> Path:
    frame = _controls(frame, ["Blank-3", "Blank-17"])
    pd.DataFrame(
        {
            "barcode_id": pd.factorize(frame["gene"])[0],
            "global_x": frame["x"],
            "global_y": frame["y"],
            "global_z": frame["plane"].astype(float),
            "x": frame["x"] * 9.26 + 1200.0,
            "y": frame["y"] * 9.26 + 800.0,  # FOV pixels
            "fov": 7,
            "gene": frame["gene"],
            "transcript_id": [f"t{i}" for i in range(len(frame))],
            "cell_id": frame["cell"] + 10**15,
        }
    ).to_csv(path)  # the unnamed index column first, as MERSCOPE writes it
    return path


def write_cosmx(path: Path, frame: pd.DataFrame) -> Path:
    frame = _controls(frame, ["NegPrb3", "FalseCode12", "SystemControl5"])
    pd.DataFrame(
        {
            "fov": 1,
            "cell_ID": frame["cell"] % 7,
            "x_local_px": frame["x"] / COSMX_PX % 4256,
            "y_local_px": frame["y"] / COSMX_PX % 4256,
            "x_global_px": frame["x"] / COSMX_PX,
            "y_global_px": frame["y"] / COSMX_PX,
            "z": frame["plane"],
            "target": frame["gene"],
            "CellComp": "Nuclear",
        }
    ).to_csv(path, index=False, quoting=1)  # every field quoted, as the tx files are
    return path


def _expected(x: np.ndarray, y: np.ndarray, z: np.ndarray, genes: np.ndarray, job) -> np.ndarray:
    """Counts per gene bin, counted here from the kept rows."""
    return binned_counts(np.stack([x, y, z], axis=1), genes, GENE_PANEL, job)


XENIUM_CONTROLS = ("NegControlProbe_", "BLANK_", "UnassignedCodeword_")


def _centroids(rows: pd.DataFrame, xyz: tuple[str, str, str], cell: str, none) -> np.ndarray:
    """(x, y, z) µm: the mean position of each named cell's rows, counted here."""
    named = rows[rows[cell] != none]
    return named.groupby(cell)[list(xyz)].mean().to_numpy(np.float64)


def _job(tmp_path: Path, name: str, source: Path, checkpoint: Path, **transcripts) -> JobConfig:
    return JobConfig.model_validate({
        "out": str(tmp_path / f"{name}.zarr"), "volume": {"shape": SHAPE, "spacing_um": SPACING},
        "storage": {"block": (4, 32, 32)}, "diffusion": {"steps": 1},
        "conditioning": {"source": str(source), "transcripts": transcripts},
        "checkpoint": str(checkpoint),
    })  # fmt: skip


def _manifest(job: JobConfig) -> dict:
    return json.loads((Path(job.out) / "_cells" / "manifest.json").read_text())


def test_xenium_merscope_and_cosmx_tables_generate_as_written(tmp_path, tiny_checkpoint, client):
    frame = _transcripts()
    cases = {
        "xenium": (write_xenium(tmp_path / "transcripts.parquet", frame), {}),
        "merscope": (write_merscope(tmp_path / "detected_transcripts.csv", frame),
                     {"z_step_um": Z_STEP}),
        "cosmx": (write_cosmx(tmp_path / "Run5_S1_tx_file.csv", frame), {"z_step_um": Z_STEP}),
    }  # fmt: skip
    for name, (path, options) in cases.items():
        assert vendors.open_reading(path, TranscriptSpec(**options)).layout.name == name
        job = _job(tmp_path, name, path, tiny_checkpoint, **options)
        lifecycle.generate(job, client)
        cond = store.open_array(job.out, layout.CONDITIONING).read().result()
        if name == "xenium":  # qv >= 20 and no control codeword, from the file's own columns
            table = pd.read_parquet(path)
            kept = table[(table.qv >= 20) & table.feature_name.isin(GENE_PANEL)]
            placed = table[(table.qv >= 20) & ~table.feature_name.str.startswith(XENIUM_CONTROLS)]
            cells = _centroids(placed, ("x_location", "y_location", "z_location"), "cell_id",
                               "UNASSIGNED")  # fmt: skip
            xyz = [kept[c].to_numpy(np.float64) for c in ("x_location", "y_location", "z_location")]
            want = _expected(*xyz, kept.feature_name.to_numpy(), job)
            low = table.qv < 20
            controls_kept_by_qv = 3 - int(low[-3:].sum())  # the three control rows come last
            drops = {
                "qv below 20": int(low.sum()),
                "control, blank or unassigned codewords": controls_kept_by_qv,
            }
        elif name == "merscope":
            table = pd.read_csv(path)
            kept = table[table.gene.isin(GENE_PANEL)]
            placed = table[~table.gene.str.startswith("Blank-")].assign(
                z_um=lambda t: t.global_z * Z_STEP
            )
            cells = _centroids(placed, ("global_x", "global_y", "z_um"), "cell_id", -1)
            z = kept.global_z.to_numpy() * Z_STEP
            want = _expected(kept.global_x.to_numpy(), kept.global_y.to_numpy(), z,
                             kept.gene.to_numpy(), job)  # fmt: skip
            drops = {"control, blank or unassigned codewords": 2}
        else:
            table = pd.read_csv(path)
            kept = table[table.target.isin(GENE_PANEL)]
            placed = table[~table.target.str.startswith(("NegPrb", "FalseCode", "SystemControl"))]
            placed = placed.assign(
                x_um=placed.x_global_px * COSMX_PX,
                y_um=placed.y_global_px * COSMX_PX,
                z_um=placed.z * Z_STEP,
            )
            cells = _centroids(placed, ("x_um", "y_um", "z_um"), "cell_ID", 0)
            want = _expected(kept.x_global_px.to_numpy() * COSMX_PX,
                             kept.y_global_px.to_numpy() * COSMX_PX,
                             kept.z.to_numpy() * Z_STEP, kept.target.to_numpy(), job)  # fmt: skip
            drops = {"control, blank or unassigned codewords": 3}
        np.testing.assert_array_equal(cond, want)
        assert cond.sum() == len(kept) > 0.85 * len(frame)
        # cell_count: the centroids of the cells the instrument named, not transcripts
        counted = store.open_array(job.out, layout.CELL_COUNT).read().result()
        centroid_bins = binned_counts(cells, [GENE_PANEL[0]] * len(cells), GENE_PANEL, job)[0]
        np.testing.assert_array_equal(counted, centroid_bins)
        assert counted.sum() == len(cells) < cond.sum()
        assert store.group_attrs(job.out)["tera_pipeline"]["cell_count"] == "cell centroids per bin"
        manifest = _manifest(job)
        assert manifest["cells"] == len(cells)
        assert manifest["kept"] == len(kept) and manifest["rows"] == len(table)
        assert {k: v for k, v in manifest["dropped"].items() if v} == drops
        assert manifest["format"].startswith(name)


def test_inspect_names_the_layout_units_genes_cells_and_the_volume(tmp_path):
    frame = _transcripts()
    path = write_xenium(tmp_path / "transcripts.parquet", frame)
    info = inspect_input(path, panel=[*GENE_PANEL[:3], "Foxp2x"], spacing_um=SPACING,
                         block=(4, 32, 32))  # fmt: skip
    assert info["format"].startswith("xenium (x, y in um") and info["rows"] == len(frame) + 3
    assert info["dropped"]["control, blank or unassigned codewords"] >= 2
    assert info["panel"] == {"genes": 4, "present": 3, "missing": ["Foxp2x"]}
    assert info["cells"] == len({c for c in frame["cell"] if c % 5})  # UNASSIGNED not a cell
    assert info["volume"]["shape_zyx"] == list(SHAPE)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "xenium" in result.output and "checkpoint panel:" in result.output
    merscope = write_merscope(tmp_path / "detected_transcripts.csv", frame)
    result = runner.invoke(app, ["inspect", str(merscope), "--z-step", "4", "--json"])
    assert json.loads(result.output)["format"].startswith("merscope")


@pytest.mark.parametrize(
    "case, options, message",
    [
        ("mm", {}, r"look like mm; pass --units mm"),
        ("merscope as a table", {"format": "table"},
         r"FOV-local pixels .* pass --format merscope"),
        ("merscope without a z step", {}, r"'global_z' is a z-plane index .* pass --z-step"),
        ("cosmx without a z step", {}, r"'z' is a z-plane index \(cosmx\): pass --z-step"),
        ("pixels as µm", {"format": "table"}, r"look like pixels; pass --units px --pixel-size"),
        ("ensembl ids", {}, r"these are Ensembl gene ids .* give the symbols"),
    ],
)  # fmt: skip
def test_wrong_units_fov_pixels_and_plane_indices_are_refused_saying_what_to_pass(
    case, options, message, tmp_path, tiny_checkpoint
):
    frame = _transcripts()
    if case == "mm":
        path = tmp_path / "abc.csv"
        mm = frame.assign(x=frame.x / 1000, y=frame.y / 1000, z=frame.z / 1000)
        mm[["x", "y", "z", "gene"]].to_csv(path, index=False)
    elif case.startswith("merscope"):
        path = write_merscope(tmp_path / "detected_transcripts.csv", frame)
    elif case.startswith("cosmx"):
        path = write_cosmx(tmp_path / "tx_file.csv", frame)
    elif case == "ensembl ids":
        path = tmp_path / "ensembl.parquet"
        ids = {g: f"ENSMUSG{i:011d}" for i, g in enumerate(GENE_PANEL)}
        frame.assign(gene=frame.gene.map(ids))[["x", "y", "z", "gene"]].to_parquet(path)
    else:
        path = tmp_path / "px.csv"
        px = frame.assign(x=frame.x / COSMX_PX, y=frame.y / COSMX_PX)
        px[["x", "y", "z", "gene"]].to_csv(path, index=False)
    job = _job(tmp_path, "refused", path, tiny_checkpoint, **options)
    with pytest.raises(InputError, match=message) as err:
        lifecycle.preflight(job)  # partitions a transcript table beside the store, checking it
    assert "\n" not in str(err.value)
    assert not Path(job.out).exists() and not list(tmp_path.glob(".*staging"))


def test_generate_refuses_a_plane_index_without_z_step_in_one_line(tmp_path, tiny_checkpoint):
    path = write_merscope(tmp_path / "detected_transcripts.csv", _transcripts())
    args = ["generate", "--out", str(tmp_path / "o.zarr"), "--shape", "4,64,64", "--block",
            "4,32,32", "--steps", "1", "--cells", str(path), "--checkpoint",
            str(tiny_checkpoint)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert "pass --z-step" in result.output
    assert not (tmp_path / "o.zarr").exists()


def test_an_atlas_h5ad_with_ensembl_ids_and_z_in_obs_reads_like_the_plain_one(tmp_path):
    """The Allen Brain Cell atlas's shape: var indexed by Ensembl ids with a gene_symbol
    column, obsm["spatial"] (x, y) and z in obs; without z, one line says what to give."""
    import anndata
    import scipy.sparse

    from tera_pipeline.inputs.cells import load_cells

    cells = SyntheticBrain(2).cells(Box((0, 0, 0), SHAPE))
    plain = anndata.AnnData(X=scipy.sparse.csr_matrix(cells.counts),
                            var=pd.DataFrame(index=list(GENE_PANEL)))  # fmt: skip
    plain.obsm["spatial"] = cells.position_um[:, ::-1]
    plain.write_h5ad(tmp_path / "plain.h5ad")
    atlas = anndata.AnnData(
        X=scipy.sparse.csr_matrix(cells.counts),
        var=pd.DataFrame({"gene_symbol": list(GENE_PANEL)},
                         index=[f"ENSMUSG{i:011d}" for i in range(len(GENE_PANEL))]),
        obs=pd.DataFrame({"z": cells.position_um[:, 0]},
                         index=[f"cell_{i}" for i in range(len(cells.position_um))]),
    )  # fmt: skip
    atlas.obsm["spatial"] = cells.position_um[:, :0:-1]  # (x, y)
    atlas.write_h5ad(tmp_path / "atlas.h5ad")
    want = load_cells(tmp_path / "plain.h5ad", GENE_PANEL)
    got = load_cells(tmp_path / "atlas.h5ad", GENE_PANEL)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.position_um, want.position_um)
    del atlas.obs["z"]
    atlas.write_h5ad(tmp_path / "no_z.h5ad")
    with pytest.raises(InputError, match=r"holds \(x, y\) only: give z in µm as obs\['z'\]"):
        load_cells(tmp_path / "no_z.h5ad", GENE_PANEL)


def write_abc_atlas(folder: Path, cells) -> list[str]:
    """The Allen Brain Cell atlas's MERFISH files: an expression h5ad (var Ensembl ids with a
    gene_symbol column, obs indexed by cell_label, no obsm) and cell_metadata.csv keyed by
    cell_label with x, y, z in mm among section and cluster columns, in another row order, one
    row for a cell the h5ad lacks. Returns the labels."""
    import anndata
    import scipy.sparse

    folder.mkdir()
    labels = [f"10191719071023{i:05d}-1" for i in range(len(cells))]
    anndata.AnnData(
        X=scipy.sparse.csr_matrix(cells.counts),
        obs=pd.DataFrame({"brain_section_label": "C57BL6J-638850.40"},
                         index=pd.Index(labels, name="cell_label")),
        var=pd.DataFrame({"gene_symbol": list(GENE_PANEL)},
                         index=pd.Index([f"ENSMUSG{i:011d}" for i in range(len(GENE_PANEL))],
                                        name="gene_identifier")),
    ).write_h5ad(folder / "C57BL6J-638850-raw.h5ad")  # fmt: skip
    mm = cells.position_um / 1000.0
    order = np.random.default_rng(1).permutation(len(cells))
    pd.DataFrame({
        "cell_label": [*np.asarray(labels)[order], "9999999999999999999-1"],
        "brain_section_label": "C57BL6J-638850.40", "cluster_alias": 1,
        "average_correlation_score": 0.6, "feature_matrix_label": "C57BL6J-638850",
        "donor_label": "C57BL6J-638850", "donor_genotype": "wt/wt", "donor_sex": "M",
        "x": [*mm[order, 2], 5.0], "y": [*mm[order, 1], 5.0], "z": [*mm[order, 0], 5.0],
    }).to_csv(folder / "cell_metadata.csv", index=False)  # fmt: skip
    return labels


def test_an_allen_atlas_folder_generates_with_its_cell_labels_to_spatia(
    tmp_path, tiny_checkpoint, client
):
    """Positions joined from cell_metadata.csv on cell_label and read in mm; the conditioning
    equals an independent count; SPATIA's obs_names and ``perturb --cell-id`` are the labels."""
    from tera_pipeline.analysis import spatia
    from tera_pipeline.analysis.perturb import perturb_store
    from tera_pipeline.inputs.cells import load_cells

    from .test_spatia import write_tiny_spatia

    cells = SyntheticBrain(2).cells(Box((0, 0, 0), SHAPE))
    labels = write_abc_atlas(tmp_path / "abc", cells)
    h5ad = tmp_path / "abc" / "C57BL6J-638850-raw.h5ad"
    table = load_cells(h5ad, GENE_PANEL)
    assert table.names() == labels
    info = inspect_input(h5ad, spacing_um=SPACING)
    assert info["format"] == "allen atlas h5ad, positions from cell_metadata.csv (mm)"
    assert info["cells"] == len(labels) and info["extent_um"]["max"][0] > 30  # µm, not mm
    np.testing.assert_allclose(table.position_um, cells.position_um, rtol=1e-12)
    job = JobConfig.model_validate({
        "out": str(tmp_path / "abc.zarr"), "volume": {"shape": SHAPE, "spacing_um": SPACING},
        "storage": {"block": (4, 32, 32)}, "diffusion": {"steps": 1},
        "conditioning": {"source": str(h5ad)}, "checkpoint": str(tiny_checkpoint),
    })  # fmt: skip
    lifecycle.generate(job, client)
    cond = store.open_array(job.out, layout.CONDITIONING).read().result()
    want = np.zeros_like(cond)
    for g in range(len(GENE_PANEL)):
        bins = binned_counts(
            np.repeat(cells.position_um[:, ::-1], cells.counts[:, g].astype(int), axis=0),
            [GENE_PANEL[0]] * int(cells.counts[:, g].sum()), GENE_PANEL, job,
        )  # fmt: skip
        want[g] = bins[0]
    np.testing.assert_array_equal(cond, want)
    result = spatia.run(Path(job.out), client, write_tiny_spatia(tmp_path / "s.safetensors"))
    import anndata

    obs_names = list(anndata.read_h5ad(result["h5ad"]).obs_names)
    assert len(obs_names) == len(labels) and set(obs_names) == set(labels)
    central = Box((0, 32, 32), (4, 32, 32))  # the central block of the 1 x 2 x 2 grid
    voxel = np.floor(cells.position_um / np.asarray(SPACING)).astype(int)
    there = [n for n, v in zip(labels, voxel) if central.contains(Box(tuple(v), (1, 1, 1)))]
    report = perturb_store(Path(job.out), "Ccnd1=+20", cell_ids=there[:2],
                           checkpoint=tmp_path / "s.safetensors", out_dir=tmp_path)  # fmt: skip
    assert [c["cell_id"] for c in report["per_cell"]] == there[:2]
