"""One validated job configuration (pydantic), loadable from YAML, with command-line overrides."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tera_pipeline.core.cluster_spec import ClusterSpec
from tera_pipeline.core.geometry import BlockGrid, GeometryError, PatchLattice
from tera_pipeline.core.mappings import ConfigError, Section, merge, read_yaml_mapping
from tera_pipeline.core.noise import lattice_shift
from tera_pipeline.core.transcript_spec import TranscriptSpec

Triple = tuple[int, int, int]
Positive = Annotated[int, Field(gt=0)]
PositiveTriple = tuple[Positive, Positive, Positive]
"""Voxel counts (z, y, x): each at least 1."""
Seed = Annotated[int, Field(ge=0, lt=2**63)]
"""A random seed: a non-negative 64-bit signed integer."""


class VolumeSpec(Section):
    shape: Triple = (16, 256, 256)
    """Voxels (z, y, x) per stain."""
    spacing_um: tuple[float, float, float] = (4.0, 1.0, 1.0)
    """Voxel size (z, y, x) in µm: positive, finite."""
    origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    stains: tuple[str, ...] = Field(("DAPI", "PolyT"), min_length=1)

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: Triple) -> Triple:
        if any(s <= 0 for s in v):
            raise ValueError(f"volume shape must be positive, got {v}")
        return v

    @field_validator("spacing_um")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"voxel spacing must be positive µm, got {v}")
        return v

    @field_validator("stains")
    @classmethod
    def _stain_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s.strip() for s in v) or len(set(v)) != len(v):
            raise ValueError(f"stain names must be distinct and not blank, got {list(v)}")
        return v


LATTICES = ("wrapped", "shifted", "bin-shifted", "z-shifted", "overlapped")
"""The named lattices (``lattice_preset``); the first is the default, chosen in
docs/PERFORMANCE.md ("Quality against cost")."""


def lattice_preset(name: str, patch: Triple) -> dict[str, object]:
    """The lattice fields of a named lattice for ``patch``: ``shifted`` (stride = patch, moved by
    voxels at every step), ``wrapped`` (the same on a volume whose opposite faces meet, so the
    patch across a face is one patch: E = 1), ``bin-shifted`` (stride = patch, moved by whole
    gene bins), ``z-shifted`` (half-patch stride in y and x, blended; stride = patch in z, moved
    per step), ``overlapped`` (half the patch on every axis, one fixed lattice)."""
    half = tuple(max(p // 2, 1) for p in patch)
    strides = {"shifted": tuple(patch), "wrapped": tuple(patch), "bin-shifted": tuple(patch)}
    strides |= {"z-shifted": (patch[0], *half[1:]), "overlapped": half}
    if name not in strides:
        raise ConfigError(f"unknown lattice {name!r}; choose one of {', '.join(LATTICES)}")
    mode = "overlapped" if name == "overlapped" else "shifted"
    unit = "voxel" if name in ("shifted", "wrapped") else "bin"
    return {
        "lattice.mode": mode,
        "lattice.stride": strides[name],
        "lattice.shift_unit": unit,
        "lattice.wrap": name == "wrapped",
    }


class LatticeSpec(Section):
    patch: PositiveTriple = (4, 32, 32)
    stride: PositiveTriple = (4, 32, 32)
    window: Literal["cosine", "gaussian", "constant"] = "cosine"
    mode: Literal["overlapped", "shifted"] = "shifted"
    """``overlapped``: one fixed lattice of stride ``stride``, predictions blended. ``shifted``:
    on the axes where the stride is the patch (non-overlapping), the lattice is offset at every
    step by a pure function of (seed, step), so one step's seams move at the next (after
    SpotDiffusion); the other axes stay overlapped and blended. Stride = patch on every axis
    (the default, docs/PERFORMANCE.md) predicts each voxel once. A stride given without a mode
    that overlaps on every axis means ``overlapped``."""
    overlapped_final_steps: int = Field(0, ge=0)
    """In ``shifted`` mode, the last steps run on the unshifted lattice of ``final_stride``."""
    final_stride: PositiveTriple | None = None
    """The stride of those last steps; default half the patch (in whole gene bins)."""
    shift_unit: Literal["bin", "voxel"] = "voxel"
    """What ``shifted`` offsets are multiples of: a voxel (a step's seams land anywhere; needs a
    model trained with sub-bin offsets, as the committed one, which reads the stored bins at
    every step), or a gene bin (patches keep whole bins: any model)."""
    wrap: bool = True
    """In ``shifted`` mode, the volume's opposite faces meet (a torus, as SpotDiffusion rolls its
    latent) on the moved axes where it is whole patches: the patch across a face takes the
    voxels beyond it from the opposite face, so a step evaluates volume / patch patches (E = 1)
    instead of one more per axis. Conditioning is read the same way."""

    @property
    def shifted_axes(self) -> tuple[bool, bool, bool]:
        """The axes a ``shifted`` lattice moves: those where the stride is the patch."""
        return tuple(s == p for s, p in zip(self.stride, self.patch))  # type: ignore[return-value]

    @model_validator(mode="before")
    @classmethod
    def _mode_follows_an_overlapping_stride(cls, data: object) -> object:
        if isinstance(data, dict) and "stride" in data and "mode" not in data:
            patch = data.get("patch", cls.model_fields["patch"].default)
            try:
                overlaps = all(int(s) != int(p) for s, p in zip(data["stride"], patch, strict=True))
            except (TypeError, ValueError):
                return data  # the field validators name what is wrong
            if overlaps:
                return {**data, "mode": "overlapped"}
        return data

    @model_validator(mode="after")
    def _shifted_is_non_overlapping(self) -> LatticeSpec:
        if self.mode == "shifted" and not any(self.shifted_axes):
            raise ValueError(
                f"lattice.mode shifted needs stride = patch on the axes it moves (got stride "
                f"{self.stride}, patch {self.patch}): set lattice.mode to overlapped, or "
                f"lattice.stride to the patch on some axes"
            )
        return self


class StorageSpec(Section):
    block: PositiveTriple = (16, 128, 128)
    """Block core (z, y, x): the unit of scheduling and of writing; whole shards and strides."""
    shard: PositiveTriple | None = None
    """Shard shape; defaults to the block, so each block writes exactly one shard."""
    chunk: PositiveTriple | None = None
    """Inner (read) chunk of a shard; defaults to the largest divisor of the shard up to
    (4, 64, 64) per axis."""
    compression_level: int = Field(3, ge=0, le=22)
    scratch_dtype: Literal["float16", "float32"] = "float16"
    scratch_rolled: bool = True
    """Store each step's state in the frame of the lattice that computed it, where that lattice
    is wrapped on every axis and blocks are whole patches (``core.frames``): a block then reads
    one box and computes all its patches itself, with no halo and no seam files. Scratch only:
    the image is the same bitwise."""
    final_step_rolled: bool = True
    """The last step computes in its lattice's frame too (where ``scratch_rolled`` rolls the
    others), its image stored rolled in scratch, and an image phase writes the image in place
    (``core.frames``): no halo and no seam files at the last step either. The image is the same
    bitwise."""
    scratch_codec: Literal["zstd", "lz4", "none"] = "none"
    """Compressor of the scratch state between steps. None by default: a block reads its state
    rolled against the shards, decoding up to 2.8 times its bytes (20.5 ns a voxel with zstd,
    7.4 without: docs/DECISIONS.md); zstd (level 1) writes 8-15 % fewer bytes
    (``benchmarks/scratch_codec.py``) where disk is what runs out."""

    @property
    def shard_shape(self) -> Triple:
        return self.shard or self.block

    @property
    def chunk_shape(self) -> Triple:
        if self.chunk:
            return self.chunk
        return tuple(math.gcd(s, c) for s, c in zip(self.shard_shape, (4, 64, 64)))  # type: ignore[return-value]


class ConditioningSpec(Section):
    source: str = "synthetic"
    """'synthetic' (the embedded brain) or a path: .h5ad, transcript .parquet/.csv, cell .csv."""
    bin: PositiveTriple = (1, 16, 16)
    """Voxels per gene bin (z, y, x); Tera-MIND sums transcripts per 16 x 16 px per slice."""
    gene_panel: Path | None = None
    """Optional panel file (one gene per line); must equal the checkpoint's panel."""
    affine: tuple[tuple[float, ...], ...] | None = None
    """Optional 4 x 4 affine on (z, y, x, 1) µm, applied before subtracting volume.origin_um."""
    drop_outside: bool = False
    """Drop cells outside the volume instead of refusing the input."""
    transcripts: TranscriptSpec = TranscriptSpec()

    @field_validator("affine")
    @classmethod
    def _affine_4x4(cls, v: tuple[tuple[float, ...], ...] | None):
        if v is not None and (len(v) != 4 or any(len(row) != 4 for row in v)):
            raise ValueError("affine must be 4 x 4, acting on (z, y, x, 1)")
        return v


class DiffusionSpec(Section):
    steps: int = Field(8, ge=1, le=1000)
    """Sampling steps (model calls per voxel and patch), at most 1000; 8 by docs/PERFORMANCE.md."""
    eta: float = Field(0.0, ge=0.0, le=1.0)
    """DDIM noise: 0 deterministic, 1 as DDPM."""
    seed: Seed = 0
    sampler: Literal["ddim", "dpmpp_2m"] = "ddim"
    """``ddim``, or ``dpmpp_2m``: DPM-Solver++(2M), second order from the previous step's x0
    prediction (kept as scratch beside the state; deterministic, so ``eta`` must be 0)."""

    @property
    def keeps_previous_x0(self) -> bool:
        """Whether steps read the previous step's x0 (DPM-Solver++ with a second-order step)."""
        return self.sampler == "dpmpp_2m" and self.steps > 2

    @model_validator(mode="after")
    def _deterministic_solver(self) -> DiffusionSpec:
        if self.sampler == "dpmpp_2m" and self.eta:
            raise ValueError(
                f"diffusion.sampler dpmpp_2m is deterministic: eta must be 0 (got {self.eta})"
            )
        return self


class JobConfig(Section):
    """Everything that defines a generation job."""

    out: Path = Path("tera_out.zarr")
    volume: VolumeSpec = VolumeSpec()
    lattice: LatticeSpec = LatticeSpec()
    storage: StorageSpec = StorageSpec()
    conditioning: ConditioningSpec = ConditioningSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    cluster: ClusterSpec = ClusterSpec()
    checkpoint: Path | None = None
    """Denoiser checkpoint; None uses the committed default."""
    synthetic_seed: Seed = 0
    """Seed of the synthetic brain that provides the cells (conditioning source 'synthetic')."""
    batch_size: int = Field(32, ge=1)
    """Patches per denoiser call."""
    blocks_in_flight: int = Field(0, ge=0)
    """Blocks submitted at once per step; 0 means 4 per worker."""
    retries: int = Field(2, ge=0)
    """Retries of a failed block task before the run stops with the block and its error."""
    check_disk_space: bool = True
    """Refuse a job whose output filesystem lacks the bytes it will write (an upper bound)."""
    workers_lost_s: float = Field(120.0, gt=0)
    """A run fails (to be resumed) once its cluster has had no worker for this long."""
    share_seams: bool = True
    """Compute each patch straddling blocks once per step and share it through a scratch file
    (``generation/seams.py``); the same output bytes, fewer evaluations (docs/DECISIONS.md)."""

    @model_validator(mode="after")
    def _layout(self) -> JobConfig:
        try:
            grid = self.grid()
            grid.check_shards(self.storage.shard_shape)
            self.grid(self.diffusion.steps - 1).check_shards(self.storage.shard_shape)
        except GeometryError as err:
            raise ValueError(str(err)) from None
        for axis, (s, c) in enumerate(zip(self.storage.shard_shape, self.storage.chunk_shape)):
            if s % c:
                raise ValueError(
                    f"shard {self.storage.shard_shape} is not a whole number of chunks "
                    f"{self.storage.chunk_shape} (axis {axis})"
                )
        bins = self.conditioning.bin
        last = self.lattice_at(self.diffusion.steps - 1).stride
        for axis, (p, s, b) in enumerate(zip(self.lattice.patch, self.lattice.stride, bins)):
            if last[axis] % b:
                raise ValueError(
                    f"lattice.final_stride {last} must be whole gene bins {bins} (axis {axis})"
                )
            if p % b or s % b:
                raise ValueError(
                    f"patch {self.lattice.patch} and stride {self.lattice.stride} must be whole "
                    f"gene bins {bins} (axis {axis}) so every patch sees whole bins"
                )
        for axis, (blk, b) in enumerate(zip(self.storage.block, bins)):
            if blk % b:
                raise ValueError(
                    f"block {self.storage.block} is not whole bins {bins} (axis {axis})"
                )
        return self

    def lattice_obj(self) -> PatchLattice:
        """The lattice without a shift (the overlapped mode's one lattice)."""
        return PatchLattice(self.lattice.patch, self.lattice.stride)

    def lattice_at(self, step: int) -> PatchLattice:
        """The lattice DDIM step ``step`` denoises on: in ``shifted`` mode offset by
        ``lattice_shift(seed, step)``, else the one lattice."""
        if self.lattice.mode != "shifted":
            return self.lattice_obj()
        if step >= self.diffusion.steps - self.lattice.overlapped_final_steps:
            half = tuple(max(b, p // 2) for p, b in zip(self.lattice.patch, self.conditioning.bin))
            return PatchLattice(self.lattice.patch, self.lattice.final_stride or half)
        unit = (1, 1, 1) if self.lattice.shift_unit == "voxel" else self.conditioning.bin
        drawn = lattice_shift(self.diffusion.seed, step, self.lattice.patch, unit)
        shift = tuple(o if moved else 0 for o, moved in zip(drawn, self.lattice.shifted_axes))
        return PatchLattice(self.lattice.patch, self.lattice.stride, shift, self.lattice.wrap)

    def grid(self, step: int | None = None) -> BlockGrid:
        """The block grid, with the lattice of ``step`` (default: the unshifted lattice)."""
        lattice = self.lattice_obj() if step is None else self.lattice_at(step)
        return BlockGrid(self.volume.shape, self.storage.block, lattice)

    def evaluations_per_voxel(self) -> float:
        """E: patch evaluations per output voxel and step (seams shared), over the run's steps."""
        steps = range(self.diffusion.steps)
        per_step = [self.lattice_at(k).evaluations_per_voxel(self.volume.shape) for k in steps]
        return sum(per_step) / len(per_step)

    @classmethod
    def from_record(cls, data: dict) -> JobConfig:
        """The job as a store recorded it: fields added since keep the value the store was
        written with (a lattice recorded before ``lattice.wrap`` existed did not wrap; scratch
        recorded before ``storage.scratch_rolled`` was not rolled, and a last step recorded
        before ``storage.final_step_rolled`` was computed in the volume's frame)."""
        lattice, storage = data.get("lattice"), data.get("storage")
        if isinstance(lattice, dict) and "wrap" not in lattice:
            data = {**data, "lattice": {**lattice, "wrap": False}}
        if isinstance(storage, dict):
            before = {k: False for k in ("scratch_rolled", "final_step_rolled") if k not in storage}
            data = {**data, "storage": {**storage, **before}}
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: object) -> JobConfig:
        """The config in YAML file ``path`` with dotted-key ``overrides``; an unreadable file
        raises ``OSError``, a file that is not a YAML mapping of sections ``ConfigError``, and
        bad fields pydantic's ``ValidationError``."""
        data = read_yaml_mapping(path)
        try:
            merged = merge(data, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return cls.model_validate(merged)

    def with_overrides(self, **overrides: object) -> JobConfig:
        data = self.model_dump(mode="json")
        if "lattice.stride" in overrides and "lattice.mode" not in overrides:
            del data["lattice"]["mode"]  # a stride given without a mode: the mode follows it
        return type(self).model_validate(merge(data, overrides))
