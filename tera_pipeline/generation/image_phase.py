"""The image phase: where the last step computed in its lattice's frame (``core.frames``), its
uint8 image is stored rolled in scratch; this phase reads each block's core of it back in the
volume's frame and writes it to the image. A block's read is one box of raw chunks; its write,
one shard of the image, as the last step's write was in the halo path."""

from __future__ import annotations

import time
from pathlib import Path

from tera_pipeline.core import frames
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box
from tera_pipeline.runtime.tasks import BlockStats
from tera_pipeline.storage import store
from tera_pipeline.storage.layout import IMAGE, ROLLED_IMAGE


def unroll_block(config: JobConfig, index: tuple[int, ...]) -> BlockStats:
    """The image phase of one block: its core of the last step's image, stored rolled, read
    back in the volume's frame and written to the image."""
    t0 = time.perf_counter()
    root, frame = Path(config.out), frames.state_frame(config, config.diffusion.steps)
    box, wrap = image_read(config, index)
    image = store.read_box(store.open_array(root, ROLLED_IMAGE), box, wrap=wrap, frame=frame)
    stats = BlockStats(read_s=time.perf_counter() - t0)
    tw = time.perf_counter()
    stats.digest = store.write_box(store.open_array(root, IMAGE), box, image)
    stats.write_s = time.perf_counter() - tw
    stats.total_s = time.perf_counter() - t0
    return stats


def image_read(config: JobConfig, index: tuple[int, ...]) -> tuple[Box, tuple[bool, ...]]:
    """The box the image phase reads for block ``index`` (its core, in the volume's frame) and
    the axes on which the rolled image wraps."""
    grid = config.grid(config.diffusion.steps - 1)
    return grid.block(index).core, grid.lattice.wrap_axes(grid.volume)
