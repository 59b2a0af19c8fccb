"""Where a job runs: the Dask cluster section of the config (local CPUs, one worker per GPU,
SLURM, Kubernetes, an existing scheduler) and its named recipes in infra/clusters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tera_pipeline.core.mappings import Section, merge_nested, read_yaml_mapping

RECIPES_DIR = Path(__file__).resolve().parents[2] / "infra" / "clusters"
"""Cluster recipes chosen by name (``cluster.recipe``); ``TERA_RECIPES`` names another folder."""


class SlurmSpec(Section):
    """A SLURM allocation through dask-jobqueue: each job starts one Dask worker per GPU."""

    queue: str | None = None
    """Partition (``#SBATCH -p``)."""
    account: str | None = None
    walltime: str = "04:00:00"
    gpus_per_job: int = Field(1, ge=0)
    """GPUs per job (``--gres=gpu:N``), one worker each (dask-cuda); 0 for CPU workers."""
    cpus_per_job: int = Field(8, ge=1)
    memory_per_job: str = "64GiB"
    job_extra_directives: tuple[str, ...] = ()
    """More ``#SBATCH`` options, e.g. ``--constraint=a100``."""
    job_script_prologue: tuple[str, ...] = ()
    """Shell lines before the worker starts (``module load``, ``source venv/bin/activate``)."""
    local_directory: str | None = None
    """Node-local scratch for worker spill files."""
    log_directory: str | None = None
    interface: str | None = None
    """Network interface of workers and scheduler (``ib0``)."""
    python: str | None = None
    """The workers' python; default: the driver's."""


class KubernetesSpec(Section):
    """A dask-kubernetes (operator) ``DaskCluster``."""

    manifest: str | None = None
    """DaskCluster manifest YAML to create the cluster from (infra/kubernetes/daskcluster.yaml)."""
    name: str | None = None
    """Connect to this existing DaskCluster instead (``kubectl apply`` it yourself)."""
    namespace: str | None = None
    gpus_per_worker: int = Field(1, ge=0)
    """``nvidia.com/gpu`` per worker pod; the manifest must ask for them."""


class ClusterSpec(Section):
    recipe: str | None = None
    """A recipe in infra/clusters (local-cpu, local-gpu, slurm-gpu, kubernetes, address) or a
    YAML path; it fills the fields this section leaves out."""
    kind: Literal["auto", "local", "cuda", "slurm", "kubernetes", "address"] = "auto"
    """auto: one worker per GPU when GPUs are found, else a local CPU cluster."""
    workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    blocks_per_gpu: int = Field(2, ge=1)
    """Block tasks a GPU worker runs at once (its threads): with 2, one block's reads, decoding
    and writes go on while the other's patches are on the GPU (read-ahead and write-behind; each
    block is recorded once its own write has returned)."""
    address: str | None = None
    dashboard_address: str = ":8787"
    slurm: SlurmSpec = SlurmSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()

    @model_validator(mode="before")
    @classmethod
    def _from_recipe(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("recipe"):
            # a stored config carries every field (kind included): it needs no recipe file
            recipe = find_recipe(str(data["recipe"]), required="kind" not in data)
            if recipe is not None:
                base = read_yaml_mapping(recipe, "cluster recipe")
                k8s = base.get("kubernetes") or {}
                if (
                    isinstance(k8s, dict)
                    and k8s.get("manifest")
                    and not Path(k8s["manifest"]).is_absolute()
                ):
                    k8s["manifest"] = str((recipe.parent / k8s["manifest"]).resolve())
                data = merge_nested(base, data)
        return data

    @model_validator(mode="after")
    def _address_given(self) -> ClusterSpec:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address (tcp://host:port)")
        k8s = self.kubernetes
        if self.kind == "kubernetes" and not (k8s.manifest or k8s.name):
            raise ValueError("cluster.kind 'kubernetes' needs kubernetes.manifest or .name")
        return self


def find_recipe(name: str, required: bool = True) -> Path | None:
    """The recipe file for ``name`` (a name in the recipes folder, or a path)."""
    import os

    folder = Path(os.environ.get("TERA_RECIPES", RECIPES_DIR))
    for path in (Path(name), folder / f"{name}.yaml"):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path
    if not required:
        return None
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ValueError(f"unknown cluster recipe {name!r}; recipes in {folder}: {known}")
