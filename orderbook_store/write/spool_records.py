"""The spool's record format: how one batch is framed on disk, and found again after damage.

Record format (little endian)::

    magic  4 bytes   b"\\xa7OBS"
    length u32       payload length
    crc    u32       CRC-32 of length and payload
    payload:
        batch_id    16 bytes (UUID; the ledger key that makes replays exactly-once)
        created_us  u64      when the batch was formed, microseconds since the epoch
        rows        u32      number of rows in the batch
        data        COPY text of the rows (``pg.copy_in.encode_copy_text``)
"""

from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "PREFIX_SIZE",
    "count_segment",
    "encode_record",
    "find_magic",
]

MAGIC = b"\xa7OBS"
_HEADER = struct.Struct("<4sII")
_PREFIX = struct.Struct("<16sQI")
HEADER_SIZE = _HEADER.size
PREFIX_SIZE = _PREFIX.size
#: A record longer than this is treated as damage (a corrupted length), not allocated.
MAX_PAYLOAD = 1 << 31


def encode_record(batch_id: uuid.UUID, rows: int, data: bytes, created_us: int) -> bytes:
    """The bytes of one record, header included (exposed for tests that damage records)."""
    prefix = _PREFIX.pack(batch_id.bytes, created_us, rows)
    length = len(prefix) + len(data)
    length_bytes = struct.pack("<I", length)
    crc = zlib.crc32(data, zlib.crc32(prefix, zlib.crc32(length_bytes)))
    return _HEADER.pack(MAGIC, length, crc) + prefix + data


def find_magic(reader: BinaryIO, start: int, end: int) -> int:
    """Offset of the next magic at or after ``start`` (``end`` if none)."""
    chunk_size = 1 << 20
    position = start
    while position < end:
        reader.seek(position)
        chunk = reader.read(min(chunk_size, end - position) + len(MAGIC) - 1)
        if not chunk:
            break
        found = chunk.find(MAGIC)
        if found >= 0:
            return position + found
        position += chunk_size
    return end


def count_segment(path: Path) -> tuple[int, int]:
    """(records, rows) of a segment, by walking headers (checksums are checked on replay)."""
    records = rows = 0
    size = path.stat().st_size
    with open(path, "rb") as reader:
        offset = 0
        while offset + HEADER_SIZE + PREFIX_SIZE <= size:
            reader.seek(offset)
            head = reader.read(HEADER_SIZE + PREFIX_SIZE)
            magic, length, _crc = _HEADER.unpack_from(head)
            end = offset + HEADER_SIZE + length
            if magic != MAGIC or length < PREFIX_SIZE or end > size:
                offset = find_magic(reader, offset + 1, size)
                continue
            records += 1
            rows += _PREFIX.unpack_from(head, HEADER_SIZE)[2]
            offset = end
    return records, rows
