"""The worker's lease on its partitions: a stall past half the session timeout puts its
lake writes and update publications on hold until the group confirms its partitions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from transport.lease import Lease


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stall_holds_writes_until_an_assignment_or_the_settle_time() -> None:
    clock = Clock()
    lease = Lease(session_timeout_s=60, settle_s=15, clock=clock)
    for _ in range(100):  # steady ticks: always held
        clock.now += 0.5
        lease.tick()
        assert lease.held
    clock.now += 29  # a pause shorter than half the session timeout: still held
    assert lease.held and lease.stalls == 0

    clock.now += 75  # frozen past the session timeout; the first thing after it is a write
    assert not lease.held and lease.stalls == 1
    clock.now += 5
    lease.tick()
    assert not lease.held
    lease.confirmed()  # the rebalance that follows gives it its (new) partitions
    assert lease.held

    clock.now += 40  # another stall, and no rebalance follows: it kept its partitions
    lease.tick()
    assert not lease.held
    for _ in range(30):
        clock.now += 0.5
        lease.tick()
    assert lease.held and lease.stalls == 2


@pytest.mark.parametrize("held", [True, False])
async def test_revoked_partitions_are_written_or_left_to_their_next_owner(
        held: bool, tmp_path: Path) -> None:
    """After a stall the archive writes nothing for revoked partitions (another worker may
    own them and write the same events): their next owner reads them again from the
    committed offset. Without one, revoking writes and commits what was read."""
    from lake.archive import LakeArchiver
    from lake.ledger import PartitionState
    from lake.rows import ArchiveRows
    from app.settings import Settings

    clock = Clock()
    lease = Lease(session_timeout_s=60, clock=clock)
    if not held:
        clock.now += 100

    class Offsets:
        def __init__(self) -> None:
            self.commits: list[tuple[int, int]] = []

        async def commit(self, partition: int, offset: int) -> None:
            self.commits.append((partition, offset))

        def close(self) -> None:
            pass

    settings = Settings.from_env({"LAKE_URI": f"file://{tmp_path}/lake"})
    offsets = Offsets()
    archiver = LakeArchiver(settings, offsets=offsets, lease=lease)  # type: ignore[arg-type]
    state = archiver.states[3] = PartitionState(TopicPartition(settings.events_topic, 3),
                                                ready=True)
    rows = ArchiveRows.of(["a"], ["b", "s"], ["x1", "x2"], np.array([[1.0], [2.0]]),
                          ["s", None], np.array([1, 2]))
    state.add([10, 11], lambda i, j: rows, clock.now)
    await archiver.revoke([3])
    written = list((tmp_path / "lake").rglob("*.parquet"))
    assert (len(written), offsets.commits) == ((1, [(3, 12)]) if held else (0, []))
    assert 3 not in archiver.states
