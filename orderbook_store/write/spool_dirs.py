"""Where spools live, and what one holds, without opening or adopting it.

``DB_SPOOL_DIR`` (or the per-user default) holds one directory per target database, and that
one directory per writer (see :mod:`orderbook_store.write.spool` for the layout). ``survey``
reads headers only and takes no lock a writer could miss: it is what ``doctor`` reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from orderbook_store.write.spool import LOCK_NAME, OWNER_RE
from orderbook_store.write.spool_records import count_segment

__all__ = ["SpoolSurvey", "default_spool_dir", "survey", "target_directory", "target_dirname"]


def default_spool_dir() -> Path:
    """Per-user state directory used when ``DB_SPOOL_DIR`` is not set."""
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state else Path.home() / ".local" / "state"
    return base / "orderbook_store" / "spool"


def target_dirname(host: str, port: int | str, database: str) -> str:
    """File-system-safe name for one target database (no user, no password)."""
    raw = f"{database}@{host}-{port}"
    return re.sub(r"[^A-Za-z0-9._@-]", "_", raw)[:200]


def target_directory(
    spool_dir: str | os.PathLike[str] | None, host: str, port: int | str, database: str
) -> Path:
    """Where writers on this host spool batches for one database (``DB_SPOOL_DIR`` or the
    per-user default, then one sub-directory per database)."""
    root = Path(spool_dir) if spool_dir is not None else default_spool_dir()
    return root.expanduser() / target_dirname(host, port, database)


@dataclass(frozen=True, slots=True)
class SpoolSurvey:
    """What waits in one database's spool directory, by whether its writer still runs."""

    running_writers: int = 0
    running_rows: int = 0
    stopped_writers: int = 0
    stopped_rows: int = 0


def survey(directory: Path) -> SpoolSurvey:
    """Count, without taking anything over, the rows each writer's spool holds (unacknowledged
    records; acknowledgements live in the writer's memory). Reads only: for ``doctor``."""
    counts = [0, 0, 0, 0]
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return SpoolSurvey()
    for name in names:
        owner = directory / name
        if not OWNER_RE.match(name) or not owner.is_dir():
            continue
        rows = 0
        for segment in sorted(owner.glob("*.seg")):
            with contextlib.suppress(OSError):
                rows += count_segment(segment)[1]
        index = 0 if _has_living_owner(owner) else 2
        counts[index] += 1
        counts[index + 1] += rows
    return SpoolSurvey(*counts)


def _has_living_owner(owner: Path) -> bool:
    """A running writer holds an exclusive flock on its ``lock`` file for its whole life."""
    try:
        fd = os.open(owner / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
