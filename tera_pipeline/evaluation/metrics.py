"""Generation quality: seams, agreement with a ground-truth render, and detected nuclei.

Every measure reads the store slab by slab (z), so memory follows one slice, not the volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from tera_pipeline.analysis.cells import otsu_threshold
from tera_pipeline.core.config import JobConfig
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import IMAGE


def _image(root: Path) -> np.ndarray:
    return store.open_array(root, IMAGE)


def seam_score(
    root: Path, faces: tuple[int, int], stain: int = 0, offsets: tuple[int, int] = (0, 0)
) -> dict:
    """Mean |gradient| across faces over mean |gradient| elsewhere, along y and x.

    ``faces`` are the in-plane periods (y, x) of the faces to test, starting at ``offsets``: the
    patch stride (every block face is also a patch face) for the engine, the patch size for naive
    tiling, a shifted lattice's stride and offset. A seamless image scores 1; visible tile edges
    score above 1.
    """
    return lattice_seam_scores(root, [(faces, offsets)], stain)[0]


def lattice_seam_scores(
    root: Path, lattices: list[tuple[tuple[int, int], tuple[int, int]]], stain: int = 0
) -> list[dict]:
    """``seam_score`` for each (periods, offsets) of ``lattices``, reading the image once."""
    image = _image(root)
    sums = np.zeros((len(lattices), 4))  # across sum, across count, elsewhere sum, count
    for z in range(image.shape[1]):
        plane = image[stain, z].read().result().astype(np.float64)
        for axis in (0, 1):
            grad = np.abs(np.diff(plane, axis=axis))  # grad[i] is between voxel i and i+1
            per_line = grad.sum(axis=1 - axis)  # one total per face position
            others = grad.shape[1 - axis]
            for n, (periods, offsets) in enumerate(lattices):
                face = (np.arange(grad.shape[axis]) + 1 - offsets[axis]) % periods[axis] == 0
                sums[n] += (per_line[face].sum(), face.sum() * others,
                            per_line[~face].sum(), (~face).sum() * others)  # fmt: skip
    out = []
    for (periods, offsets), (a_sum, a_n, e_sum, e_n) in zip(lattices, sums, strict=True):
        a, e = a_sum / max(a_n, 1), e_sum / max(e_n, 1)
        out.append({"seam_score": a / e if e > 0 else float("nan"), "grad_across": a,
                    "grad_elsewhere": e, "face_period": list(periods),
                    "face_offset": list(offsets)})  # fmt: skip
    return out


def z_seam_scores(root: Path, lattices: list[tuple[int, int]], stain: int = 0) -> list[float]:
    """Mean |gradient| across z faces over mean |gradient| across other slices, for each
    (period, offset) of ``lattices`` (1 = seamless)."""
    image = _image(root)
    per_gap, previous = [], None
    for z in range(image.shape[1]):
        plane = image[stain, z].read().result().astype(np.float64)
        if previous is not None:
            per_gap.append(float(np.abs(plane - previous).mean()))  # between slices z - 1, z
        previous = plane
    gaps = np.asarray(per_gap)
    out = []
    for period, offset in lattices:
        face = (np.arange(len(gaps)) + 1 - offset) % period == 0
        inside = gaps[~face].mean() if (~face).any() else float("nan")
        out.append(float(gaps[face].mean() / inside) if face.any() else float("nan"))
    return out


def run_seam_scores(root: Path, job: JobConfig) -> dict:
    """The seam scores of a run: in-plane at the faces of its lattice's stride (``seam_score``,
    as before the shifted mode), at the faces of the lattice its last step used (what nothing
    healed), and the mean over the lattices of all its steps; across z, that mean too."""
    lattices = [job.lattice_at(k) for k in range(job.diffusion.steps)]
    faces = [((la.stride[1], la.stride[2]), (la.offset[1], la.offset[2])) for la in lattices]
    stride = job.lattice.stride
    distinct = sorted(set(faces) | {((stride[1], stride[2]), (0, 0))})
    scores = dict(zip(distinct, lattice_seam_scores(root, distinct), strict=True))
    z_faces = [(la.stride[0], la.offset[0]) for la in lattices]
    z_distinct = sorted(set(z_faces))
    z_scores = dict(zip(z_distinct, z_seam_scores(root, z_distinct), strict=True))
    return {
        "seam_score": scores[((stride[1], stride[2]), (0, 0))]["seam_score"],
        "seam_score_final_lattice": scores[faces[-1]]["seam_score"],
        "seam_score_all_lattices": float(np.mean([scores[f]["seam_score"] for f in faces])),
        "seam_score_z_all_lattices": float(np.nanmean([z_scores[f] for f in z_faces])),
    }


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, data_range: float = 255.0) -> float:
    """Mean structural similarity of two 2-D images (Gaussian window, Wang et al. 2004)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = ndimage.gaussian_filter(a, sigma), ndimage.gaussian_filter(b, sigma)
    var_a = ndimage.gaussian_filter(a * a, sigma) - mu_a**2
    var_b = ndimage.gaussian_filter(b * b, sigma) - mu_b**2
    cov = ndimage.gaussian_filter(a * b, sigma) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def compare_to_truth(root: Path, truth: Callable[[int], np.ndarray]) -> dict:
    """SSIM and PSNR per slice and stain against ``truth(z)``, a (c, y, x) uint8 slice."""
    image = _image(root)
    per = {"ssim": [], "psnr": []}
    for z in range(image.shape[1]):
        gen, ref = image[:, z].read().result(), truth(z)
        per["ssim"].append([ssim(gen[c], ref[c]) for c in range(gen.shape[0])])
        per["psnr"].append([psnr(gen[c], ref[c]) for c in range(gen.shape[0])])
    s, p = np.asarray(per["ssim"]), np.asarray(per["psnr"])
    return {"ssim_mean": s.mean(axis=0).tolist(), "psnr_mean": p.mean(axis=0).tolist(),
            "ssim_per_slice": s.tolist(), "psnr_per_slice": p.tolist()}  # fmt: skip


def detect_nuclei(volume: np.ndarray, spacing_um, min_voxels: int = 8) -> dict:
    """Nuclei in a DAPI volume (z, y, x): Otsu foreground, 3-D components, split by the distance
    transform's maxima. Returns count and equivalent-sphere radii in µm."""
    fg = volume > otsu_threshold(volume)
    labels, n = ndimage.label(fg)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=index)
    keep = sizes >= min_voxels
    # touching nuclei: one per in-plane maximum of the distance to the background
    dist = ndimage.distance_transform_edt(fg, sampling=spacing_um)
    peaks = (dist == ndimage.maximum_filter(dist, size=(3, 5, 5))) & (dist > 1.0)
    peak_regions, n_peaks = ndimage.label(peaks)
    owner = ndimage.maximum(labels, peak_regions, index=np.arange(1, n_peaks + 1)).astype(int)
    per_component = np.bincount(owner, minlength=n + 1)[1:]
    count = int(np.maximum(per_component[keep], 1).sum())
    voxel_um3 = float(np.prod(spacing_um))
    radii = np.cbrt(sizes[keep] * voxel_um3 * 3 / (4 * np.pi))
    return {"count": count, "components": int(keep.sum()), "radius_um": radii.tolist()}
