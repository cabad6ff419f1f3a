"""The disk spool alone: durable appends, in-order replay, damage, orphans of dead processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from orderbook_store.write.spool import Spool, SpoolRecord
from orderbook_store.write.spool_records import HEADER_SIZE, encode_record


def _payload(i: int) -> bytes:
    return f"binance-futures\tBTCUSDT\t{i}\t{i}\t1.00000000\t2.00000000\t1.50000000\t3.0\n".encode()


def _drain(spool: Spool) -> list[SpoolRecord]:
    out = []
    while (record := spool.peek()) is not None:
        out.append(record)
        spool.ack(record)
    return out


def _fill(spool: Spool, count: int) -> list[uuid.UUID]:
    ids = []
    for i in range(count):
        batch_id = uuid.uuid4()
        spool.append(batch_id, 1, _payload(i))
        ids.append(batch_id)
    return ids


def _segments(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.seg"))


def test_records_come_back_in_order_and_acked_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_max_bytes=300) as spool:
        ids = _fill(spool, 10)
        assert spool.pending_records == 10
        assert spool.pending_rows == 10
        assert len(_segments(tmp_path)) > 1  # small segments roll over
        first = spool.peek()
        assert first is not None
        assert spool.peek() == first  # peek without ack is stable
        records = _drain(spool)
        assert [r.batch_id for r in records] == ids
        assert [r.data for r in records] == [_payload(i) for i in range(10)]
        assert spool.is_empty()
        assert spool.pending_records == 0
        assert _segments(tmp_path) == []
        # Appending after a full drain starts a fresh segment.
        later = _fill(spool, 1)
        assert [r.batch_id for r in _drain(spool)] == later
    assert not tmp_path.exists()  # an empty spool leaves nothing behind, not even its directory


def test_unacked_records_replay_at_next_open_in_order(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_max_bytes=400)
    first.open()
    ids = _fill(first, 7)
    per_segment = 400 // len(encode_record(ids[0], 1, _payload(0), 0))
    assert len(_segments(tmp_path)) == 3
    for _ in range(per_segment + 1):  # the first segment and one record of the second
        record = first.peek()
        assert record is not None
        first.ack(record)
    first.close()

    second = Spool(tmp_path)
    second.open()
    # A fully acknowledged segment is gone; acks inside a segment are not persisted, so the
    # second segment comes back whole (the writer's ledger recognises the repeated batch).
    assert second.pending_records == 7 - per_segment
    assert [r.batch_id for r in _drain(second)] == ids[per_segment:]
    second.close()
    assert not tmp_path.exists()


def test_records_of_a_crashed_run_replay_before_new_ones(tmp_path: Path) -> None:
    old = Spool(tmp_path)
    old.open()
    old_ids = _fill(old, 3)
    old.close()
    new = Spool(tmp_path)
    new.open()
    new_ids = _fill(new, 2)
    assert [r.batch_id for r in _drain(new)] == old_ids + new_ids
    new.close()


def test_torn_last_record_is_reported_and_the_intact_ones_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.open()
    ids = _fill(spool, 5)
    spool.close()
    (segment,) = _segments(tmp_path)
    size = segment.stat().st_size
    record_size = size // 5
    with open(segment, "r+b") as f:
        f.truncate(size - record_size // 2)  # the last write was cut half way

    caplog.set_level(logging.WARNING, logger="orderbook_store.write.spool")
    with Spool(tmp_path) as replay:
        got = [r.batch_id for r in _drain(replay)]
    assert got == ids[:4]
    damaged = [r for r in caplog.records if "damaged record" in r.getMessage()]
    assert len(damaged) == 1
    message = damaged[0].getMessage()
    assert str(segment) in message
    assert f"offset {4 * record_size}" in message


@pytest.mark.parametrize("where", ["payload", "header", "magic"])
def test_damaged_middle_record_is_skipped_and_later_ones_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    spool = Spool(tmp_path)
    spool.open()
    ids = _fill(spool, 5)
    spool.close()
    (segment,) = _segments(tmp_path)
    record_size = segment.stat().st_size // 5
    damaged_at = 2 * record_size + {"payload": HEADER_SIZE + 30, "header": 5, "magic": 0}[where]
    with open(segment, "r+b") as f:
        f.seek(damaged_at)
        byte = f.read(1)
        f.seek(damaged_at)
        f.write(bytes([byte[0] ^ 0xFF]))

    caplog.set_level(logging.WARNING, logger="orderbook_store.write.spool")
    with Spool(tmp_path) as replay:
        got = [r.batch_id for r in _drain(replay)]
        assert replay.damaged_records == 1
    assert got == ids[:2] + ids[3:]
    assert any(f"offset {2 * record_size}" in r.getMessage() for r in caplog.records)


def test_garbage_between_records_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    ids = _fill(spool, 1)
    spool.close()
    (segment,) = _segments(tmp_path)
    extra_id = uuid.uuid4()
    with open(segment, "ab") as f:
        f.write(b"\x00" * 37 + b"\xa7OB")  # junk, including a partial magic
        f.write(encode_record(extra_id, 1, _payload(9), 0))
    with Spool(tmp_path) as replay:
        assert [r.batch_id for r in _drain(replay)] == [*ids, extra_id]


_HOLDER = textwrap.dedent(
    """
    import sys, time, uuid
    from orderbook_store.write.spool import Spool
    spool = Spool(sys.argv[1])
    spool.open()
    for i in range(int(sys.argv[2])):
        spool.append(uuid.UUID(int=i + 1), 1, b"row\\n")
    print("ready", flush=True)
    time.sleep(600)
    """
)


def _start_holder(root: Path, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_living_process_spool_is_left_alone_and_adopted_once_it_is_killed(
    tmp_path: Path,
) -> None:
    holder = _start_holder(tmp_path, 3)
    try:
        with Spool(tmp_path) as mine:
            assert mine.adopt_orphans() == 0
            assert mine.peek() is None  # the other process's batches are not ours to send
            own = _fill(mine, 1)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
            assert mine.adopt_orphans() == 1
            got = [r.batch_id for r in _drain(mine)]
        # The dead process's batches first, then ours; its directory is gone.
        assert got == [uuid.UUID(int=i + 1) for i in range(3)] + own
        assert not tmp_path.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_an_orphan_is_adopted_by_exactly_one_spool(tmp_path: Path) -> None:
    dead = Spool(tmp_path)
    dead.open()
    ids = _fill(dead, 4)
    dead.close()
    first = Spool(tmp_path)
    second = Spool(tmp_path)
    first.open()
    second.open()
    try:
        got_first = [r.batch_id for r in _drain(first)]
        got_second = [r.batch_id for r in _drain(second)]
        assert got_first == ids
        assert got_second == []
    finally:
        first.close()
        second.close()


def test_records_survive_a_reopen_mid_replay(tmp_path: Path) -> None:
    """A crash during replay hands the unacknowledged rest to the next process."""
    dead = Spool(tmp_path, segment_max_bytes=250)
    dead.open()
    ids = _fill(dead, 6)
    dead.close()
    replaying = Spool(tmp_path)
    replaying.open()
    for _ in range(2):
        record = replaying.peek()
        assert record is not None
        replaying.ack(record)
    replaying.close()  # as a kill would: lock released, files kept
    with Spool(tmp_path) as last:
        got = [r.batch_id for r in _drain(last)]
    assert got[-4:] == ids[2:]
    assert set(got) <= set(ids)  # earlier ones may come again; the ledger recognises them
