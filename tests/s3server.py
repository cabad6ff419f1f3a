"""A real S3-compatible server on loopback for lake tests: moto's standalone server.

No MinIO package is reachable here; ``moto`` (from PyPI) speaks the S3 protocol over HTTP,
which is what pyarrow's S3 client, polars and boto3 talk to. ``s3_server()`` starts
``python -m moto.server`` on a free 127.0.0.1 port in its own process, waits until it answers,
and stops it (and with it every bucket, which lives in its memory) when the block ends.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["S3Server", "free_port", "s3_server"]

#: Any key works on moto; these are the documented AWS example values, never real ones.
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the key to use (``endpoint_url`` is ``http://host:port``)."""

    endpoint_url: str
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    region: str = REGION


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(endpoint_url: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint_url + "/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the duration of the block; stopped (process reaped) afterwards."""
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            # Not a pipe: moto logs every request there, and a pipe nobody reads fills up
            # (64 KB) and stops the server mid-request.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(endpoint):
                    break
                time.sleep(0.1)
            if process.poll() is None and _answers(endpoint):
                yield S3Server(endpoint_url=endpoint)
                return
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    raise RuntimeError("moto's S3 server did not start (python -m moto.server); is moto installed?")
