"""Cluster factory: dask-cuda with one worker per GPU when GPUs exist, LocalCluster otherwise."""

from __future__ import annotations

import pytest
from distributed import LocalCluster

from tera_pipeline.cluster import cluster_client, gpu_count, plan_cluster
from tera_pipeline.config import ClusterSpec


def test_plan_without_gpus_is_a_local_cpu_cluster():
    plan = plan_cluster(ClusterSpec(), gpus=0, cores=8)
    assert (plan.kind, plan.workers, plan.threads_per_worker) == ("local", 8, 1)
    plan = plan_cluster(ClusterSpec(threads_per_worker=2), gpus=0, cores=8)
    assert (plan.workers, plan.threads_per_worker) == (4, 2)


def test_plan_with_gpus_is_one_worker_per_gpu():
    plan = plan_cluster(ClusterSpec(), gpus=4, cores=64)
    assert (plan.kind, plan.workers, plan.threads_per_worker) == ("cuda", 4, 1)
    assert plan_cluster(ClusterSpec(workers=8), gpus=4).workers == 4  # never more than GPUs
    assert plan_cluster(ClusterSpec(workers=2), gpus=4).workers == 2


def test_plan_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_cluster(ClusterSpec(kind="cuda"), gpus=0)


def test_plan_existing_address():
    plan = plan_cluster(ClusterSpec(kind="address", address="tcp://10.0.0.1:8786"), gpus=2)
    assert (plan.kind, plan.address) == ("address", "tcp://10.0.0.1:8786")


def test_address_kind_needs_an_address():
    with pytest.raises(ValueError, match="needs cluster.address"):
        ClusterSpec(kind="address")


@pytest.mark.skipif(gpu_count() > 0, reason="checks the CPU fallback")
def test_no_gpu_falls_back_to_local_cluster_with_torch_threads():
    """Here NVML is missing, so dask-cuda's LocalCUDACluster would raise: we get a LocalCluster."""
    assert gpu_count() == 0
    with cluster_client(ClusterSpec(workers=2, threads_per_worker=1, dashboard_address=":0")) as c:
        assert isinstance(c.cluster, LocalCluster)
        assert len(c.scheduler_info(n_workers=-1)["workers"]) == 2

        def torch_threads() -> int:
            import torch

            return torch.get_num_threads()

        assert set(c.run(torch_threads).values()) == {1}
        assert c.dashboard_link


def test_existing_scheduler_address():
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        spec = ClusterSpec(kind="address", address=cluster.scheduler_address)
        with cluster_client(spec) as c:
            assert c.submit(lambda x: x + 1, 1).result() == 2
        assert cluster.status.name == "running"  # a cluster we did not start stays up


@pytest.mark.skipif(gpu_count() == 0, reason="needs an NVIDIA GPU")
def test_gpu_cluster_has_one_worker_per_gpu():
    from dask_cuda import LocalCUDACluster

    with cluster_client(ClusterSpec(dashboard_address=":0")) as c:
        assert isinstance(c.cluster, LocalCUDACluster)
        assert len(c.scheduler_info(n_workers=-1)["workers"]) == gpu_count()
