"""The Dask cluster a job runs on: one worker per GPU (dask-cuda) when GPUs are present, a local
CPU cluster otherwise, or an existing scheduler given by address.

``plan_cluster`` decides (a pure function, tested for both cases); ``cluster_client`` builds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from tera_pipeline.config import ClusterSpec

log = logging.getLogger("tera_pipeline")


def gpu_count() -> int:
    """Number of NVIDIA GPUs visible through NVML (0 when NVML or a driver is missing)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no device: all mean "no GPU"
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


@dataclass(frozen=True)
class ClusterPlan:
    kind: Literal["cuda", "local", "address"]
    workers: int
    threads_per_worker: int
    address: str | None = None


def plan_cluster(spec: ClusterSpec, gpus: int, cores: int | None = None) -> ClusterPlan:
    """What cluster to start for ``spec`` on a machine with ``gpus`` GPUs and ``cores`` cores."""
    cores = cores or os.cpu_count() or 1
    if spec.kind == "address":
        return ClusterPlan("address", 0, spec.threads_per_worker, spec.address)
    if spec.kind == "cuda" and gpus == 0:
        raise RuntimeError("cluster.kind 'cuda' was asked for but no GPU is visible (NVML)")
    if spec.kind == "cuda" or (spec.kind == "auto" and gpus > 0):
        workers = min(spec.workers or gpus, gpus)  # one worker per GPU, never more
        return ClusterPlan("cuda", workers, 1)
    threads = spec.threads_per_worker
    workers = spec.workers or max(1, cores // threads)
    return ClusterPlan("local", workers, threads)


class TorchThreads(WorkerPlugin):
    """Caps torch's intra-op threads on each worker so workers do not fight over cores."""

    name = "tera-torch-threads"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker) -> None:
        import torch

        torch.set_num_threads(self.threads)
        os.environ["TERA_TORCH_THREADS"] = str(self.threads)


@contextmanager
def cluster_client(spec: ClusterSpec, quiet: bool = True) -> Iterator[Client]:
    """A connected Dask client for ``spec``; a cluster it started is closed on exit."""
    plan = plan_cluster(spec, gpu_count() if spec.kind in ("auto", "cuda") else 0)
    threads_env = {
        "OMP_NUM_THREADS": str(plan.threads_per_worker),
        "MKL_NUM_THREADS": str(plan.threads_per_worker),
        "TERA_TORCH_THREADS": str(plan.threads_per_worker),
    }
    cluster = None
    if plan.kind == "address":
        client = Client(plan.address)
    elif plan.kind == "cuda":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            n_workers=plan.workers,
            threads_per_worker=1,
            dashboard_address=spec.dashboard_address,
            silence_logs=logging.WARNING if quiet else None,
            env=threads_env,
        )
        client = Client(cluster)
    else:
        cluster = LocalCluster(
            n_workers=plan.workers,
            threads_per_worker=plan.threads_per_worker,
            processes=True,
            dashboard_address=spec.dashboard_address,
            env=threads_env,
            silence_logs=logging.WARNING if quiet else logging.INFO,
        )
        client = Client(cluster)
    try:
        client.register_plugin(TorchThreads(plan.threads_per_worker))
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        log.info(
            "Dask %s cluster: %d workers, dashboard %s",
            plan.kind,
            workers,
            client.dashboard_link,
        )
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
