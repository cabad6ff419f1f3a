"""Where the lake is: ``LAKE_URL`` as a pyarrow filesystem and a root path inside it.

``LAKE_URL`` is a local directory (a path or ``file://`` URL) or ``s3://bucket/prefix`` on any
S3-compatible store (AWS S3, DigitalOcean Spaces, MinIO): ``LAKE_ENDPOINT_URL`` names a store
other than AWS (``https://fra1.digitaloceanspaces.com``), ``LAKE_REGION`` its region, and
``LAKE_ACCESS_KEY_ID``/``LAKE_SECRET_ACCESS_KEY`` the key (without them, pyarrow's usual AWS
credential chain applies). The S3 client is pyarrow's own (the AWS SDK inside Arrow): nothing
here speaks S3 itself. The secret key lives in ``Settings`` as a ``SecretStr`` and is handed
to pyarrow only; ``Lake``'s ``repr`` and ``url`` never show it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from orderbook_store.errors import ConfigError

if TYPE_CHECKING:
    from orderbook_store.settings import Settings

__all__ = ["Lake", "directory_lake", "open_lake", "printable_url"]

#: S3's (and Spaces') rule for bucket names; anything else (a key pasted into the URL) is refused.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Lake:
    """A lake's filesystem and root (a path inside it, no trailing slash).

    ``url`` is what the user configured, safe to print; ``filesystem`` is a
    ``pyarrow.fs.FileSystem`` (it holds the credentials, so it is kept out of ``repr``).
    """

    url: str
    root: str
    filesystem: Any = field(repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        """Whether the lake is a local directory (files can be renamed into place)."""
        return bool(self.filesystem.type_name == "local")

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        return posixpath.join(self.root, *parts)

    def relative(self, path: str) -> str:
        """``path`` relative to the root, as the catalog records it."""
        return posixpath.relpath(path, self.root)


def open_lake(settings: Settings) -> Lake | None:
    """The lake ``settings`` configure, or ``None`` without ``LAKE_URL``.

    Raises ``ConfigError`` naming the variable for a URL that cannot be a lake. Opening
    an S3 lake does not contact the store; the first read or write does.
    """
    url = settings.lake_url
    if url is None or not url.strip():
        return None
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "s3":
        return _s3_lake(url, settings)
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:2] == ":"):  # also C:\\...
        return _local_lake(url)
    raise ConfigError(
        f"LAKE_URL={printable_url(url)!r}: expected a directory or s3://bucket/prefix "
        f"(scheme {scheme!r} is not supported)"
    )


def printable_url(url: str) -> str:
    """``url`` without anything that may be a key: what precedes the last ``@`` after the
    scheme (a secret key may itself hold ``/``, ``:`` or ``?``) and the query."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    if "?" in rest:
        rest = rest.partition("?")[0] + "?***"
    return f"{scheme}{separator}{rest}"


def directory_lake(directory: str | Path, *, url: str | None = None) -> Lake:
    """A local directory as a lake (``LAKE_URL``, ``export --out DIR``, ``prune --archive
    DIR``), made if missing; ``url`` is how it is shown (the directory by default). Raises
    ``OSError`` when the directory cannot be made (callers say which setting named it)."""
    from pyarrow import fs

    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    shown = url if url is not None else str(directory)
    return Lake(url=shown, root=path.resolve().as_posix(), filesystem=fs.LocalFileSystem())


def _local_lake(url: str) -> Lake:
    try:
        return directory_lake(urlsplit(url).path if url.startswith("file:") else url, url=url)
    except OSError as exc:
        raise ConfigError(f"LAKE_URL={url!r}: cannot create the directory ({exc})") from None


def _s3_lake(url: str, settings: Settings) -> Lake:
    from pyarrow import fs

    parts = urlsplit(url)
    bucket = parts.netloc
    if "@" in url or parts.query or parts.fragment:
        raise ConfigError(
            f"LAKE_URL={printable_url(url)!r}: put no key or options in the URL; use "
            "LAKE_ACCESS_KEY_ID, LAKE_SECRET_ACCESS_KEY, LAKE_REGION and LAKE_ENDPOINT_URL"
        )
    if not bucket:
        raise ConfigError(f"LAKE_URL={url!r}: name a bucket, as in s3://bucket/prefix")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            f"LAKE_URL={'s3://***' if ':' in bucket else url!r}: a bucket name is 3 to 63 "
            "lowercase letters, digits, dots and hyphens, as in s3://bucket/prefix"
        )
    options: dict[str, Any] = {}
    if settings.lake_region:
        options["region"] = settings.lake_region
    if settings.lake_endpoint_url:
        endpoint = urlsplit(settings.lake_endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise ConfigError(
                f"LAKE_ENDPOINT_URL={settings.lake_endpoint_url!r}: expected "
                "http(s)://host[:port], e.g. https://fra1.digitaloceanspaces.com"
            )
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme
    key_id, secret = settings.lake_access_key_id, settings.lake_secret_access_key
    if (key_id is None) != (secret is None):
        raise ConfigError(
            "LAKE_ACCESS_KEY_ID and LAKE_SECRET_ACCESS_KEY go together: set both or neither"
        )
    if key_id is not None and secret is not None:
        options["access_key"] = key_id
        options["secret_key"] = secret.get_secret_value()
    filesystem = fs.S3FileSystem(**options)
    root = posixpath.join(bucket, parts.path.strip("/")).rstrip("/")
    return Lake(url=f"s3://{root}", root=root, filesystem=filesystem)
