"""Shared fixtures: a tiny denoiser checkpoint, a real local Dask cluster, Prefect isolation."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

# Prefect must see these before it is imported anywhere (ephemeral mode, project-local home).
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="tera-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_PREFECT_HOME))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# flows called directly by tests start Prefect's own temporary server: give it time under load
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from models.checkpoint import save_checkpoint  # noqa: E402
from models.denoiser import ConditionalUNet3D, DenoiserConfig  # noqa: E402
from tera_pipeline.core.config import JobConfig  # noqa: E402
from tera_pipeline.inputs.synthetic import GENE_PANEL  # noqa: E402

TINY = DenoiserConfig(
    base_channels=8,
    channel_mults=(1, 2),
    gene_dim=16,
    gene_heads=2,
    gene_layers=1,
    cond_channels=4,
    time_dim=16,
    sub_bin_offsets=True,
)
"""The tests' denoiser: the committed one's kind (patches start at any voxel of a bin), small."""


def write_random_checkpoint(
    path: Path, cfg: DenoiserConfig = TINY, seed: int = 0, genes: tuple[str, ...] = GENE_PANEL
) -> Path:
    """An untrained denoiser with the synthetic panel (or ``genes``, as many): deterministic,
    fast, any receptive field."""
    import torch

    torch.manual_seed(seed)
    model = ConditionalUNet3D(cfg)
    meta = {
        "config": cfg.to_dict(),
        "prediction": "v",
        "genes": list(genes),
        "bin": [1, 16, 16],
        "command": "tests/conftest.py write_random_checkpoint",
    }
    save_checkpoint(path, model, "denoiser", meta)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_bin_aligned_checkpoint(tmp_path_factory) -> Path:
    """The tiny denoiser of the kind committed before sub-bin offsets: patches on bins only."""
    cfg = dataclasses.replace(TINY, sub_bin_offsets=False)
    path = tmp_path_factory.mktemp("ckpt") / "bin_aligned.safetensors"
    return write_random_checkpoint(path, cfg)


@pytest.fixture(scope="session")
def client():
    """A real two-worker LocalCluster (spawned processes), shared by the session."""
    from tera_pipeline.core.cluster_spec import ClusterSpec
    from tera_pipeline.runtime.cluster import cluster_client

    with cluster_client(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as c:
        yield c


def tiny_job(
    out: Path, shape: tuple, block: tuple, steps: int, seed: int, checkpoint: Path, **fields
) -> JobConfig:
    """A job of ``shape`` in ``block``s with the tiny denoiser; ``fields`` are more JobConfig
    fields."""
    return JobConfig.model_validate(
        {
            "out": str(out),
            "volume": {"shape": shape},
            "storage": {"block": block},
            "diffusion": {"steps": steps, "seed": seed},
            "checkpoint": str(checkpoint),
        }
        | fields
    )


@pytest.fixture
def small_job(tmp_path, tiny_checkpoint) -> JobConfig:
    """A 3 x 3 x 3-block job on a 12 x 96 x 96 volume with the tiny denoiser."""
    return JobConfig.model_validate(
        {
            "out": str(tmp_path / "job.zarr"),
            "volume": {"shape": (12, 96, 96)},
            "storage": {"block": (4, 32, 32), "chunk": (2, 16, 16), "scratch_dtype": "float32"},
            "diffusion": {"steps": 3, "seed": 7},
            "checkpoint": str(tiny_checkpoint),
            "batch_size": 16,
        }
    )
