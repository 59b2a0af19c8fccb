"""Keyed sampling: what makes a training run independent of how many processes share it.

The global batch of step ``s`` is ``B`` samples; sample ``i`` is drawn from a random stream keyed
by (seed, s, i) alone, never from one running stream. Rank ``r`` of ``W`` processes, in
micro-batch ``m`` of ``N`` (gradient accumulation), takes the samples ``shard(B, r, W, N, m)``;
together they draw exactly the one-process batch, and a resumed run needs nothing but the step.

A stage's draw is ``draw(step, indices) -> batch``. A model whose draws come from a running
stream instead (``streamed``) draws ``len(indices)`` samples from it: the same batches as
before in one process, other (equally distributed) ones on several.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

Batch = TypeVar("Batch")
NOISE_DOMAIN = 2
"""The spawn key of a sample's diffusion noise and timestep (its patch draw uses none, its
validation draws 1: ``training/store_patches.py``)."""


def keyed_rng(seed: int, step: int, index: int, domain: int | None = None) -> np.random.Generator:
    """The random stream of sample ``index`` of step ``step`` (``domain``: one of its streams)."""
    spawn_key = () if domain is None else (domain,)
    return np.random.default_rng(np.random.SeedSequence((seed, step, index), spawn_key=spawn_key))


def shard(batch: int, rank: int = 0, world: int = 1, parts: int = 1, part: int = 0) -> range:
    """The global sample indices of ``rank``'s ``part``-th micro-batch of ``parts``."""
    if batch % (world * parts):
        raise ValueError(
            f"batch {batch} must be divisible by processes x accumulation = {world} x {parts}"
        )
    size = batch // (world * parts)
    start = rank * (batch // world) + part * size
    return range(start, start + size)


def streamed(draw_n: Callable[[int], Batch]) -> Callable[[int, Sequence[int]], Batch]:
    """A keyed draw from a running-stream draw of ``n`` samples: it draws ``len(indices)``."""

    def draw(step: int, indices: Sequence[int]) -> Batch:
        return draw_n(len(indices))

    return draw
