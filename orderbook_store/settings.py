"""One typed ``Settings`` object for everything that connects to the database.

Values come from, in order of precedence: arguments, ``DB_*`` environment variables, a ``.env``
file, then ``DATABASE_URL`` (a libpq connection URL, as DigitalOcean hands out, read as libpq
reads it: see ``conninfo``) for whatever the ``DB_*`` variables leave unset, then the production
defaults of the original plan (port 25060, ``sslmode=require``, pool 10, batch 50). A password
none of these gives comes from ``PGPASSWORD``, as in psql. The old collector's JSON config is
read by ``Settings.from_json``.

The password is a ``SecretStr``: it is kept out of ``repr``, URLs, logs and error messages.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from orderbook_store.conninfo import parse_url, redact_url
from orderbook_store.errors import ConfigError

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: tuple[str, ...] = get_args(SslMode)

#: Field name -> the environment variable a user sets, for error messages.
_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "lake_url": "LAKE_URL",
    "lake_endpoint_url": "LAKE_ENDPOINT_URL",
    "lake_region": "LAKE_REGION",
    "lake_access_key_id": "LAKE_ACCESS_KEY_ID",
    "lake_secret_access_key": "LAKE_SECRET_ACCESS_KEY",
}

_SECRET_FIELDS = frozenset(
    {"password", "database_url", "DATABASE_URL", "read_url", "lake_secret_access_key"}
)


def _lake_variable(name: str) -> Any:
    """A lake setting read from ``LAKE_<NAME>`` (not ``DB_``: the lake is not the database)."""
    return AliasChoices(f"LAKE_{name.upper()}", f"lake_{name}")


def _env_name(field: str) -> str:
    return _ENV_NAMES.get(field, "DB_" + field.upper())


class Settings(BaseSettings):
    """Connection and behaviour settings, from arguments, ``DB_*`` variables, ``.env`` or a URL.

    Raises ``ConfigError`` naming the variable and its value when a value cannot work (the
    password's value is never shown).
    """

    model_config = SettingsConfigDict(
        env_prefix="DB_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    host: str = "localhost"
    port: int = Field(25060, ge=1, le=65535)
    name: str = "defaultdb"
    user: str = "doadmin"
    password: SecretStr | None = None
    sslmode: SslMode = "require"
    sslrootcert: Path | None = None
    pool_size: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(50, ge=1, le=1_000_000)
    database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    application_name: str = "orderbook_store"
    connect_timeout_s: float = Field(10.0, gt=0)
    statement_timeout_ms: int = Field(0, ge=0)
    idle_in_transaction_session_timeout_ms: int = Field(60_000, ge=0)
    flush_interval_s: float = Field(0.2, gt=0)
    max_pending: int = Field(200_000, ge=1)
    max_batch_rows: int = Field(50_000, ge=1, le=10_000_000)
    max_batch_bytes: int = Field(32 << 20, ge=1 << 16, le=1 << 30)
    spool_dir: Path | None = None
    pgbouncer: bool | None = None
    partition_period: Literal["day", "week", "month"] = "day"
    read_url: SecretStr | None = None
    read_host: str | None = None
    read_max_lag_s: float = Field(30.0, gt=0)
    #: Where archived partitions go and cross-tier reads find them: a directory or
    #: ``s3://bucket/prefix`` (see ``files.lake_store``).
    lake_url: str | None = Field(None, validation_alias=_lake_variable("url"))
    lake_endpoint_url: str | None = Field(None, validation_alias=_lake_variable("endpoint_url"))
    lake_region: str | None = Field(None, validation_alias=_lake_variable("region"))
    lake_access_key_id: str | None = Field(None, validation_alias=_lake_variable("access_key_id"))
    lake_secret_access_key: SecretStr | None = Field(
        None, validation_alias=_lake_variable("secret_access_key")
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_url(cls, data: Any) -> Any:
        """Take from ``DATABASE_URL`` every part that no ``DB_*`` variable or argument set;
        the password from ``PGPASSWORD`` when none of them gives one."""
        if not isinstance(data, dict):
            return data
        url = data.get("database_url", data.get("DATABASE_URL"))
        if isinstance(url, SecretStr):
            url = url.get_secret_value()
        if url:
            parts = parse_url(str(url))
            # libpq's defaults (sslmode "prefer", port 5432): a URL keeps libpq's meaning.
            parts.setdefault("sslmode", "prefer")
            parts.setdefault("port", 5432)
            data = {**parts, **data}
        if "password" not in data and os.environ.get("PGPASSWORD"):
            # libpq's last resort, as psql uses it: no argument, DB_PASSWORD or URL gave one.
            data = {**data, "password": os.environ["PGPASSWORD"]}
        return data

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], **overrides: Any) -> Settings:
        """Read the old collector's JSON config (``{"postgresql": {...}}``).

        ``"password": "from_env"`` (or no password) means ``DB_PASSWORD``.
        """
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read collector config {str(path)!r}: {exc}") from None
        return cls.from_collector_config(config, **overrides)

    @classmethod
    def from_collector_config(cls, config: Mapping[str, Any], **overrides: Any) -> Settings:
        """Build settings from the old collector's config dict (the ``postgresql`` section)."""
        section = config.get("postgresql", config)
        if not isinstance(section, Mapping):
            raise ConfigError("collector config: 'postgresql' must be an object")
        mapping = {
            "host": "host",
            "port": "port",
            "database": "name",
            "user": "user",
            "password": "password",
            "pool_size": "pool_size",
            "batch_size": "batch_size",
            "sslmode": "sslmode",
            "sslrootcert": "sslrootcert",
        }
        values: dict[str, Any] = {}
        for key, field in mapping.items():
            if key in section and section[key] is not None:
                values[field] = section[key]
        if values.get("password") == "from_env":
            del values["password"]  # DB_PASSWORD from the environment fills it
        values.update(overrides)
        return cls(**values)

    @property
    def behind_pgbouncer(self) -> bool:
        """Whether connections go through PgBouncer in transaction mode.

        ``DB_PGBOUNCER`` decides; when unset, DigitalOcean's pool port 25061 means yes.
        Behind PgBouncer, named prepared statements cannot be reused across transactions, so
        the engine turns asyncpg's statement cache off and names each statement uniquely.
        """
        return self.pgbouncer if self.pgbouncer is not None else self.port == 25061

    def read_settings(self) -> Settings | None:
        """Settings for a read-only node (``DB_READ_URL`` or ``DB_READ_HOST``), if one is set."""
        if self.read_url is not None:
            update = parse_url(self.read_url.get_secret_value(), variable="DB_READ_URL")
            update.setdefault("sslmode", self.sslmode)
            update.setdefault("port", 5432)
        elif self.read_host is not None:
            update = {"host": self.read_host}
        else:
            return None
        # Validated like any settings: the URL's parts are text until then.
        cleared = {"read_url": None, "read_host": None, "database_url": None}
        return type(self)(**{**self.model_dump(), **update, **cleared})

    # -- what drivers need -------------------------------------------------------------

    def ssl_argument(self) -> str | ssl.SSLContext | bool:
        """The value of asyncpg's ``ssl`` argument that gives libpq's meaning of ``sslmode``.

        ``verify-ca`` and ``verify-full`` check the server against ``sslrootcert`` (the
        cluster's CA file); ``require`` encrypts without verifying, as libpq does.
        """
        mode = self.sslmode
        if mode == "require" and self.sslrootcert is not None:
            # libpq: given a root certificate, ``require`` verifies the chain as verify-ca does.
            mode = "verify-ca"
        if mode not in ("verify-ca", "verify-full"):
            return mode
        cafile = self.sslrootcert
        if cafile is None:
            default = Path.home() / ".postgresql" / "root.crt"
            if not default.exists():
                raise ConfigError(
                    f"DB_SSLMODE={mode!r} needs DB_SSLROOTCERT (the cluster's CA certificate file)"
                )
            cafile = default
        if not cafile.is_file():
            raise ConfigError(f"DB_SSLROOTCERT={str(cafile)!r}: no such file")
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_settings(self) -> dict[str, str]:
        """Session parameters sent at connect time.

        Behind PgBouncer only ``application_name``: PgBouncer refuses any other startup
        parameter ("unsupported startup parameter"), and a ``SET`` would leak to other clients
        in transaction mode. There the timeouts come from the role (``ALTER ROLE ... SET``, as
        ``orderbook-store roles --print-sql`` does).
        """
        if self.behind_pgbouncer:
            return {"application_name": self.application_name}
        values = {
            "application_name": self.application_name,
            "idle_in_transaction_session_timeout": str(self.idle_in_transaction_session_timeout_ms),
        }
        if self.statement_timeout_ms:
            values["statement_timeout"] = str(self.statement_timeout_ms)
        return values

    def asyncpg_connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect`` (contains the password: never log it)."""
        kwargs: dict[str, Any] = {"statement_cache_size": 0} if self.behind_pgbouncer else {}
        return kwargs | {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password.get_secret_value() if self.password else None,
            "database": self.name,
            "ssl": self.ssl_argument(),
            "timeout": self.connect_timeout_s,
            "server_settings": self.server_settings(),
        }

    def sqlalchemy_url(self) -> URL:
        """A password-free SQLAlchemy URL naming the server (connections use the kwargs above)."""
        return URL.create(
            "postgresql+asyncpg",
            username=self.user,
            host=self.host,
            port=self.port,
            database=self.name,
        )

    def describe(self) -> str:
        """``user@host:port/database`` for messages; never the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.name}"

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            if key in ("database_url", "read_url") and value is not None:
                yield key, redact_url(value.get_secret_value())
            else:
                yield key, value


def _describe(exc: ValidationError) -> str:
    """One readable line per invalid setting: variable name, value, what is expected."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a whole-object check (DATABASE_URL); its message is redacted
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        shown = "(hidden)" if field in _SECRET_FIELDS else repr(error.get("input"))
        lines.append(f"{_env_name(field)}={shown}: {error['msg']}")
    return "invalid settings: " + "; ".join(lines)
