"""Is every block the ledger calls done really on disk? Verify, refuse, repair.

Each finished block's digest (CRC-32 of the bytes it wrote) is in the ledger's ``_digests``.
``verify`` reads the blocks back and names every block that is missing (a deleted shard reads
as fill), unreadable (a truncated shard) or different, and every array whose metadata cannot be
read. What is checked: the conditioning (phase 0), and the latest output of the denoising: the
image for blocks of its phase (the last step, or the image phase where the last step rolled),
the state (or the rolled image) of the last phases while scratch exists.
``quick`` reads one voxel per block (enough to find deleted or truncated shards) for the
analyses.

``repair`` restores exactly the bad blocks, bitwise as an uninterrupted run would have written
them: array metadata is rewritten from the job's layout (shards untouched); conditioning blocks
are rasterised again; a bad image block of a finished store is recomputed from the initial
noise over its dependency cone (at step k, every block whose core the step k + 1 cone reads:
the exact halo; the image phase's rolled reads); in an unfinished run, bad scratch restarts the
denoising from step 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tera_pipeline.core import frames
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import TeraError
from tera_pipeline.core.geometry import Box, bin_box, cells_touching
from tera_pipeline.generation import block_step, lifecycle
from tera_pipeline.storage import layout, ledger, store

Index = tuple[int, int, int]


class IntegrityError(TeraError):
    """Blocks the ledger calls done are missing or corrupt."""


@dataclass
class Damage:
    """What verification found: bad blocks per ledger phase, arrays with unreadable metadata."""

    blocks: dict[int, list[Index]] = field(default_factory=dict)
    arrays: list[str] = field(default_factory=list)
    checked: int = 0

    def __bool__(self) -> bool:
        return bool(self.arrays) or any(self.blocks.values())

    def describe(self, steps: int) -> str:
        parts = [f"{name} metadata unreadable" for name in self.arrays]
        for phase, bad in sorted(self.blocks.items()):
            if bad:
                what = ledger.phase_name(phase, steps)
                shown = ", ".join(str(b) for b in bad[:4]) + (" ..." if len(bad) > 4 else "")
                parts.append(f"{what}: {len(bad)} block(s) {shown}")
        return "; ".join(parts)


def _outputs(config: JobConfig, phase: int, root: Path) -> list[tuple[str, callable]]:
    """(array, box of a block) that ``phase`` wrote, as they are still expected on disk."""
    b = config.conditioning.bin
    if phase == 0:
        return [(layout.CONDITIONING, lambda core: bin_box(core, b)),
                (layout.CELL_COUNT, lambda core: bin_box(core, b))]  # fmt: skip
    if phase == frames.image_phase(config):
        return [(layout.IMAGE, lambda core: core)]
    return [(name, lambda core: core) for name in layout.scratch_arrays(config, phase)]


def _phases_to_check(config: JobConfig, root: Path) -> list[int]:
    """Conditioning, the image, and while scratch exists the last two denoising phases (older
    states have been overwritten by design)."""
    image = frames.image_phase(config)
    progress = ledger.progress(root)
    phases = [0, image]
    if (root / layout.STATES[0] / "zarr.json").is_file():
        started = [p for p in range(1, image) if progress[p][0]]
        phases += started[-2:]
    return sorted(set(phases))


def verify(config: JobConfig, quick: bool = False, phases: list[int] | None = None) -> Damage:
    """Check every finished block of the phases whose output is still on disk (or of those of
    ``phases``: 0 the conditioning, ``frames.image_phase`` the image)."""
    root = Path(config.out)
    config = ledger.as_laid_out(config, root)
    grid = config.grid()
    damage = Damage()
    store.forget_handles()
    for phase in _phases_to_check(config, root):
        if phases is not None and phase not in phases:
            continue
        arrays = []
        for name, box_of in _outputs(config, phase, root):
            try:
                arrays.append((store.open_array(root, name), box_of))
            except Exception:  # noqa: BLE001 - unreadable metadata, any way it fails
                damage.arrays.append(name)
        if len(arrays) < len(_outputs(config, phase, root)):
            damage.blocks[phase] = [i for i, _ in ledger.finished(root, phase)]
            continue
        bad = damage.blocks.setdefault(phase, [])
        for index, digest in ledger.finished(root, phase):
            damage.checked += 1
            if not _block_ok(arrays, grid.block(index).core, digest, quick):
                bad.append(index)
    return damage


def _block_ok(arrays, core: Box, digest: int | None, quick: bool) -> bool:
    crc = 0
    try:
        for array, box_of in arrays:
            box = box_of(core)
            if quick:
                store.read_box(array, Box(box.begin, (1,) * box.ndim))
                continue
            crc = store.digest(store.read_box(array, box), crc)
    except Exception:  # noqa: BLE001 - a truncated or garbled shard
        return False
    return quick or digest is None or crc == digest


def require_intact(
    config: JobConfig, quick: bool = True, image: bool = True, conditioning: bool = True
) -> None:
    """Raise ``IntegrityError`` naming the bad blocks of what the caller reads (analyses call
    this before reading: the image, the conditioning, or both)."""
    config = ledger.as_laid_out(config, config.out)
    phases = [frames.image_phase(config)] * image + [0] * conditioning
    damage = verify(config, quick=quick, phases=phases)
    if damage:
        raise IntegrityError(
            f"{config.out}: blocks the ledger calls done are missing or corrupt "
            f"({damage.describe(config.diffusion.steps)}); restore them with "
            "tera generate --resume --repair"
        )


def check_before_resume(config: JobConfig, repair: bool) -> None:
    """A resume refuses a damaged store unless asked to repair it (a store whose creation was
    cut short has nothing to check: it is created again)."""
    if not ledger.has_ledger(config.out) or not ledger.created(Path(config.out)):
        return
    if not repair:
        require_intact(config, quick=False)


# -- repair ---------------------------------------------------------------------------------------
def rewrite_metadata(config: JobConfig, names: list[str]) -> None:
    """Write the metadata of ``names`` again from the job's layout; their shards are kept."""
    import tensorstore as ts

    root = Path(config.out)
    genes = layout.job_genes(root)
    specs = {s.name: s for s in layout.array_specs(config, genes)}
    for name in names:
        (root / name / "zarr.json").unlink(missing_ok=True)
        ts.open(store._tensorstore_spec(root / name, specs[name]), create=True).result()
    store.forget_handles()


def cone(config: JobConfig, bad: list[Index]) -> list[list[Index]]:
    """Per step k (0 ... steps - 1, then the image phase where the last step rolled), the blocks
    to recompute so that the last of them rewrites exactly the image blocks ``bad``: the blocks
    whose cores the next one's blocks read (their halo spans, or rolled boxes)."""
    phases = frames.image_phase(config)  # steps, and the image phase if any
    cones: list[set[Index]] = [set() for _ in range(phases)]
    cones[-1] = set(bad)
    for k in range(phases - 1, 0, -1):
        for index in cones[k]:
            cones[k - 1].update(_blocks_read_by(config, index, k))
    return [sorted(c) for c in cones]


def _blocks_read_by(config: JobConfig, index: Index, step: int) -> Iterator[Index]:
    """The blocks whose cores block ``index`` reads at ``step`` (its lattice's halo span; at
    ``step = steps``, the image phase's rolled box)."""
    for part in block_step.state_reads(config, step, index):
        yield from (i for i, _ in cells_touching(config.storage.block, part.begin, part.end))


def repair(config: JobConfig, client, checkpoint: Path, progress=None) -> Damage:
    """Restore every bad block found by ``verify``; returns what was found."""
    root = Path(config.out)
    if not ledger.created(root):
        return Damage()
    config = ledger.as_laid_out(config, root)
    damage = verify(config)
    if not damage:
        return damage
    image = frames.image_phase(config)
    if damage.arrays:
        rewrite_metadata(config, damage.arrays)
        damage = verify(config)
    bad0 = damage.blocks.get(0, [])
    if bad0:
        lifecycle.conditioning_pass(config, client, progress, indices=bad0)
    scratch = (root / layout.STATES[0] / "zarr.json").is_file()
    bad_steps = {p: b for p, b in damage.blocks.items() if p > 0 and b}
    if scratch and bad_steps:
        if set(bad_steps) == {image}:
            ledger.unmark(root, image, bad_steps[image])  # their last phase runs again
        else:
            for p in range(1, image + 1):  # an overwritten state cannot be rebuilt block-wise
                ledger.unmark(root, p, list(_all_blocks(config)))
    elif bad_steps.get(image):
        genes = layout.job_genes(root)
        for spec in layout.array_specs(config, genes):
            if spec.name.startswith(f"{store.SCRATCH}/"):
                store.create_array(root, spec)
        for phase, blocks in enumerate(cone(config, bad_steps[image])):
            if phase < config.diffusion.steps:
                lifecycle.denoise_step(config, checkpoint, phase, client, progress, indices=blocks)
            else:
                lifecycle.image_pass(config, client, progress, indices=blocks)
    return damage


def _all_blocks(config: JobConfig) -> Iterator[Index]:
    import numpy as np

    yield from (tuple(int(i) for i in ix) for ix in np.ndindex(*config.grid().shape))
