"""The Dask cluster a job runs on, chosen by ``cluster.kind`` (or a recipe in infra/clusters):

- ``local``: a CPU ``LocalCluster``; ``cuda``: dask-cuda's ``LocalCUDACluster``, one worker per
  GPU; ``auto``: ``cuda`` when GPUs are visible, else ``local``;
- ``slurm``: dask-jobqueue's ``SLURMCluster``, each job one worker per GPU (dask-cuda);
- ``kubernetes``: a dask-kubernetes ``DaskCluster`` from a manifest (or an existing one by name);
- ``address``: an existing scheduler.

Workers with a GPU advertise the Dask resource ``GPU=1``; block tasks that run the model ask for
it (``gpu_task`` and ``block_resources``), so on a mixed cluster they land on GPU workers only.
``plan_cluster`` decides (a pure function); ``cluster_client`` builds and connects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dask
import yaml
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from tera_pipeline.core.cluster_spec import ClusterSpec

log = logging.getLogger("tera_pipeline")

GPU = "GPU"
"""The Dask worker resource a GPU worker advertises (``--resources GPU=1``)."""


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
    kind: Literal["cuda", "local", "address", "slurm", "kubernetes"]
    workers: int
    threads_per_worker: int
    address: str | None = None
    gpu: bool | None = False
    """Whether workers advertise GPUs; None: ask the scheduler (an existing cluster). A GPU
    worker advertises ``GPU=threads_per_worker`` (``blocks_per_gpu``) and a block asks for one,
    so that many blocks share its GPU."""


def plan_cluster(spec: ClusterSpec, gpus: int, cores: int | None = None) -> ClusterPlan:
    """What cluster to start for ``spec`` on a machine with ``gpus`` GPUs and ``cores`` cores."""
    cores = cores or os.cpu_count() or 1
    if spec.kind == "address":
        return ClusterPlan("address", 0, spec.threads_per_worker, spec.address, gpu=None)
    if spec.kind == "slurm":
        gpus = spec.slurm.gpus_per_job
        workers = spec.workers or max(gpus, 1)
        return ClusterPlan("slurm", workers, spec.threads_per_worker, gpu=gpus > 0)
    if spec.kind == "kubernetes":
        gpu = spec.kubernetes.gpus_per_worker > 0
        return ClusterPlan("kubernetes", spec.workers or 1, spec.threads_per_worker, gpu=gpu)
    if spec.kind == "cuda" and gpus == 0:
        raise RuntimeError("cluster.kind 'cuda' was asked for but no GPU is visible (NVML)")
    if spec.kind == "cuda" or (spec.kind == "auto" and gpus > 0):
        workers = min(spec.workers or gpus, gpus)  # one worker per GPU, never more
        return ClusterPlan("cuda", workers, spec.blocks_per_gpu, gpu=True)
    threads = spec.threads_per_worker
    workers = spec.workers or max(1, cores // threads)
    return ClusterPlan("local", workers, threads)


class TorchThreads(WorkerPlugin):
    """Caps torch's intra-op threads on each worker so workers do not fight over cores, and
    freezes the objects imported by then out of the cyclic garbage collector."""

    name = "tera-torch-threads"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker) -> None:
        import gc
        import signal
        import threading

        import torch

        torch.set_num_threads(self.threads)
        os.environ["TERA_TORCH_THREADS"] = str(self.threads)
        # torch's million objects out of the collector's sight: a full collection scanned
        # them all, 0.2 s a worker in a run of 8 zero-cost steps (objects made later are
        # still collected)
        gc.collect()
        gc.freeze()
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C in a terminal reaches the whole process group: the driver stops the run
            # and closes the workers in order; a worker must not die mid-block on its own.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


MESSAGE_INTERVAL_S = 0.001
"""How long the client and the scheduler gather messages before sending them (Dask's own: 10 ms
and 5 ms). A message sent within that time of the one before waits: the tasks the driver submits
at the barrier between two steps reached their workers up to 15 ms late (a task stream of the
zero-cost job at 16 x 128 x 128: 17 ms from the end of one step to the start of the next, 7 of
them from the submission to the start, in steps of 130 ms). Alternated runs of that job: 17.5-19.1
ns per voxel-step (median 18.2) against 18.5-22.8 (19.0) with Dask's intervals."""


class PromptMessages(SchedulerPlugin):
    """The scheduler's message streams to its workers, those that join later included, send
    after ``MESSAGE_INTERVAL_S``."""

    name = "tera-prompt-messages"

    async def start(self, scheduler) -> None:
        for stream in scheduler.stream_comms.values():
            stream.interval = MESSAGE_INTERVAL_S

    def add_worker(self, scheduler, worker: str) -> None:
        stream = scheduler.stream_comms.get(worker)
        if stream is not None:
            stream.interval = MESSAGE_INTERVAL_S


def prompt_messages(client: Client) -> None:
    """Have ``client`` and its scheduler send messages after ``MESSAGE_INTERVAL_S``."""
    try:
        client.scheduler_comm.interval = MESSAGE_INTERVAL_S
        client.register_plugin(PromptMessages())
    except Exception as err:  # a scheduler that refuses: Dask's intervals stay
        log.warning("could not shorten the Dask message intervals: %s", err)


# -- GPU resource annotation of block tasks ----------------------------------------------------
_GPU_CLIENTS: weakref.WeakKeyDictionary[Client, bool] = weakref.WeakKeyDictionary()


def gpu_task(fn: Callable) -> Callable:
    """Mark a block function as one that runs the model (it asks for a GPU where there are)."""
    fn.needs_gpu = True  # type: ignore[attr-defined]
    return fn


def block_resources(client: Client, fn: Callable) -> dict[str, int] | None:
    """The Dask resources a block task of ``fn`` asks for: ``{"GPU": 1}`` for a model task on a
    cluster whose workers advertise GPUs, else none (CPU clusters run every task anywhere)."""
    if not getattr(fn, "needs_gpu", False):
        return None
    has = _GPU_CLIENTS.get(client)
    if has is None:  # a cluster we did not start: ask the scheduler (once it has workers)
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        has = any(w.get("resources", {}).get(GPU) for w in workers)
        if workers:
            _GPU_CLIENTS[client] = has
    return {GPU: 1} if has else None


# -- SLURM and Kubernetes ----------------------------------------------------------------------
def slurm_cluster(spec: ClusterSpec, quiet: bool = True):
    """A dask-jobqueue ``SLURMCluster`` (not yet scaled): each job asks for
    ``slurm.gpus_per_job`` GPUs and starts one dask-cuda worker per GPU, each running
    ``blocks_per_gpu`` blocks at once (advertising ``GPU=blocks_per_gpu``); with 0 GPUs, one CPU
    worker per job."""
    from dask_jobqueue import SLURMCluster

    s = spec.slurm
    directives = list(s.job_extra_directives)
    if s.gpus_per_job:
        directives.insert(0, f"--gres=gpu:{s.gpus_per_job}")
        worker = {
            "worker_command": "dask_cuda.cli worker",
            "processes": s.gpus_per_job,
            "cores": s.gpus_per_job * spec.blocks_per_gpu,  # threads, as LocalCUDACluster
            "worker_extra_args": ["--resources", f"{GPU}={spec.blocks_per_gpu}"],
        }
    else:
        worker = {"processes": 1, "cores": spec.threads_per_worker}
    return SLURMCluster(
        queue=s.queue,
        account=s.account,
        walltime=s.walltime,
        job_cpu=s.cpus_per_job,
        memory=s.memory_per_job,
        job_extra_directives=directives,
        job_script_prologue=[
            *s.job_script_prologue,
            f"export OMP_NUM_THREADS={spec.threads_per_worker}",
            f"export TERA_TORCH_THREADS={spec.threads_per_worker}",
        ],
        local_directory=s.local_directory,
        log_directory=s.log_directory,
        interface=s.interface,
        python=s.python or sys.executable,
        job_name="tera-worker",
        scheduler_options={"dashboard_address": spec.dashboard_address},
        silence_logs=logging.WARNING if quiet else logging.INFO,
        **worker,
    )


def daskcluster_manifest(spec: ClusterSpec, workers: int | None = None) -> dict:
    """The ``DaskCluster`` resource of ``kubernetes.manifest`` with the job's name, namespace and
    worker count set; checked for what the operator's CRD requires and, with GPUs, that worker
    pods ask for ``nvidia.com/gpu`` and advertise ``GPU=1``."""
    k8s = spec.kubernetes
    if not k8s.manifest:
        raise ValueError("cluster.kubernetes.manifest is not set")
    doc = yaml.safe_load(Path(k8s.manifest).read_text())
    where = k8s.manifest
    if doc.get("apiVersion") != "kubernetes.dask.org/v1" or doc.get("kind") != "DaskCluster":
        raise ValueError(f"{where} is not a kubernetes.dask.org/v1 DaskCluster")
    body = doc.get("spec") or {}
    for part, needed in (("scheduler", ("spec", "service")), ("worker", ("spec",))):
        missing = [k for k in needed if k not in (body.get(part) or {})]
        if missing:
            raise ValueError(f"{where}: spec.{part} lacks {missing}")
    if k8s.name:
        doc["metadata"]["name"] = k8s.name
    if k8s.namespace:
        doc["metadata"]["namespace"] = k8s.namespace
    if workers:
        body["worker"]["replicas"] = workers
    if k8s.gpus_per_worker:
        (container,) = [c for c in body["worker"]["spec"]["containers"] if c["name"] == "worker"]
        limits = container.get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) != k8s.gpus_per_worker:
            raise ValueError(
                f"{where}: the worker container must ask for nvidia.com/gpu: "
                f"{k8s.gpus_per_worker} (limits)"
            )
        args = " ".join(container.get("args", []))
        if f"--resources {GPU}=1" not in args:
            raise ValueError(f"{where}: worker args must include '--resources {GPU}=1'")
    return doc


def kubernetes_cluster(spec: ClusterSpec, workers: int):
    """A dask-kubernetes operator cluster: an existing ``DaskCluster`` by name, or one created
    from the manifest (deleted again on close). Needs ``pip install 'tera-pipeline[kubernetes]'``
    and the Dask operator installed in the Kubernetes cluster."""
    from dask_kubernetes.operator import KubeCluster

    k8s = spec.kubernetes
    if k8s.name and not k8s.manifest:
        return KubeCluster.from_name(k8s.name, namespace=k8s.namespace)
    manifest = daskcluster_manifest(spec, workers)
    return KubeCluster(
        custom_cluster_spec=manifest, namespace=k8s.namespace, shutdown_on_close=True
    )


# -- the client ---------------------------------------------------------------------------------
# Dask's statistical profiler samples every worker thread's stack each 10 ms; with the denoiser's
# deep torch stacks that cost 3-6 % of a CPU worker's throughput (docs/PERFORMANCE.md). Local
# workers take the config of the process that starts them: off for the clusters started here.
_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


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
    before = _child_pids()
    if plan.kind == "address":
        client = Client(plan.address)
    elif plan.kind == "cuda":
        from dask_cuda import LocalCUDACluster

        with dask.config.set(_WORKER_CONFIG):
            cluster = LocalCUDACluster(
                n_workers=plan.workers,
                threads_per_worker=plan.threads_per_worker,  # blocks sharing the GPU
                dashboard_address=spec.dashboard_address,
                silence_logs=logging.WARNING if quiet else None,
                env=threads_env,
                resources={GPU: plan.threads_per_worker},
            )
        client = Client(cluster)
    elif plan.kind == "slurm":
        cluster = slurm_cluster(spec, quiet)
        cluster.scale(n=plan.workers)  # jobs of gpus_per_job workers each
        client = Client(cluster)
    elif plan.kind == "kubernetes":
        cluster = kubernetes_cluster(spec, plan.workers)
        client = Client(cluster)
    else:
        with dask.config.set(_WORKER_CONFIG):
            cluster = LocalCluster(
                n_workers=plan.workers,
                threads_per_worker=plan.threads_per_worker,
                processes=True,
                dashboard_address=spec.dashboard_address,
                env=threads_env,
                silence_logs=logging.WARNING if quiet else logging.INFO,
            )
        client = Client(cluster)
    if plan.gpu is not None:
        _GPU_CLIENTS[client] = plan.gpu
    try:
        if plan.kind in ("slurm", "kubernetes"):
            log.info("waiting for the first of %d workers (queued jobs / pods)", plan.workers)
            client.wait_for_workers(1)
        client.register_plugin(TorchThreads(plan.threads_per_worker))
        prompt_messages(client)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        log.info(
            "Dask %s cluster: %d workers, dashboard %s",
            plan.kind,
            workers,
            client.dashboard_link,
        )
        yield client
    finally:
        close(client, cluster, before)


CLOSE_TIMEOUT_S = 30.0
"""How long closing a cluster may take before its remaining processes are killed."""


def _child_pids() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def close(client: Client, cluster, before: set[int], timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close the client and a cluster we started, each within ``timeout_s``; then end every
    process the cluster left (children of this process that were not there before it)."""
    import psutil

    for what in (client, cluster):
        if what is None:
            continue
        try:
            what.close(timeout=timeout_s)
        except Exception as err:  # a hung or broken cluster must not hang the run
            log.warning("closing %s timed out or failed: %s", type(what).__name__, err)
    if cluster is None:
        return
    left = []
    for pid in _child_pids() - before:
        try:
            proc = psutil.Process(pid)
            if "resource_tracker" not in " ".join(proc.cmdline()):  # multiprocessing's, shared
                left.append(proc)
        except psutil.Error:
            continue
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if left:
        log.warning("ended %d process(es) the cluster left behind", len(left))
