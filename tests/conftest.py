"""Shared fixtures: a tiny denoiser checkpoint, a real local Dask cluster, Prefect isolation."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Prefect must see these before it is imported anywhere (ephemeral mode, project-local home).
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="tera-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_PREFECT_HOME))
# the folder this made, removed at exit: registered first, so after Prefect's own exit handlers
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
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


@pytest.fixture(scope="session")
def one_worker():
    """A real one-worker LocalCluster, shared by the session (worker-count invariance)."""
    from tera_pipeline.core.cluster_spec import ClusterSpec
    from tera_pipeline.runtime.cluster import cluster_client

    with cluster_client(ClusterSpec(kind="local", workers=1, dashboard_address=":0")) as c:
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


# Prefect deployments on a real server (loopback) with a real process worker

SERVER_START_S = 120


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (a Prefect worker ignores SIGTERM while it polls), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 with its own home and SQLite database (one per
    module: an idle server and worker would poll through the rest of the session)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": url,
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            tail = (home / "server.log").read_text()[-2000:]
            pytest.fail(f"Prefect server did not start: {tail}")
        time.sleep(0.5)
    try:
        yield {"url": url, "env": env, "home": home}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """Every deployment registered on a fresh work pool, and a process worker polling it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import register

    work = tmp_path_factory.mktemp("work")
    with temporary_settings({PREFECT_API_URL: server["url"]}):
        ids = register(pool="tera-test", working_dir=work)
        # TMPDIR: what the deployments' runs leave in a temporary folder (torchrun's
        # torchelastic_* among them) stays in this test's folder
        env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1", "TMPDIR": str(work)}
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start",
             "--pool", "tera-test", "--type", "process"],
            env=env,
            stdout=(work / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield {"ids": ids, "work": work}
        finally:
            _stop(worker)
