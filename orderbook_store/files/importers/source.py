"""Opening import files: compression detected from the bytes, identity hashing, line streaming.

A file's compression is read from its first bytes (gzip ``1f 8b``, zip ``PK\\x03\\x04``,
Parquet ``PAR1``), never from its name. A zip archive holds one import unit per member.
Decompressed text is read in large blocks and cut into lines with Arrow kernels, so memory
stays constant (one block) whatever the file's size, and every line keeps its physical number.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Decompressed bytes read per block: large enough that Arrow's per-call overhead vanishes,
#: small enough that a block, its lines and its COPY text stay a few tens of megabytes.
BLOCK_BYTES: Final = 4 << 20

GZIP_MAGIC: Final = b"\x1f\x8b"
ZIP_MAGIC: Final = b"PK\x03\x04"
PARQUET_MAGIC: Final = b"PAR1"


@dataclass(frozen=True)
class ImportUnit:
    """One thing imported as a whole: a file, or one member of a zip archive."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        """The file name the format rules look at (the member's for a zip member)."""
        return Path(self.member).name if self.member else self.path.name

    @property
    def display(self) -> str:
        """How the unit is shown to people and recorded in the ledger and quarantine."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)


def compression_of(path: Path) -> str:
    """``"gzip"``, ``"zip"``, ``"parquet"`` or ``"plain"``, from the file's first bytes."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic == ZIP_MAGIC:
        return "zip"
    if magic == PARQUET_MAGIC:
        return "parquet"
    return "plain"


def units_of(path: Path) -> list[ImportUnit]:
    """The import units of one file: itself, or each non-directory member of a zip."""
    if compression_of(path) != "zip":
        return [ImportUnit(path)]
    with zipfile.ZipFile(path) as archive:
        members = [info.filename for info in archive.infolist() if not info.is_dir()]
    return [ImportUnit(path, member) for member in members]


def open_binary(unit: ImportUnit, digest: Digest | None = None) -> IO[bytes]:
    """The unit's decompressed bytes as a readable binary stream (caller closes it).

    With ``digest``, every byte read is also fed to it (the content hash of the ledger).
    """
    stream: IO[bytes]
    if unit.member is not None:
        # The member keeps the archive's file open after the archive object is closed.
        with zipfile.ZipFile(unit.path) as archive:
            stream = archive.open(unit.member)
    elif compression_of(unit.path) == "gzip":
        # Arrow's gzip stream is C++ (no GIL held while inflating) and reads the several
        # members an appending writer leaves as one stream.
        stream = pa.CompressedInputStream(pa.OSFile(str(unit.path)), "gzip")
    else:
        stream = unit.path.open("rb")
    return stream if digest is None else cast(IO[bytes], _Hashing(stream, digest))


class Digest(Protocol):
    """What ``hashlib`` objects offer."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Hashing(io.RawIOBase):
    """A read-only stream that feeds what it reads to a digest."""

    def __init__(self, stream: IO[bytes], digest: Digest) -> None:
        super().__init__()
        self._stream = stream
        self._digest = digest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = bytes(self._stream.read(size))
        self._digest.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def head_of(unit: ImportUnit, limit: int = 64 << 10) -> bytes:
    """Up to ``limit`` decompressed bytes from the start of the unit (for format detection)."""
    with open_binary(unit) as stream:
        return bytes(stream.read(limit))


def identity_of(unit: ImportUnit, fmt: str, context: dict[str, str]) -> str:
    """SHA-256 of the file's bytes, the zip member's name, the format and the path context.

    Hashing the stored bytes (compressed as they are) costs one fast read of the file, so a
    rerun over thousands of imported files recognises each one without decompressing it.
    """
    digest = hashlib.sha256()
    with unit.path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return keyed(digest.hexdigest(), fmt, context, member=unit.member or "")


def keyed(content_hex: str, fmt: str, context: dict[str, str], *, member: str = "") -> str:
    """A ledger key: a content hash bound to how it was read (format, path context)."""
    digest = hashlib.sha256(content_hex.encode())
    digest.update(b"\0member=" + member.encode())
    digest.update(b"\0format=" + fmt.encode())
    for key in sorted(context):
        digest.update(f"\0{key}={context[key]}".encode())
    return digest.hexdigest()


@dataclass
class LineBlock:
    """Consecutive lines of a text file: ``lines[i]`` is physical line ``first_line + i``.

    ``data`` is the block's bytes without the final line terminator, for parsers that take
    the block whole; ``lines`` cuts it into lines (binary, terminators dropped) on first use.
    """

    def __init__(self, first_line: int, data: bytes) -> None:
        self.first_line = first_line
        self.data = data
        self.count = data.count(b"\n") + 1
        self._lines: pa.Array | None = None

    @property
    def lines(self) -> pa.Array:
        if self._lines is None:
            pieces = pc.split_pattern(pa.array([self.data], pa.binary()), "\n")
            lines = pc.list_flatten(pieces)
            if b"\r" in self.data:  # CRLF files: drop the carriage return ending each line
                lines = pc.replace_substring_regex(lines, "\r$", "")
            self._lines = lines
        return self._lines


def iter_lines(stream: IO[bytes], block_bytes: int = BLOCK_BYTES) -> Iterator[LineBlock]:
    """Cut a byte stream into blocks of whole, numbered lines (``\\n`` or ``\\r\\n``).

    A final line without a terminator is a line; an empty file has none. Lines stay bytes
    here, so a line that is not UTF-8 is quarantined by the caller rather than failing a block.
    """
    carry = b""
    line_no = 1
    while True:
        data = stream.read(block_bytes)
        if not data:
            break
        data = carry + bytes(data)
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1 :]
        block = LineBlock(line_no, data[:cut])
        yield block
        line_no += block.count
    if carry:
        yield LineBlock(line_no, carry)


def line_numbers(first: int, count: int) -> pa.Array:
    """``first, first + 1, ...`` as int64 (built by numpy: a Python range costs 0.3 µs each)."""
    return pa.array(np.arange(first, first + count, dtype=np.int64))
