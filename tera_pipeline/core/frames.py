"""The frame each step's state is stored in, and the voxels a block computes.

Where a step's lattice is wrapped on every axis (the volume a torus of whole patches) and blocks
are whole patches, a block computes in that lattice's frame: its storage box moved by the
lattice's offset holds whole patches, so it reads one box of the state and predicts every patch
it needs itself, with no halo and no seam files (SpotDiffusion's roll of the latent, block by
block). It writes the new state at its own storage box, so the state after such a step is stored
*rolled* by the step's offset: position ``v`` at ``(v - offset) mod volume``. The last step
(with ``storage.final_step_rolled``) computes so too and stores its uint8 image rolled, in
scratch; the *image phase* after it reads each block's core back in the volume's frame and
writes the image, which is never rolled. Otherwise the last step computes in the volume's frame
(the halo path). Either way every patch sees the same voxels: the image is bitwise that of the
halo path.
"""

from __future__ import annotations

from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box, Shape


def rolls(config: JobConfig, step: int) -> bool:
    """Whether step ``step``'s blocks compute in their lattice's frame."""
    last = config.diffusion.steps - 1
    if not config.storage.scratch_rolled or not 0 <= step <= last:
        return False
    if step == last and not config.storage.final_step_rolled:
        return False
    lattice = config.lattice_at(step)
    return (
        lattice.wrapped
        and all(lattice.wrap_axes(config.volume.shape))
        and all(b % p == 0 for b, p in zip(config.storage.block, lattice.patch, strict=True))
    )


def rolls_any(config: JobConfig) -> bool:
    """Whether any step of the job stores its state (the input of a next step) rolled."""
    return any(rolls(config, step) for step in range(config.diffusion.steps - 1))


def unrolls(config: JobConfig) -> bool:
    """Whether the job ends with the image phase: its last step rolls."""
    return rolls(config, config.diffusion.steps - 1)


def image_phase(config: JobConfig) -> int:
    """The ledger row of the blocks that write the image: the image phase (``steps + 1``), or
    the last step (``steps``; row 0 is the conditioning, row k + 1 step k)."""
    return config.diffusion.steps + unrolls(config)


def state_frame(config: JobConfig, step: int) -> Shape:
    """The roll of the state step ``step`` reads (the one step ``step - 1`` wrote; at
    ``step = steps``, the image phase's: the last step's image)."""
    if step >= 1 and rolls(config, step - 1):
        return config.lattice_at(step - 1).offset
    return (0, 0, 0)


def computed_box(config: JobConfig, step: int, core: Box) -> Box:
    """The voxels the block of storage box ``core`` computes at ``step`` (and writes at
    ``core``): the core itself, or the core moved by the step's lattice offset."""
    return core.moved(config.lattice_at(step).offset) if rolls(config, step) else core
