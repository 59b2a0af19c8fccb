"""Running the denoiser on batches of patches: device choice, batching, memory layout, AMP on GPUs.

One ``PatchPredictor`` is built per worker process and kept (``get_predictor``), so the model is
loaded once, not once per block. On CPUs the model runs channels-last (NDHWC): oneDNN's 3-D
convolutions, 87 % of a block's time, are 1.24x faster so, and a patch's prediction stays bitwise
the same whichever batch, position or thread count it is computed with (docs/PERFORMANCE.md),
given the batch's shape. With one thread (a worker's default) that holds for batches of any
multiple of ``MIN_CPU_BATCH`` patches, so a block's last, partial batch is padded only to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import DEFAULT_DENOISER, load_denoiser, read_metadata
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.errors import GenerationError
from tera_pipeline.generation.schedule import Schedule
from tera_pipeline.inputs.panel import panel_difference
from tera_pipeline.runtime.model_cache import worker_cached

MIN_CPU_BATCH = 8
"""On one CPU thread a partial batch is padded to a multiple of this. Measured (one thread): a
patch's prediction in batches of 8, 16, 24 or 32 is bitwise the one it has in any other of them;
the committed denoiser differs by 2e-6 only in batches of 1 or 2, a narrower one (base channels 8)
in every odd batch. On two threads odd batches (7, 25, 31) differ too, so there every batch is
padded to ``batch_size``."""


class PatchPredictor:
    """Predicts the noise of stacks of patches with a loaded denoiser."""

    def __init__(
        self,
        checkpoint: Path,
        batch_size: int = 32,
        device: str | None = None,
        channels_last: bool | None = None,
        fixed_shape: bool | None = None,
    ) -> None:
        self.model, self.meta = load_denoiser(checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        # None: one batch shape on GPUs and multi-threaded CPUs, where it keeps predictions
        # bitwise the same; False: pad only to MIN_CPU_BATCH (one-thread CPUs, measured).
        self.fixed_shape = fixed_shape
        # Reduced precision only on GPUs: on CPUs it changes the outputs (bf16: 0.5 % per
        # prediction), so a CPU run stays float32 and equal to whole-volume sampling.
        self.autocast = self.device.type == "cuda"
        # Channels-last: measured on CPUs; on GPUs left as it was until measured there.
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)

    @property
    def pads_to_batch(self) -> bool:
        """Whether a partial batch is padded to ``batch_size`` (else to ``MIN_CPU_BATCH``)."""
        if self.fixed_shape is not None:
            return self.fixed_shape
        return not (self.device.type == "cpu" and torch.get_num_threads() == 1)

    @property
    def config(self):
        return self.model.cfg

    def __call__(
        self, x: np.ndarray, t: int, cond: np.ndarray, offset: Sequence[int] | None = None
    ) -> np.ndarray:
        """``predict`` on numpy arrays, returned as a numpy array."""
        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        cs = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))
        return self.predict(xs, t, cs, offset).cpu().numpy()

    @torch.inference_mode()
    def predict(
        self, x: torch.Tensor, t: int, cond: torch.Tensor, offset: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Noise predictions for ``x`` (N, C, *patch) and ``cond`` (N, G, *window), float32 on
        any device, returned on the model's device; ``offset``: the patches' offset within
        their first bin (sub-bin-offsets models).

        The model sees batches of ``batch_size`` patches; the last is padded to ``batch_size``
        (one shape for the kernels), or on a CPU running one intra-op thread only to a multiple
        of ``MIN_CPU_BATCH``. A patch's prediction is then bitwise the same whichever block,
        batch or position it comes in, which keeps outputs independent of block size.
        """
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        unit = self.batch_size if self.pads_to_batch else min(MIN_CPU_BATCH, self.batch_size)
        ob = None
        if offset is not None and any(offset):
            ob = torch.tensor([list(offset)], dtype=torch.long, device=self.device)
        for start in range(0, len(x), self.batch_size):
            sl = slice(start, start + self.batch_size)
            rows = len(x[sl])
            size = min(-(-rows // unit) * unit, max(rows, self.batch_size))
            xb, cb = self._padded(x[sl], size), self._padded(cond[sl], size)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            tb = torch.full((size,), t, dtype=torch.long, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                eps = self.model(xb, tb, cb, None if ob is None else ob.expand(size, 3))
            out[sl] = eps[:rows].float()
        return out

    def _padded(self, a: torch.Tensor, size: int) -> torch.Tensor:
        """``a`` as contiguous float32 on the model's device, zero rows appended up to ``size``."""
        out = torch.zeros((size, *a.shape[1:]), dtype=torch.float32, device=self.device)
        out[: len(a)] = a
        return out


def get_predictor(checkpoint: str, batch_size: int) -> PatchPredictor:
    """The worker's cached predictor for a checkpoint."""
    return worker_cached(PatchPredictor, Path(checkpoint), batch_size)


def schedule_of(config: JobConfig, prediction: str = "epsilon") -> Schedule:
    """The job's sampling schedule for a model that outputs ``prediction`` (from its checkpoint)."""
    d = config.diffusion
    return Schedule(steps=d.steps, eta=d.eta, prediction=prediction, sampler=d.sampler)


def resolve_checkpoint(config: JobConfig) -> Path:
    return Path(config.checkpoint) if config.checkpoint else DEFAULT_DENOISER


def check_checkpoint(config: JobConfig, genes: Sequence[str], meta: dict | None = None) -> dict:
    """Check the checkpoint's metadata (read unless given) fits the job; raise before any
    block runs."""
    path = resolve_checkpoint(config)
    meta = read_metadata(path) if meta is None else meta
    model_cfg = meta.get("config", {})
    patch = tuple(model_cfg.get("patch", ()))
    if patch != tuple(config.lattice.patch):
        raise GenerationError(
            f"checkpoint {path} was trained on patches {patch}, the job uses {config.lattice.patch}"
        )
    window = tuple(p // b for p, b in zip(config.lattice.patch, config.conditioning.bin))
    if tuple(model_cfg.get("cond_window", ())) != window:
        raise GenerationError(
            f"checkpoint {path} expects gene windows {tuple(model_cfg.get('cond_window', ()))} "
            f"bins, the job's patch and bin give {window}"
        )
    if needs_sub_bin_offsets(config) and not model_cfg.get("sub_bin_offsets", False):
        raise GenerationError(
            f"checkpoint {path} takes only patches that start on a gene bin, and the lattice "
            f"moves by voxels: pass --lattice bin-shifted (or z-shifted, overlapped), or use a "
            f"checkpoint trained with sub-bin offsets (tera train denoiser, the default)"
        )
    difference = panel_difference(genes, meta.get("genes", []))
    if difference:
        raise GenerationError(
            f"checkpoint {path} gene panel does not match the conditioning's: {difference}"
        )
    return meta


def needs_sub_bin_offsets(config: JobConfig) -> bool:
    """Whether some step's patches start within a gene bin (a lattice moved by voxels)."""
    b = config.conditioning.bin
    return any(
        o % n for step in range(config.diffusion.steps)
        for o, n in zip(config.lattice_at(step).offset, b, strict=True)
    )  # fmt: skip
