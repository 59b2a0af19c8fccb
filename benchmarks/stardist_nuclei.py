"""The first run on an image nobody here made: stardist's bundled 3-D nuclei image.

The stardist wheel (BSD-3-Clause) ships ``stardist/data/images/img3d.tif`` (31 x 61 x 57 uint16,
one channel, no voxel size; its docstring calls it synthetic) with its instance mask
``mask3d.tif`` (51 nuclei). The wheel is fetched from the package registry with pip into
``--cache`` (nothing else is downloaded) and the two files and the licence are read from it.

The run: cells are the mask's nuclei (centroids, one count each of a single "nucleus" gene);
the denoiser (the committed architecture, one gene, sub-bin offsets) is trained briefly on the
image (its one channel as both stains, 1 µm voxels assumed, the whole image for validation as
well: it is too small to hold a part out); a volume of the image's shape is generated from those
cells with the default lattice; and measured: conditioning fidelity (per-bin DAPI against cells
per bin) and the nuclei counted in the generated DAPI, each beside the same measure of the real
image. Prints JSON (``--json`` also writes it); everything is written inside ``--work``.

    python benchmarks/stardist_nuclei.py --work /tmp/stardist [--steps 600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from output import emit  # noqa: E402

from models.denoiser import DenoiserConfig  # noqa: E402
from tera_pipeline.core.cluster_spec import ClusterSpec  # noqa: E402
from tera_pipeline.core.config import JobConfig  # noqa: E402
from tera_pipeline.core.geometry import Box, bin_box  # noqa: E402
from tera_pipeline.evaluation.fidelity import conditioning_fidelity  # noqa: E402
from tera_pipeline.evaluation.metrics import detect_nuclei  # noqa: E402
from tera_pipeline.generation import lifecycle  # noqa: E402
from tera_pipeline.inputs.conditioning import rasterize  # noqa: E402
from tera_pipeline.inputs.synthetic import CellTable  # noqa: E402
from tera_pipeline.runtime.cluster import cluster_client  # noqa: E402
from tera_pipeline.storage import layout, store  # noqa: E402
from tera_pipeline.training.denoiser import TrainingData, train_denoiser  # noqa: E402
from tera_pipeline.training.loop import Recipe  # noqa: E402

WHEEL = "stardist==0.9.2"
FILES = ("stardist/data/images/img3d.tif", "stardist/data/images/mask3d.tif")
SPACING = (1.0, 1.0, 1.0)
BIN = (1, 16, 16)


def fetch(cache: Path) -> dict:
    """The image, the mask and the licence text from the stardist wheel (pip, the registry)."""
    import tifffile

    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("stardist-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary", ":all:", WHEEL, "-d", str(cache)], check=True)  # fmt: skip
        wheels = sorted(cache.glob("stardist-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as whl:
        licence = next(n for n in whl.namelist() if n.endswith(("LICENSE", "LICENSE.txt")))
        out = {"wheel": wheels[-1].name, "licence": whl.read(licence).decode()[:200]}
        for name in FILES:
            (cache / Path(name).name).write_bytes(whl.read(name))
    out["image"] = tifffile.imread(cache / "img3d.tif")
    out["mask"] = tifffile.imread(cache / "mask3d.tif")
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image.astype(np.float64), (0.5, 99.8))
    return np.clip((image - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)


def nuclei_cells(mask: np.ndarray) -> CellTable:
    """One cell per labelled nucleus at its centroid (µm), one count of the gene "nucleus"."""
    from scipy import ndimage

    labels = np.unique(mask[mask > 0])
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(mask), mask, labels))
    position = (centres + 0.5) * np.asarray(SPACING)
    return CellTable(position, np.ones((len(labels), 1), np.float32), ("nucleus",))


def fidelity_of(dapi: np.ndarray, cells: CellTable) -> float:
    """Pearson r of per-bin mean DAPI against cells per bin (as ``conditioning_fidelity``)."""
    shape = dapi.shape
    bins = bin_box(Box((0, 0, 0), shape), BIN)
    counts = rasterize(cells, bins, SPACING, BIN)[0]
    padded = np.full((shape[0], bins.shape[1] * 16, bins.shape[2] * 16), np.nan)
    padded[:, : shape[1], : shape[2]] = dapi
    means = np.nanmean(padded.reshape(shape[0], bins.shape[1], 16, bins.shape[2], 16), (2, 4))
    return float(np.corrcoef(means.ravel(), counts.ravel())[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="where the wheel goes (default: WORK/cache)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = args.work.resolve()
    data = fetch(args.cache or work / "cache")
    real = to_uint8(data["image"])
    cells = nuclei_cells(data["mask"])
    image = np.stack([real, real]).astype(np.float32) / 127.5 - 1.0  # one channel as both
    box = Box((0, 0, 0), real.shape)
    cond = rasterize(cells, bin_box(box, BIN), SPACING, BIN)
    train = TrainingData(image, cond, cells.genes, BIN)
    checkpoint = work / "stardist_denoiser.safetensors"
    t0 = time.perf_counter()
    history = train_denoiser(
        checkpoint, args.steps, Recipe(batch=8, lr=2e-3), volume=real.shape, spacing_um=SPACING,
        bin_shape=BIN, model_config=DenoiserConfig(sub_bin_offsets=True), data=(train, train),
        log_every=max(args.steps // 4, 1),
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    table = work / "nuclei.csv"
    zyx = cells.position_um
    table.write_text("x,y,z,nucleus\n" + "".join(f"{x},{y},{z},1\n" for z, y, x in zyx.tolist()))
    job = JobConfig.model_validate({
        "out": str(work / "stardist.zarr"), "volume": {"shape": real.shape, "spacing_um": SPACING},
        "storage": {"block": (16, 64, 64)}, "conditioning": {"source": str(table)},
        "checkpoint": str(checkpoint),
    })  # fmt: skip
    spec = ClusterSpec(kind="local", workers=2, dashboard_address=":0")
    with cluster_client(spec) as client:
        lifecycle.generate(job, client)
    generated = store.read_box(store.open_array(job.out, layout.IMAGE), box)[0]
    result = {
        "benchmark": "stardist_nuclei",
        "wheel": data["wheel"],
        "licence_starts": data["licence"].splitlines()[0],
        "image": list(real.shape),
        "nuclei_in_mask": len(cells),
        "training": {"steps": args.steps, "seconds": round(train_s, 1), "last": history[-1]},
        "generated": {
            "fidelity_r": round(conditioning_fidelity(Path(job.out))["pearson_r"], 3),
            "nuclei_counted": detect_nuclei(generated, SPACING)["count"],
        },
        "real_image": {
            "fidelity_r": round(fidelity_of(real.astype(np.float64), cells), 3),
            "nuclei_counted": detect_nuclei(real, SPACING)["count"],
        },
        "load_average": os.getloadavg(),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
