"""A durable disk spool for write batches the database has not (yet) committed.

The writer puts a batch here when the server cannot take it (lost connection, restart,
timeout, full pool) or when more rows are pending in memory than ``max_pending`` allows. The
spool keeps each batch until the writer acknowledges that the database committed it, and hands
batches back in the order they were appended, in this process and at the next start after a
crash.

Where it lives
    ``Settings.spool_dir`` (``DB_SPOOL_DIR``). Unset, the default is
    ``$XDG_STATE_HOME/orderbook_store/spool`` or, without that variable,
    ``~/.local/state/orderbook_store/spool``: per user, outside any work tree, and kept across
    reboots (unlike ``/tmp``). The writer adds one sub-directory per target database
    (:func:`target_dirname`), so collectors writing to different databases on one host never
    replay each other's rows.

Layout on disk (under that per-database directory)::

    <created_ns>-<pid>-<random>/      one directory per open Spool (one per writer)
        lock                          flock()ed for as long as the owner lives
        0000000001.seg                append-only segments, numbered in write order
        0000000002.seg

A process only ever appends to its own directory, so several processes on one host cannot
interleave bytes in a file. A directory whose ``lock`` can be taken has no living owner (the
kernel drops a flock when its process dies, however it dies): the next Spool opened on the same
directory *adopts* it, holds its lock while replaying, and removes it once every record has been
acknowledged. Adopted directories are replayed oldest first, before this process's own records.

Records are framed and checksummed as :mod:`orderbook_store.write.spool_records` says.
Every append is written with one ``write`` and then ``fsync``-ed; a new segment's directory is
``fsync``-ed too, so an acknowledged append survives a power cut. A record that was being
written when the process died (a torn tail), or one that was damaged later, fails its length or
checksum: it is reported with its segment and offset in one warning and skipped, and reading
goes on at the next intact record (found by its magic). Acknowledgements live in memory only:
after a crash, records the database had already committed are handed out again and the writer's
ledger recognises them, which is what makes a crash at any point safe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from orderbook_store.errors import OrderbookStoreError
from orderbook_store.write.spool_records import (
    _HEADER,
    _PREFIX,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    PREFIX_SIZE,
    count_segment,
    encode_record,
    find_magic,
)

__all__ = ["Spool", "SpoolError", "SpoolRecord"]

log = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^(\d{10})\.seg$")
#: A writer's own directory, and the file it holds a lock on for as long as it lives.
OWNER_RE = re.compile(r"^\d{20}-\d+-[0-9a-f]{8}$")
LOCK_NAME = "lock"


class SpoolError(OrderbookStoreError, OSError):
    """The spool could not write to its directory (disk full, permissions, read-only)."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One batch read back from the spool; ``ack`` it once the database committed it."""

    batch_id: uuid.UUID
    rows: int
    created_us: int
    data: bytes
    segment: Path
    offset: int
    end: int


@dataclass(slots=True, eq=False)
class _Segment:
    path: Path
    size: int
    read_offset: int = 0
    records: int = 0
    rows: int = 0
    reader: BinaryIO | None = None


@dataclass(slots=True, eq=False)
class _Owner:
    """One owner directory: this process's own, or an adopted orphan."""

    path: Path
    lock_fd: int
    segments: deque[_Segment] = field(default_factory=deque)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only, checksummed, fsync-ed batch store with in-order replay.

    Not thread-safe: the writer drives one Spool from a single worker thread, so appends,
    reads and acknowledgements are serialised in the order they were submitted.

    ``open()`` creates this process's directory and adopts orphaned ones; ``append`` makes a
    batch durable; ``peek`` returns the oldest unacknowledged batch and ``ack`` retires it;
    ``close`` releases the lock and leaves unacknowledged batches for the next start.
    """

    def __init__(self, directory: Path | str, *, segment_max_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory).expanduser()
        self.segment_max_bytes = segment_max_bytes
        self._own: _Owner | None = None
        self._adopted: deque[_Owner] = deque()
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._next_seq = 1
        #: Damaged records reported and skipped since open.
        self.damaged_records = 0

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create and lock this process's directory, then adopt every orphaned one."""
        if self._own is not None:
            return
        try:
            name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            staging = self.directory / f".new-{name}"
            for attempt in range(5):
                self.directory.mkdir(parents=True, exist_ok=True)
                try:
                    staging.mkdir()
                    break
                except FileNotFoundError:  # an empty spool directory removed under us
                    if attempt == 4:
                        raise
            lock_fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Other processes only consider fully named directories, and by the time one is
            # visible under its final name its lock is already held.
            final = self.directory / name
            staging.rename(final)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool in {self.directory}: {exc.strerror or exc}; "
                "set DB_SPOOL_DIR to a writable directory"
            ) from exc
        self._own = _Owner(final, lock_fd)
        self.adopt_orphans()

    def adopt_orphans(self) -> int:
        """Take over directories whose owner has died; returns how many were adopted."""
        if self._own is None:
            raise SpoolError("the spool is not open")
        adopted = 0
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise SpoolError(f"cannot list the spool {self.directory}: {exc}") from exc
        known = {self._own.path.name} | {owner.path.name for owner in self._adopted}
        for name in names:
            if name in known or not OWNER_RE.match(name):
                continue
            path = self.directory / name
            try:
                lock_fd = os.open(path / LOCK_NAME, os.O_RDWR)
            except FileNotFoundError:
                # Being removed by whoever adopted it before us, or left empty by a crash
                # during that removal: an empty directory is removed, anything else kept.
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            except OSError:
                continue
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(lock_fd)  # its owner is alive (or another process adopted it)
                continue
            if not path.exists():  # removed between our open and our lock
                os.close(lock_fd)
                continue
            owner = _Owner(path, lock_fd)
            for segment in self._list_segments(path):
                owner.segments.append(segment)
            self._adopted.append(owner)
            adopted += 1
            if owner.segments:
                log.warning(
                    "spool: adopted %d segment(s) with %d batch(es), %d row(s) left by a "
                    "writer that stopped (%s); they are replayed first",
                    len(owner.segments),
                    sum(s.records for s in owner.segments),
                    sum(s.rows for s in owner.segments),
                    path,
                )
            else:
                self._retire_owner_if_done(owner)
        return adopted

    def close(self) -> None:
        """Release the lock; remove this process's directory if nothing is left in it."""
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        self._active = None
        for owner in [*self._adopted, *([self._own] if self._own else [])]:
            for segment in owner.segments:
                if segment.reader is not None:
                    segment.reader.close()
                    segment.reader = None
        for owner in list(self._adopted):
            os.close(owner.lock_fd)
        self._adopted.clear()
        if self._own is not None:
            own = self._own
            self._own = None
            if not own.segments:
                self._remove_owner_dir(own)
                # Leave no empty directory behind either (one more writer may be creating
                # its own in it right now: then this fails, and open() retries on its side).
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
            else:
                os.close(own.lock_fd)

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """This process's own directory (where appends go)."""
        if self._own is None:
            raise SpoolError("the spool is not open")
        return self._own.path

    def append(self, batch_id: uuid.UUID, rows: int, data: bytes) -> None:
        """Append one batch and fsync it; when this returns the batch survives a crash.

        Raises :class:`SpoolError` if the disk refuses (the segment is cut back to its last
        intact record, so a failed append never leaves a torn record behind in a live spool).
        """
        if self._own is None:
            raise SpoolError("the spool is not open")
        record = encode_record(batch_id, rows, data, time.time_ns() // 1000)
        if len(record) - HEADER_SIZE > MAX_PAYLOAD:
            raise SpoolError(f"a batch of {len(record)} bytes is too large for one spool record")
        segment = self._active
        if (
            segment is not None
            and segment.size
            and (segment.size + len(record) > self.segment_max_bytes)
        ):
            self._finish_active()
            segment = None
        try:
            if segment is None:
                segment = self._new_segment()
            fd = self._active_fd
            assert fd is not None
            view = memoryview(record)
            written = 0
            try:
                while written < len(record):
                    written += os.write(fd, view[written:])
                os.fsync(fd)
                deleted = os.fstat(fd).st_nlink == 0
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, segment.size)
                raise
            if deleted:
                # Someone removed the spool directory (or this segment): the write went to a
                # file nobody can find again, so it is no write at all. The next append tries
                # a new segment, which fails for as long as the directory is missing.
                self._finish_active()
                raise OSError(errno.ENOENT, f"the segment {segment.path} was deleted")
        except OSError as exc:
            raise SpoolError(
                f"cannot write to the spool {self._own.path}: {exc.strerror or exc}"
            ) from exc
        segment.size += len(record)
        segment.records += 1
        segment.rows += rows

    def _new_segment(self) -> _Segment:
        assert self._own is not None
        while True:
            path = self._own.path / f"{self._next_seq:010d}.seg"
            self._next_seq += 1
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            except FileExistsError:
                continue
            break
        _fsync_dir(self._own.path)
        segment = _Segment(path, 0)
        self._own.segments.append(segment)
        self._active = segment
        self._active_fd = fd
        return segment

    def _finish_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
        self._active_fd = None
        self._active = None

    # -- reading ------------------------------------------------------------------------------

    @property
    def pending_records(self) -> int:
        """Unacknowledged records (counted from headers; damaged ones count until found)."""
        return sum(s.records for s in self._all_segments())

    @property
    def pending_rows(self) -> int:
        """Rows in unacknowledged records (same caveat as ``pending_records``)."""
        return sum(s.rows for s in self._all_segments())

    def is_empty(self) -> bool:
        """True when no unread byte remains in any segment."""
        return not any(s.read_offset < s.size for s in self._all_segments())

    def _all_segments(self) -> Iterator[_Segment]:
        for owner in self._adopted:
            yield from owner.segments
        if self._own is not None:
            yield from self._own.segments

    def peek(self) -> SpoolRecord | None:
        """The oldest unacknowledged record, or None. Damaged records are reported and skipped.

        Calling ``peek`` again without ``ack`` returns the same record.
        """
        while True:
            owner, segment = self._head()
            if segment is None or owner is None:
                return None
            if segment.read_offset >= segment.size:
                if segment is self._active:
                    return None
                self._drop_segment(owner, segment)
                continue
            record = self._read_at(segment)
            if record is not None:
                return record

    def ack(self, record: SpoolRecord) -> None:
        """Retire ``record`` (the one ``peek`` returned); a fully acked segment is deleted."""
        owner, segment = self._head()
        if segment is None or owner is None or segment.path != record.segment:
            raise SpoolError("ack of a record that is not the oldest in the spool")
        if record.offset != segment.read_offset:
            raise SpoolError("ack of a record that is not the oldest in the spool")
        segment.read_offset = record.end
        segment.records = max(0, segment.records - 1)
        segment.rows = max(0, segment.rows - record.rows)
        if segment.read_offset >= segment.size:
            self._drop_segment(owner, segment)

    def _head(self) -> tuple[_Owner | None, _Segment | None]:
        while self._adopted:
            owner = self._adopted[0]
            if owner.segments:
                return owner, owner.segments[0]
            self._retire_owner_if_done(owner)
        if self._own is not None and self._own.segments:
            return self._own, self._own.segments[0]
        return None, None

    def _drop_segment(self, owner: _Owner, segment: _Segment) -> None:
        if segment.reader is not None:
            segment.reader.close()
            segment.reader = None
        if segment is self._active:
            self._finish_active()
        segment.records = 0
        segment.rows = 0
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        owner.segments.popleft()
        if owner is not self._own:
            self._retire_owner_if_done(owner)

    def _retire_owner_if_done(self, owner: _Owner) -> None:
        if owner.segments or owner is self._own:
            return
        with contextlib.suppress(ValueError):
            self._adopted.remove(owner)
        self._remove_owner_dir(owner)

    def _remove_owner_dir(self, owner: _Owner) -> None:
        # Lock file first, directory last: a directory without a lock is known to be empty
        # (or being emptied) and is never adopted.
        with contextlib.suppress(OSError):
            for leftover in owner.path.iterdir():
                if leftover.name != LOCK_NAME and not _SEGMENT_RE.match(leftover.name):
                    leftover.unlink()
        with contextlib.suppress(FileNotFoundError):
            (owner.path / LOCK_NAME).unlink()
        with contextlib.suppress(OSError):
            owner.path.rmdir()
        with contextlib.suppress(OSError):
            os.close(owner.lock_fd)

    def _read_at(self, segment: _Segment) -> SpoolRecord | None:
        """The record at ``segment.read_offset``; on damage, report, resync and return None."""
        if segment.reader is None:
            try:
                segment.reader = open(segment.path, "rb")  # noqa: SIM115 - kept open across calls
            except FileNotFoundError:
                log.error(
                    "spool: the segment %s was deleted by someone else; its %d record(s) "
                    "(%d row(s)) are lost",
                    segment.path,
                    segment.records,
                    segment.rows,
                )
                self.damaged_records += segment.records
                segment.read_offset = segment.size
                return None
        reader = segment.reader
        offset = segment.read_offset
        reader.seek(offset)
        header = reader.read(HEADER_SIZE)
        problem: str | None = None
        if len(header) < HEADER_SIZE:
            problem = f"torn header ({len(header)} of {HEADER_SIZE} bytes)"
        else:
            magic, length, crc = _HEADER.unpack(header)
            if magic != MAGIC:
                problem = "bad magic"
            elif length < PREFIX_SIZE or length > MAX_PAYLOAD:
                problem = f"bad length {length}"
            elif offset + HEADER_SIZE + length > segment.size:
                problem = (
                    f"torn record ({segment.size - offset - HEADER_SIZE} of {length} "
                    "payload bytes on disk)"
                )
            else:
                payload = reader.read(length)
                length_bytes = struct.pack("<I", length)
                if len(payload) != length:
                    problem = "short read"
                elif zlib.crc32(payload, zlib.crc32(length_bytes)) != crc:
                    problem = "checksum mismatch"
                else:
                    raw_id, created_us, rows = _PREFIX.unpack_from(payload)
                    return SpoolRecord(
                        batch_id=uuid.UUID(bytes=raw_id),
                        rows=rows,
                        created_us=created_us,
                        data=payload[PREFIX_SIZE:],
                        segment=segment.path,
                        offset=offset,
                        end=offset + HEADER_SIZE + length,
                    )
        resume = find_magic(reader, offset + 1, segment.size)
        self.damaged_records += 1
        log.warning(
            "spool: damaged record in %s at offset %d (%s); skipped %d byte(s), %s",
            segment.path,
            offset,
            problem,
            resume - offset,
            "reading on from the next intact record"
            if resume < segment.size
            else "nothing follows it in this segment",
        )
        segment.read_offset = resume
        return None

    def _list_segments(self, path: Path) -> list[_Segment]:
        """Segments of an adopted directory, in order, with their records counted."""
        segments: list[_Segment] = []
        for name in sorted(os.listdir(path)):
            if not _SEGMENT_RE.match(name):
                continue
            segment_path = path / name
            try:
                size = segment_path.stat().st_size
            except FileNotFoundError:
                continue
            segment = _Segment(segment_path, size)
            self._count_records(segment)
            if segment.size == 0:
                with contextlib.suppress(FileNotFoundError):
                    segment_path.unlink()
                continue
            segments.append(segment)
        return segments

    def _count_records(self, segment: _Segment) -> None:
        """Count records by walking headers (cheap; checksums are verified when replayed)."""
        try:
            segment.records, segment.rows = count_segment(segment.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
