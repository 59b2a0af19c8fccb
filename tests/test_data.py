"""The synthetic brain, conditioning rasters, and the TensorStore-backed store."""

from __future__ import annotations

import numpy as np
import pytest

from tera_pipeline.core.geometry import Box, bin_box, patch_bins
from tera_pipeline.inputs.conditioning import cell_count_raster, rasterize
from tera_pipeline.inputs.synthetic import CELL_TYPES, GENE_PANEL, SyntheticBrain
from tera_pipeline.storage import store


def test_render_is_deterministic_for_any_box():
    brain = SyntheticBrain(3)
    whole = brain.render(Box((0, 0, 0), (8, 96, 96)))
    part = Box((2, 30, 50), (5, 40, 33))
    np.testing.assert_array_equal(brain.render(part), whole[(slice(None), *part.slices())])
    assert whole.dtype == np.uint8 and whole.shape == (2, 8, 96, 96)
    assert not np.array_equal(whole, SyntheticBrain(4).render(Box((0, 0, 0), (8, 96, 96))))


def test_cell_ids_are_unique_non_negative_and_the_same_from_any_box():
    brain = SyntheticBrain(5)
    whole = brain.cells(Box((-20, -150, -150), (40, 300, 300)))  # tiles on both sides of 0
    ids = whole.cell_id
    assert len(ids) > 1000 and (ids >= 0).all() and len(np.unique(ids)) == len(ids)
    part = brain.cells(Box((0, 0, 0), (10, 100, 100)))
    inside = np.all((whole.position_um >= 0) & (whole.position_um < [40, 100, 100]), axis=1)
    np.testing.assert_array_equal(np.sort(part.cell_id), np.sort(ids[inside]))


def test_cells_have_regions_types_and_programs():
    brain = SyntheticBrain(0)
    cells = brain.cells(Box((0, 0, 0), (16, 320, 256)))
    y = cells.position_um[:, 1]
    cortex, white = cells.select(y < 160), cells.select((y >= 160) & (y < 224))
    oligo = [t.name for t in CELL_TYPES].index("Oligo")
    assert (white.cell_type == oligo).mean() > 0.5 > (cortex.cell_type == oligo).mean()
    assert len(cortex) / 160 > len(white) / 64  # denser cortex
    exn = cells.select(cells.cell_type == 0)
    g = GENE_PANEL.index("Slc17a7")
    assert exn.counts[:, g].mean() > 10 * cells.select(cells.cell_type == oligo).counts[:, g].mean()


def test_subtypes_share_expression_and_differ_in_morphology():
    """ExN-U/ExN-D and AstroP/AstroF: the same panel program, different nuclei (what the image
    adds to expression in SPATIA's benchmark)."""
    cells = SyntheticBrain(0).cells(Box((0, 0, 0), (16, 640, 256)))
    names = [t.name for t in CELL_TYPES]
    for a, b in (("ExN-U", "ExN-D"), ("AstroP", "AstroF")):
        ca = cells.select(cells.cell_type == names.index(a))
        cb = cells.select(cells.cell_type == names.index(b))
        assert len(ca) > 20 and len(cb) > 20
        profile_a, profile_b = ca.counts.mean(0), cb.counts.mean(0)
        assert np.abs(profile_a - profile_b).max() < 0.25 * profile_a.max()
        assert cb.nucleus_radius_um.mean() > 1.2 * ca.nucleus_radius_um.mean()


def test_dapi_follows_cells_in_ground_truth():
    brain = SyntheticBrain(0)
    box = Box((0, 0, 0), (16, 256, 256))
    bins = bin_box(box, (1, 16, 16))
    counts = cell_count_raster(brain.cells(box), bins, brain.spacing, (1, 16, 16))
    dapi = brain.render(box)[0].reshape(16, 16, 16, 16, 16).mean(axis=(2, 4))
    assert np.corrcoef(dapi.ravel(), counts.ravel())[0, 1] > 0.6


def test_rasterize_sums_counts_per_bin():
    brain = SyntheticBrain(0)
    box = Box((0, 0, 0), (4, 64, 64))
    cells = brain.cells(box)
    raster = rasterize(cells, bin_box(box, (1, 16, 16)), brain.spacing, (1, 16, 16))
    assert raster.shape == (len(GENE_PANEL), 4, 4, 4)
    np.testing.assert_allclose(raster.sum(axis=(1, 2, 3)), cells.counts.sum(axis=0), rtol=1e-5)
    # a sub-box raster is the crop of the bigger one (bins are global)
    sub = Box((1, 16, 32), (2, 32, 32))
    sub_raster = rasterize(brain.cells(sub), bin_box(sub, (1, 16, 16)), brain.spacing, (1, 16, 16))
    np.testing.assert_array_equal(sub_raster, raster[:, 1:3, 1:3, 2:4])


def test_a_patch_starting_within_a_bin_reads_the_stored_bins_from_the_one_holding_it():
    """The gene window of a patch moved by voxels: the fixed grid's bins from the one holding the
    patch's first voxel (one more in-plane), grown by the context, and the offset within it."""
    from tera_pipeline.core.geometry import gene_window

    b, footprint, context = (1, 16, 16), (4, 3, 3), (1, 1, 1)
    window, offset = gene_window(Box((3, 37, -5), (4, 32, 32)), b, footprint, context)
    assert offset == (0, 5, 11) and window == Box((2, 1, -2), (6, 5, 5))
    aligned, zero = gene_window(Box((0, 32, 16), (4, 32, 32)), b, (4, 2, 2), context)
    assert zero == (0, 0, 0) and aligned == patch_bins(Box((0, 32, 16), (4, 32, 32)), b, context)


def test_store_read_box_fills_beyond_the_edge(tmp_path):
    spec = store.ArraySpec(
        "a", (2, 8, 32, 32), "float32", ("c", "z", "y", "x"), (2, 4, 16, 16), (2, 2, 8, 8)
    )
    arr = store.create_array(tmp_path, spec)
    data = np.arange(2 * 8 * 32 * 32, dtype=np.float32).reshape(2, 8, 32, 32)
    for z in (0, 4):
        for y in (0, 16):
            for x in (0, 16):
                box = Box((z, y, x), (4, 16, 16))
                store.write_box(arr, box, data[(slice(None), *box.slices())])
    got = store.read_box(store.open_array(tmp_path, "a"), Box((-2, 20, 28), (6, 20, 8)), fill=-1)
    assert got.shape == (2, 6, 20, 8)
    np.testing.assert_array_equal(got[:, 2:, :12, :4], data[:, 0:4, 20:32, 28:32])
    assert (
        (got[:, :2] == -1).all() and (got[:, :, 12:] == -1).all() and (got[:, :, :, 4:] == -1).all()
    )


def test_open_missing_array_is_a_clear_error(tmp_path):
    with pytest.raises(store.StoreError, match="no array 'image'"):
        store.open_array(tmp_path, "image")
