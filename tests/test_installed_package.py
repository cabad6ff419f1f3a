"""An installed package migrates: a wheel, installed into a fresh virtual environment, runs
``orderbook-store upgrade``, ``stamp``, ``current`` and ``doctor`` from a directory that has
no alembic.ini and no checkout, with the revisions it carries."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from orderbook_store.ops import migrations

from catalog import ORIGINAL_DDL, execute, fetchval

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the package, built from a copy of the sources (the checkout stays clean)
    with this environment's setuptools: no index, no build environment to fetch."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "orderbook_store",
        source / "orderbook_store",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"]
    run([*pip, "--no-build-isolation", "--wheel-dir", str(wheels), str(source)])
    (wheel,) = wheels.glob("orderbook_store-*.whl")
    return wheel


def install_into_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new virtual environment holding the wheel (and its console script); its dependencies
    come from this environment's site-packages, appended to its path after the install, so
    nothing is downloaded. The checkout is never on its path."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    run([*pip, "--no-deps", "--no-index", str(wheel)])
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    dependencies = sysconfig.get_path("purelib")
    Path(site.stdout.strip(), "dependencies.pth").write_text(dependencies + "\n")
    return venv / "bin"


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_migrates_from_any_directory(
    tmp_path: Path, make_database: Callable[[], str]
) -> None:
    bin_dir = install_into_fresh_venv(build_wheel(tmp_path), tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = make_database()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "DATABASE_URL": url,
        "DB_SPOOL_DIR": str(tmp_path / "spool"),
        "HOME": str(tmp_path),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "orderbook-store"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=elsewhere,
            env=env,
        )

    where = run(
        [str(bin_dir / "python"), "-c", "import orderbook_store; print(orderbook_store.__file__)"],
        cwd=elsewhere,
        env=env,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout

    head = migrations.head_revision()
    before = cli("current")
    assert before.returncode == 0, before.stderr
    assert "not migrated" in before.stdout

    upgraded = cli("upgrade")
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert asyncio.run(fetchval(url, "SELECT version_num FROM alembic_version")) == head
    assert asyncio.run(fetchval(url, "SELECT to_regclass('orderbook_data') IS NOT NULL")) is True
    now = cli("current")
    assert now.returncode == 0 and f"database at {head} (head)" in now.stdout, now.stderr

    doctor = cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["migrations"]["status"] == "ok", checks["migrations"]
    assert checks["migrations"]["value"] == f"at head {head}"

    # adopting a hand-made table: stamp it at 0001, then upgrade it to head
    adopted = make_database()
    asyncio.run(execute(adopted, ORIGINAL_DDL))
    env["DATABASE_URL"] = adopted
    stamped = cli("stamp", "0001")
    assert stamped.returncode == 0, stamped.stdout + stamped.stderr
    assert asyncio.run(fetchval(adopted, "SELECT version_num FROM alembic_version")) == "0001"
    assert cli("upgrade").returncode == 0
    assert asyncio.run(fetchval(adopted, "SELECT version_num FROM alembic_version")) == head
