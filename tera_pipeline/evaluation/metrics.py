"""Generation quality: seams, agreement with a ground-truth render, and detected nuclei.

Every measure reads the store slab by slab (z), so memory follows one slice, not the volume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from tera_pipeline.analysis.cells import otsu_threshold
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import IMAGE


def _image(root: Path) -> np.ndarray:
    return store.open_array(root, IMAGE)


def seam_score(root: Path, faces: tuple[int, int], stain: int = 0) -> dict:
    """Mean |gradient| across faces over mean |gradient| elsewhere, along y and x.

    ``faces`` are the in-plane periods (y, x) of the faces to test: the patch stride (every block
    face is also a patch face) for the engine, the patch size for naive tiling. A seamless image
    scores 1; visible tile edges score above 1.
    """
    image = _image(root)
    across, elsewhere = [0.0, 0], [0.0, 0]
    for z in range(image.shape[1]):
        plane = image[stain, z].read().result().astype(np.float64)
        for axis, period in ((0, faces[0]), (1, faces[1])):
            grad = np.abs(np.diff(plane, axis=axis))  # grad[i] is between voxel i and i+1
            face = (np.arange(grad.shape[axis]) + 1) % period == 0
            sel = [slice(None), slice(None)]
            sel[axis] = face
            across[0] += grad[tuple(sel)].sum()
            across[1] += grad[tuple(sel)].size
            sel[axis] = ~face
            elsewhere[0] += grad[tuple(sel)].sum()
            elsewhere[1] += grad[tuple(sel)].size
    a, e = across[0] / max(across[1], 1), elsewhere[0] / max(elsewhere[1], 1)
    return {"seam_score": a / e if e > 0 else float("nan"), "grad_across": a, "grad_elsewhere": e,
            "face_period": list(faces)}  # fmt: skip


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
