"""SPATIA's model applied to cells and to sets of cells, shared by the block tasks, training and
the benchmark: cells go through the encoder in fixed-size batches (padded), and each set through
the context transformer alone, so a result never depends on which block or batch it came in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.spatia import Spatia
from tera_pipeline.core.intensity import from_uint8

BATCH = 64
"""Cells per encoder call; every call is padded to this many, so results do not depend on
which block or batch a cell comes in."""


@torch.no_grad()
def encode_cells(
    model: Spatia, crops: np.ndarray, counts: np.ndarray, gene_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Fused embeddings, imputed expression (ZINB mean) and type probabilities of cells, in
    fixed batches of ``BATCH`` (padded)."""
    dev = device_of(model)
    n = len(counts)
    out: dict[str, list] = {"embedding": [], "imputed": [], "type_prob": []}
    for s in range(0, n, BATCH):
        k = min(BATCH, n - s)
        x = np.zeros((BATCH, *crops.shape[1:]), np.float32)
        c = np.zeros((BATCH, counts.shape[1]), np.float32)
        x[:k], c[:k] = from_uint8(crops[s : s + k]), counts[s : s + k]
        m = None
        if gene_mask is not None:
            m = torch.zeros(BATCH, counts.shape[1], dtype=torch.bool)
            m[:k] = torch.from_numpy(gene_mask[s : s + k])
        if m is not None:
            m = m.to(dev)
        o = model.cell(torch.from_numpy(x).to(dev), torch.from_numpy(c).to(dev), m)
        out["embedding"].append(o.embedding[:k].cpu().numpy())
        out["imputed"].append(o.mean[:k].cpu().numpy())
        if o.type_logits is not None:
            out["type_prob"].append(torch.softmax(o.type_logits[:k], dim=1).cpu().numpy())
    return {k: np.concatenate(v) if v else None for k, v in out.items()}


@torch.no_grad()
def contextualise(
    encoder, features: np.ndarray, positions: np.ndarray, groups: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Run a context transformer over each group (one set at a time: a set's result depends on
    its members only). Returns (member embeddings (N, E), set embeddings (K, E))."""
    dev = device_of(encoder)
    members = np.zeros_like(features)
    pooled = np.zeros((len(groups), features.shape[1]), np.float32)
    for k, idx in enumerate(groups):
        x = torch.from_numpy(features[idx][None]).to(dev)
        pos = torch.from_numpy(positions[idx][None].astype(np.float32)).to(dev)
        out, summary = encoder(x, pos, torch.ones(1, len(idx), dtype=torch.bool, device=dev))
        members[idx] = out[0].cpu().numpy()
        pooled[k] = summary[0].cpu().numpy()
    return members, pooled


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def group_by(index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique rows of ``index`` (lexicographic) and the member indices of each."""
    keys, inverse = np.unique(index, axis=0, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=len(keys)))[:-1]
    return keys, np.split(order, bounds)
