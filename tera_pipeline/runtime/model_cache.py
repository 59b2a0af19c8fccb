"""The worker's model cache: a checkpoint is loaded once per worker process, not once per block.

The first load also prepares the process: glibc keeps freed memory (``keep_freed_memory``) and
torch uses ``TERA_TORCH_THREADS`` intra-op threads when that is set (the cluster sets it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from tera_pipeline.runtime.memory import keep_freed_memory

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

CACHED_MODELS = 8
"""Models (or predictors) a worker keeps, least recently used first out."""


_BUILDING = threading.RLock()
"""Held while the cache is looked up or filled (a build may itself ask the cache)."""


def worker_cached(build: Callable[..., T], *args: Hashable) -> T:
    """``build(*args)``, built once per worker process and kept (the process prepared first),
    also when a worker's threads (blocks sharing a GPU) ask at once."""
    with _BUILDING:
        return cast(T, _cached(build, args))


def worker_model(
    load: Callable[[Path], tuple[M, dict[str, Any]]], checkpoint: str | Path
) -> tuple[M, dict[str, Any]]:
    """``load(checkpoint)`` (a model and its metadata), once per worker process, the model moved
    to the worker's GPU when it has one."""
    return worker_cached(_on_worker_device, load, Path(checkpoint))


def worker_device() -> torch.device:
    """The GPU when the worker has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_worker_device(
    load: Callable[[Path], tuple[M, dict[str, Any]]], checkpoint: Path
) -> tuple[M, dict[str, Any]]:
    model, meta = load(checkpoint)
    return model.to(worker_device()), meta


@lru_cache(maxsize=CACHED_MODELS)
def _cached(build: Callable[..., Any], args: tuple[Hashable, ...]) -> Any:
    keep_freed_memory()
    threads = int(os.environ.get("TERA_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    return build(*args)
