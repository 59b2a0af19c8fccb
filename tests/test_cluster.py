"""Cluster factory and recipes: dask-cuda with one worker per GPU when GPUs exist, LocalCluster
otherwise, SLURM through dask-jobqueue, a Kubernetes DaskCluster, an existing scheduler."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import LocalCluster

from tera_pipeline.core.cluster_spec import RECIPES_DIR, ClusterSpec
from tera_pipeline.core.config import JobConfig
from tera_pipeline.generation import block_step, lifecycle
from tera_pipeline.runtime.cluster import (
    GPU,
    block_resources,
    cluster_client,
    daskcluster_manifest,
    gpu_count,
    plan_cluster,
    slurm_cluster,
)

from .conftest import tiny_job


def test_plan_without_gpus_is_a_local_cpu_cluster():
    plan = plan_cluster(ClusterSpec(), gpus=0, cores=8)
    assert (plan.kind, plan.workers, plan.threads_per_worker) == ("local", 8, 1)
    plan = plan_cluster(ClusterSpec(threads_per_worker=2), gpus=0, cores=8)
    assert (plan.workers, plan.threads_per_worker) == (4, 2)


def test_plan_with_gpus_is_one_worker_per_gpu():
    plan = plan_cluster(ClusterSpec(), gpus=4, cores=64)
    assert (plan.kind, plan.workers, plan.threads_per_worker) == ("cuda", 4, 2)  # 2 blocks a GPU
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
def test_gpu_recipe_has_one_worker_per_gpu_and_runs_a_job(tmp_path, tiny_checkpoint):
    from dask_cuda import LocalCUDACluster

    spec = ClusterSpec(recipe="local-gpu", dashboard_address=":0")
    with cluster_client(spec) as c:
        assert isinstance(c.cluster, LocalCUDACluster)
        workers = c.scheduler_info(n_workers=-1)["workers"].values()
        assert len(workers) == gpu_count()
        assert all(w["resources"].get(GPU) == 2 == w["nthreads"] for w in workers)
        assert block_resources(c, block_step.denoise_block) == {GPU: 1}
        job = JobConfig.model_validate(
            {
                "out": str(tmp_path / "gpu.zarr"),
                "volume": {"shape": (4, 64, 64)},
                "storage": {"block": (4, 32, 32)},
                "diffusion": {"steps": 2},
                "checkpoint": str(tiny_checkpoint),
            }
        )
        lifecycle.generate(job, c)
    ds = xr.open_zarr(job.out)
    assert ds.attrs["tera_pipeline"]["status"] == "complete"
    assert np.asarray(ds["image"]).std() > 0


# -- recipes ------------------------------------------------------------------------------------
def test_every_recipe_is_a_valid_cluster_spec():
    kinds = {p.stem: ClusterSpec(recipe=p.stem).kind for p in RECIPES_DIR.glob("*.yaml")}
    assert kinds == {
        "local-cpu": "local",
        "local-gpu": "cuda",
        "slurm-gpu": "slurm",
        "kubernetes": "kubernetes",
        "address": "address",
    }


def test_recipe_fills_what_the_job_leaves_out(tmp_path, monkeypatch):
    job = JobConfig.model_validate({"cluster": {"recipe": "slurm-gpu", "workers": 16}})
    assert job.cluster.kind == "slurm" and job.cluster.workers == 16  # the job's own field wins
    assert job.cluster.slurm.gpus_per_job == 4 and job.cluster.slurm.queue == "gpu"
    # a stored config carries every field: it re-validates where the recipe files are absent
    monkeypatch.setenv("TERA_RECIPES", str(tmp_path / "nowhere"))
    again = JobConfig.model_validate(job.model_dump(mode="json"))
    assert again.cluster == job.cluster
    with pytest.raises(ValueError, match="unknown cluster recipe 'slurm-gpu'"):
        ClusterSpec(recipe="slurm-gpu")
    monkeypatch.delenv("TERA_RECIPES")
    with pytest.raises(ValueError, match=r"unknown cluster recipe 'nope'.*'local-gpu'"):
        ClusterSpec(recipe="nope")
    with pytest.raises(ValueError, match="slurm.gpus_per_job"):
        ClusterSpec(recipe="slurm-gpu", slurm={"gpus_per_job": -1})


# -- SLURM (dask-jobqueue) ----------------------------------------------------------------------
def _worker_command(script: str) -> list[str]:
    return shlex.split([line for line in script.splitlines() if " -m " in line][-1])


def test_slurm_recipe_renders_a_gpu_batch_script():
    spec = ClusterSpec(recipe="slurm-gpu", dashboard_address=":0")
    cluster = slurm_cluster(spec)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    print(script)
    assert script.startswith("#!/usr/bin/env bash\n")
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for directive in ("-p gpu", "--gres=gpu:4", "-t 08:00:00", "--cpus-per-task=32", "-n 1"):
        assert f"#SBATCH {directive}" in header, header
    # every directive comes before the first command, as sbatch requires
    lines = [ln for ln in script.splitlines()[1:] if ln.strip()]
    assert lines[: len(header)] == header
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # one dask-cuda worker per GPU, two blocks at once (blocks_per_gpu): GPU=2 and two threads;
    # dask-cuda's own CLI parses the line
    argv = _worker_command(script)
    assert argv[1:4] == ["-m", "dask_cuda.cli", "worker"]
    assert argv[argv.index("--resources") + 1] == f"{GPU}=2"
    assert argv[argv.index("--nthreads") + 1] == "2"
    from dask_cuda.cli import worker

    ctx = worker.make_context("worker", argv[4:])
    assert ctx.params["resources"] == "GPU=2" and ctx.params["nthreads"] == 2


@pytest.mark.timeout(180)
def test_slurm_job_script_starts_a_worker_that_runs_tasks(tmp_path, monkeypatch):
    """sbatch and scancel are replaced by shims that run the rendered script with bash on this
    machine: the script's own worker command joins the scheduler and runs a task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"  # like sbatch, keep a copy of the script: the caller deletes it
        f'cp "$1" {tmp_path}/job.sh\n'
        f"setsid bash {tmp_path}/job.sh > {tmp_path}/job.log 2>&1 < /dev/null &\n"
        'echo "Submitted batch job $!"\n'
    )
    (bin_dir / "scancel").write_text('#!/bin/bash\nfor j in "$@"; do kill -- -$j; done\nexit 0\n')
    for shim in ("sbatch", "scancel"):
        (bin_dir / shim).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = ClusterSpec(
        kind="slurm",
        workers=1,
        dashboard_address=":0",
        slurm={"gpus_per_job": 0, "cpus_per_job": 1, "memory_per_job": "2GiB"},
    )
    with cluster_client(spec) as client:
        (worker,) = client.scheduler_info(n_workers=-1)["workers"].values()
        assert worker["nthreads"] == 1 and not worker.get("resources")
        assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42
        assert block_resources(client, _gpu_fn) is None  # CPU jobs: no GPU resource asked


def _gpu_fn(index):  # a stand-in model task
    return index


_gpu_fn.needs_gpu = True


# -- Kubernetes (dask-kubernetes operator) ------------------------------------------------------
def test_kubernetes_manifest_is_a_gpu_daskcluster(tmp_path):
    spec = ClusterSpec(recipe="kubernetes")
    doc = daskcluster_manifest(spec, workers=6)
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert doc["metadata"]["namespace"] == "tera"
    worker = doc["spec"]["worker"]
    assert worker["replicas"] == 6
    (container,) = worker["spec"]["containers"]
    assert container["args"][:3] == ["dask", "cuda", "worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = doc["spec"]["scheduler"]["service"]
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    # a manifest whose workers ask for no GPU is refused when the recipe wants GPUs
    import yaml

    del container["resources"]["limits"]["nvidia.com/gpu"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="nvidia.com/gpu"):
        daskcluster_manifest(spec.model_copy(update={"kubernetes": spec.kubernetes.model_copy(
            update={"manifest": str(bad)})}))  # fmt: skip


# -- an existing scheduler, with a GPU-annotated worker --------------------------------------------
def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_job_against_an_existing_scheduler_sends_model_tasks_to_gpu_workers(
    tmp_path, tiny_checkpoint
):
    """A real scheduler and two workers started here, one advertising GPU=1: a generation job
    runs against the scheduler's address and every denoising task runs on the GPU worker."""
    from distributed import get_task_stream

    sched_file = tmp_path / "scheduler.json"
    procs = [
        _start(
            [
                "distributed.cli.dask_scheduler",
                "--scheduler-file",
                str(sched_file),
                "--port",
                "0",
                "--dashboard-address",
                ":0",
            ],
            tmp_path / "s.log",
        )  # fmt: skip
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for name, extra in (("gpu-worker", ["--resources", "GPU=1"]), ("cpu-worker", [])):
            procs.append(
                _start(
                    [
                        "distributed.cli.dask_worker",
                        "--scheduler-file",
                        str(sched_file),
                        "--nthreads",
                        "1",
                        "--name",
                        name,
                        "--no-dashboard",
                        *extra,
                    ],
                    tmp_path / f"{name}.log",
                )  # fmt: skip
            )
        import json

        address = json.loads(sched_file.read_text())["address"]
        cluster = {"kind": "address", "address": address}
        job = tiny_job(tmp_path / "addr.zarr", (4, 64, 64), (4, 32, 32), 2, 1, tiny_checkpoint,
                       cluster=cluster)  # fmt: skip
        with cluster_client(job.cluster) as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            by_name = {w["name"]: addr for addr, w in workers.items()}
            with get_task_stream(client) as stream:
                lifecycle.generate(job, client)
        assert block_resources(client, block_step.denoise_block) == {GPU: 1}
        ran = {}
        for t in stream.data:
            ran.setdefault(t["key"].split("-")[0], set()).add(t["worker"])
        print(f"workers per phase: {ran}")
        assert ran["step 1/2"] == ran["step 2/2"] == {by_name["gpu-worker"]}
        ds = xr.open_zarr(job.out)
        assert ds.attrs["tera_pipeline"]["status"] == "complete"
        assert np.asarray(ds["image"]).std() > 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def test_the_client_and_scheduler_send_promptly():
    """The clusters started here send messages after 1 ms, not Dask's 10 ms and 5 ms; so do
    streams to workers that join later."""
    from tera_pipeline.runtime.cluster import MESSAGE_INTERVAL_S

    spec = ClusterSpec(kind="local", workers=1, dashboard_address=":0")
    with cluster_client(spec) as client:
        assert client.scheduler_comm.interval == MESSAGE_INTERVAL_S

        def intervals(dask_scheduler):
            return [s.interval for s in dask_scheduler.stream_comms.values()]

        assert client.run_on_scheduler(intervals) == [MESSAGE_INTERVAL_S]
        client.cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        assert client.run_on_scheduler(intervals) == [MESSAGE_INTERVAL_S] * 2
