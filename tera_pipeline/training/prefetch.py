"""Batches of a keyed patch source (``draw(step, indices)``) prepared ahead by spawned worker
processes, while the current step trains: a torch DataLoader over steps, each worker opening the
source's store itself (TensorStore is not fork-safe)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tera_pipeline.training.patches import PatchBatch, PatchSource

Batch = PatchBatch


class _Steps(torch.utils.data.Dataset):
    """Step ``s`` -> the batch of ``indices`` at step ``s`` (in a worker)."""

    def __init__(self, source: PatchSource, indices: tuple[int, ...]) -> None:
        self.source, self.indices = source, indices

    def __getitem__(self, step: int) -> Batch:
        return self.source.draw(step, self.indices)


class _From(torch.utils.data.Sampler):
    """Steps ``start`` .. ``stop`` - 1; ``start`` moves when the loop asks for another step."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _as_is(batch: Batch) -> Batch:
    return batch


class Prefetcher:
    """``source.draw(step, indices)`` for steps ``start`` .. ``stop`` - 1, prepared ahead by
    ``workers`` spawned DataLoader workers (``prefetch`` batches each); 0 workers draw in
    process. Another step or index list than the next is drawn in process (another step: the
    workers restart from it)."""

    def __init__(
        self,
        source: PatchSource,
        indices: Sequence[int],
        start: int,
        stop: int,
        workers: int = 2,
        prefetch: int = 2,
    ) -> None:
        self.source, self.indices = source, tuple(indices)
        self._next, self._it, self._loader = start, None, None
        self._steps = _From(start, stop)
        if workers > 0:
            self._loader = torch.utils.data.DataLoader(
                _Steps(source, self.indices), batch_size=None, sampler=self._steps,
                num_workers=workers, prefetch_factor=prefetch, persistent_workers=True,
                multiprocessing_context="spawn", collate_fn=_as_is,
                generator=torch.Generator().manual_seed(0),  # leaves torch's global stream be
            )  # fmt: skip

    def draw(self, step: int, indices: Sequence[int]) -> Batch:
        """The batch of ``indices`` at ``step`` (prefetched when it is the next one)."""
        if self._loader is None or tuple(indices) != self.indices or step >= self._steps.stop:
            return self.source.draw(step, indices)
        if self._it is None or step != self._next:
            self._steps.start, self._next = step, step
            self._it = iter(self._loader)
        self._next += 1
        return next(self._it)

    def close(self) -> None:
        """Stop the workers."""
        it = self._loader._iterator if self._loader is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._it = self._loader = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Prefetched:
    """A patch source whose training batches are prefetched by ``workers`` processes: the
    first ``draw`` fixes the indices (this process's share of each step's batch) and the start
    step; validation batches are drawn in process. Close it (or use it as a context manager)."""

    def __init__(self, source: PatchSource, stop: int, workers: int = 2, prefetch: int = 2):
        self.source, self.stop, self.workers, self.prefetch = source, stop, workers, prefetch
        self.genes, self.volume = source.genes, source.volume
        self._fetch: Prefetcher | None = None

    def draw(self, step: int, indices: Sequence[int]) -> Batch:
        if self._fetch is None:
            self._fetch = Prefetcher(
                self.source, indices, step, self.stop, self.workers, self.prefetch
            )
        return self._fetch.draw(step, indices)

    def validation_batch(self, n: int) -> Batch:
        return self.source.validation_batch(n)

    def close(self) -> None:
        if self._fetch is not None:
            self._fetch.close()

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
