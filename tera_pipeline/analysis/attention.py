"""Tera-MIND's gene-gene attention analysis over the chunk grid.

For every lattice patch origin (one per stride tile), the denoiser's gene encoder reads the
patch's gene window from the store's conditioning and yields its gene x gene self-attention
softmax(QK^T) (last layer, mean over heads). Block tasks write, on the grid:

- ``attention_pairs`` (pair, zpatch, ypatch, xpatch): the attention level of named gene pairs,
  (A[a, b] + A[b, a]) / 2, one value per patch origin;
- ``attention_matrix`` (zblock, yblock, xblock, gene, gene_to): the mean matrix of each block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import AnalysisError
from tera_pipeline.core.geometry import Box, bounding_box, gene_window
from tera_pipeline.generation import integrity
from tera_pipeline.generation.predictor import get_predictor
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.cluster import gpu_task
from tera_pipeline.storage import layout, store

PAIRS_ARRAY = "attention_pairs"
MATRIX_ARRAY = "attention_matrix"
DEFAULT_PAIRS = (("Slc17a6", "Slc17a7"), ("Nr4a2", "Th"), ("Cldn5", "Aqp4"))


def parse_pairs(text: str | None, genes: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """'A/B,C/D' -> (("A", "B"), ("C", "D")), every gene checked against the panel."""
    pairs = (
        DEFAULT_PAIRS
        if not text
        else tuple(tuple(p.strip().split("/")) for p in text.split(",") if p.strip())
    )
    for pair in pairs:
        if len(pair) != 2:
            raise AnalysisError(f"gene pairs are written A/B, got {'/'.join(pair)!r}")
        unknown = [g for g in pair if g not in genes]
        if unknown:
            raise AnalysisError(f"genes {unknown} of pair {'/'.join(pair)} are not in the panel")
    return pairs  # type: ignore[return-value]


def prepare(root: Path, pairs: Sequence[tuple[str, str]]) -> tuple[JobConfig, str]:
    """Create the analysis arrays in the store; returns the job and its checkpoint path."""
    from tera_pipeline.storage.layout import job_of

    job = job_of(root)
    integrity.require_intact(job, image=False)  # a lost shard would read as zeros
    if not (Path(root) / layout.CONDITIONING / "zarr.json").is_file():
        raise AnalysisError(f"{root} has no conditioning array to analyse")
    attrs = store.group_attrs(root)["tera_pipeline"]
    checkpoint = attrs["checkpoint"]["path"]
    genes = attrs["genes"]
    grid, lattice = job.grid(), job.lattice_obj()
    tiles = tuple(-(-v // s) for v, s in zip(job.volume.shape, lattice.stride))
    per_block = tuple(b // s for b, s in zip(job.storage.block, lattice.stride))
    coords = {
        "pair": (np.asarray(["/".join(p) for p in pairs], dtype=object), {}),
        "gene_to": (np.asarray(genes, dtype=object), {}),
    }
    coords |= layout.grid_coordinates(job.volume, "patch", tiles, lattice.patch, lattice.stride)
    coords |= layout.grid_coordinates(job.volume, "block", grid.shape, job.storage.block)
    store.add_coordinates(root, coords)
    store.create_array(
        root,
        store.ArraySpec(
            PAIRS_ARRAY,
            (len(pairs), *tiles),
            "float32",
            ("pair", "zpatch", "ypatch", "xpatch"),
            (len(pairs), *per_block),
            attributes={
                "long_name": "gene-gene attention level",
                "pairs": ["/".join(p) for p in pairs],
            },
        ),
    )
    g = len(genes)
    store.create_array(
        root,
        store.ArraySpec(
            MATRIX_ARRAY,
            (*grid.shape, g, g),
            "float32",
            ("zblock", "yblock", "xblock", "gene", "gene_to"),
            (1, 1, 1, g, g),
            attributes={"long_name": "mean gene-gene self-attention per block"},
        ),
    )
    return job, checkpoint


@gpu_task
def attention_block(
    job: JobConfig, checkpoint: str, pairs: tuple, index: tuple[int, ...]
) -> tasks.BlockStats:
    """Attention of every patch origin in one block's core; writes pair maps and the mean."""
    predictor = get_predictor(checkpoint, job.batch_size)
    root, lattice = Path(job.out), job.lattice_obj()
    core = job.grid().block(index).core
    genes = list(layout.job_genes(root))
    gi = [(genes.index(a), genes.index(b)) for a, b in pairs]
    tiles = Box(
        [c // s for c, s in zip(core.begin, lattice.stride)],
        [-(-n // s) for n, s in zip(core.shape, lattice.stride)],
    )
    origins = [
        tuple((t + b) * s for t, b, s in zip(i, tiles.begin, lattice.stride))
        for i in np.ndindex(*tiles.shape)
    ]
    b, cfg = job.conditioning.bin, predictor.config
    boxes = [
        gene_window(Box(o, lattice.patch), b, cfg.cond_footprint, cfg.cond_context)[0]
        for o in origins
    ]
    cond_span = bounding_box(boxes)
    cond = store.read_box(store.open_array(root, layout.CONDITIONING), cond_span)
    stack = np.stack([cond[(slice(None), *w.slices(cond_span))] for w in boxes])
    stack = stack.astype(np.float32)
    with torch.inference_mode():
        model = predictor.model
        attn = model.gene_attention(torch.from_numpy(stack).to(predictor.device)).float().cpu()
    attn = attn.numpy().reshape(*tiles.shape, len(genes), len(genes))
    levels = np.stack([(attn[..., i, j] + attn[..., j, i]) / 2 for i, j in gi])
    store.write_box(store.open_array(root, PAIRS_ARRAY), tiles, levels)
    matrix = attn.reshape(-1, len(genes), len(genes)).mean(axis=0)
    arr = store.open_array(root, MATRIX_ARRAY)
    arr[index[0], index[1], index[2]].write(matrix).result()
    return tasks.BlockStats(items=len(origins))


def run(root: Path, client, pairs_text: str | None = None, progress=None) -> dict:
    """Run the analysis over every block; returns the volume's mean matrix and the pairs."""
    root = Path(root)
    genes = store.group_attrs(root).get("tera_pipeline", {}).get("genes", [])
    pairs = parse_pairs(pairs_text, genes)
    job, checkpoint = prepare(root, pairs)
    grid = job.grid()
    blocks = np.ndindex(*grid.shape)
    phase = tasks.BlockTask(
        "attention", attention_block, (job, checkpoint, pairs), blocks, grid.num_blocks
    )
    tasks.run_task(client, job, phase, progress)
    store.consolidate(root)
    matrix = store.open_array(root, MATRIX_ARRAY).read().result()
    return {
        "pairs": ["/".join(p) for p in pairs],
        "genes": genes,
        "mean_matrix": matrix.reshape(-1, len(genes), len(genes)).mean(axis=0),
    }


def heatmap_png(result: dict, root: Path, out: Path) -> Path:
    """The volume's mean gene x gene attention and each pair's map at the middle z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = store.open_array(root, PAIRS_ARRAY).read().result()
    n = len(result["pairs"])
    fig, ax = plt.subplots(1, n + 1, figsize=(6 + 4 * n, 5.5))
    genes = result["genes"]
    im = ax[0].imshow(result["mean_matrix"], cmap="viridis")
    ax[0].set_xticks(range(len(genes)), genes, rotation=90, fontsize=6)
    ax[0].set_yticks(range(len(genes)), genes, fontsize=6)
    ax[0].set_title("gene-gene self-attention (mean)")
    fig.colorbar(im, ax=ax[0], fraction=0.046)
    z = levels.shape[1] // 2
    for k, name in enumerate(result["pairs"]):
        im = ax[k + 1].imshow(levels[k, z], cmap="magma")
        ax[k + 1].set_title(f"{name} attention (z patch {z})")
        fig.colorbar(im, ax=ax[k + 1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
