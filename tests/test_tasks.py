"""The block-task framework: short blocks run in groups, each still recorded once and a failure
still naming its block."""

from __future__ import annotations

import pytest

from tera_pipeline.core.errors import GenerationError
from tera_pipeline.runtime import tasks
from tera_pipeline.runtime.tasks import BlockStats, group_size, run_blocks

BLOCKS = [(z, y, 0) for z in range(8) for y in range(8)]


def short_block(tag: str, index: tuple[int, ...]) -> BlockStats:
    """A block of about a millisecond whose digest is a function of its index."""
    if tag == "fail" and tuple(index) == (5, 3, 0):
        raise ValueError("no such voxel")
    return BlockStats(total_s=0.001, digest=100 * index[0] + index[1])


class _Counting:
    """The client, counting the Dask tasks submitted."""

    def __init__(self, client) -> None:
        self.client, self.submitted = client, 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return self.client.submit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_group_is_enough_blocks_for_a_task_and_the_threads_share_a_phase_evenly():
    assert group_size(None, 1000, 2) == 1  # nothing measured yet
    assert group_size(2.0, 1000, 2) == 1  # long blocks: one per task
    assert group_size(0.001, 1000, 2) == int(tasks.TASK_S / 0.001)
    assert group_size(0.001, 1001, 2) == 167  # 6 equal tasks, not 4 of 250 and one of 1
    assert group_size(0.01, 32, 2) == 16  # 0.16 s a thread, under TASK_S: one task each
    assert group_size(0.01, 32, 2, rounds=2) == 8
    assert group_size(0.02, 32, 2) == 8  # 0.32 s a thread: two rounds of 0.16 s
    assert group_size(0.02, 64, 2) == 11  # 0.64 s a thread: three rounds
    assert group_size(0.001, 3, 2) == 2


def test_short_blocks_run_in_groups_and_each_is_recorded_once(client, monkeypatch):
    monkeypatch.setattr(tasks, "_BLOCK_S", {})
    counting, recorded = _Counting(client), []
    report = run_blocks(counting, short_block, ("ok",), iter(BLOCKS), len(BLOCKS), "short", 4,
                        on_done=recorded.extend)  # fmt: skip
    assert sorted(i for i, _ in recorded) == sorted(BLOCKS)
    assert all(s.digest == 100 * i[0] + i[1] for i, s in recorded)
    assert report.blocks == len(BLOCKS) and report.stats.total_s == pytest.approx(0.064)
    # grouped once the first blocks were timed: the in-flight singles, then equal groups
    assert counting.submitted <= 4 + 4


def test_a_failing_block_of_a_group_is_named(client, monkeypatch):
    monkeypatch.setattr(tasks, "_BLOCK_S", {f"{__name__}.short_block": 0.001})
    with pytest.raises(GenerationError, match=r"block \(5, 3, 0\) failed .*no such voxel"):
        run_blocks(client, short_block, ("fail",), iter(BLOCKS), len(BLOCKS), "failing", 4)
