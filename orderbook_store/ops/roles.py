"""Least-privilege roles: a migration owner, a writer and a reader.

``roles_sql()`` returns one idempotent SQL script (``orderbook-store roles --print-sql``). Run
it with ``psql`` as an administrator (DigitalOcean's ``doadmin``) once before the first
``alembic upgrade head`` and again after every upgrade: the first run creates the roles and
the schema privileges, later runs grant on the tables the migrations created (a revision that
rebuilds a table, such as partitioning, drops the grants on the old one).

What each role may do, and why:

``owner`` (migrations)
    Owns the tables: ``alembic upgrade head`` runs as this role. ``CREATE`` on the schema.
``writer`` (collectors)
    ``INSERT`` on ``orderbook_data`` (``COPY ... FROM STDIN`` needs nothing more) and ``USAGE``
    on its id sequence. On the writer's ledger ``orderbook_write_batches``: ``INSERT`` and
    ``SELECT`` (the exactly-once check is ``INSERT ... ON CONFLICT (batch_id) DO NOTHING
    RETURNING batch_id``, and ``RETURNING`` and the conflict target read ``batch_id``) and
    ``DELETE`` (the hourly prune of entries older than the retention, whose ``WHERE`` reads
    ``committed_at``). It cannot read a quote, delete one or change one. Nothing on
    ``orderbook_symbols``: the trigger that lists a new symbol runs as the owner.
``reader`` (notebooks, research)
    ``SELECT`` only, on the owner's tables now and later (default privileges).

Writer and reader carry ``idle_in_transaction_session_timeout = 60s`` as role settings: behind
PgBouncer the package cannot send it at connect (PgBouncer refuses startup parameters it does
not know), and a transaction left open must not hold locks and a pooled server connection.

Both writer and reader may read ``alembic_version``, so ``orderbook-store doctor`` reports the
migration state whoever runs it. No password appears in the script: set one per role with
``\\password <role>`` in psql or, on DigitalOcean, create the users in the control panel first
(the script then only grants).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orderbook_store.errors import ConfigError

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Tables the writer inserts into, and what else it needs on each.
WRITER_TABLE_PRIVILEGES: dict[str, str] = {
    "orderbook_data": "INSERT",
    "orderbook_write_batches": "INSERT, SELECT, DELETE",
}


@dataclass(frozen=True)
class RoleNames:
    """The three role names; lower-case identifiers so they need no quoting anywhere."""

    owner: str = "orderbook_owner"
    writer: str = "orderbook_writer"
    reader: str = "orderbook_reader"

    def __post_init__(self) -> None:
        for kind, name in (("owner", self.owner), ("writer", self.writer), ("reader", self.reader)):
            if not _ROLE_NAME.match(name):
                raise ConfigError(
                    f"{kind} role name {name!r}: use lower-case letters, digits and '_' "
                    "(at most 63, not starting with a digit)"
                )
        if len({self.owner, self.writer, self.reader}) != 3:
            raise ConfigError("owner, writer and reader must be three different roles")


def _create_role(name: str) -> str:
    return (
        f"    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN\n"
        f"        CREATE ROLE {name} LOGIN;\n"
        "    END IF;\n"
    )


def roles_sql(names: RoleNames | None = None, schema: str = "public") -> str:
    """The whole script: roles, schema and database privileges, table grants. Idempotent."""
    r = names if names is not None else RoleNames()
    if not _ROLE_NAME.match(schema):
        raise ConfigError(f"schema name {schema!r}: use lower-case letters, digits and '_'")
    writer_grants = "".join(
        f"    IF to_regclass('{schema}.{table}') IS NOT NULL THEN\n"
        f"        GRANT {privileges} ON {schema}.{table} TO {r.writer};\n"
        "    END IF;\n"
        for table, privileges in WRITER_TABLE_PRIVILEGES.items()
    )
    create_roles = "".join(_create_role(name) for name in (r.owner, r.writer, r.reader))
    return f"""\
-- orderbook_store roles: {r.owner} (migrations), {r.writer} (collectors), {r.reader} (reads).
-- Idempotent. Run as an administrator before the first `alembic upgrade head` (as {r.owner})
-- and again after every upgrade, in the database that holds the quotes:
--   orderbook-store roles --print-sql | psql "$ADMIN_DATABASE_URL" -v ON_ERROR_STOP=1
-- Passwords are not set here: `\\password {r.writer}` in psql, or create the users in the
-- DigitalOcean control panel first.
BEGIN;

DO $roles$
BEGIN
{create_roles}    -- The administrator grants on the owner's tables as a member of the owner.
    IF current_user <> '{r.owner}'
       AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, '{r.owner}', 'USAGE') THEN
        EXECUTE format('GRANT {r.owner} TO %I', current_user);
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {r.owner}, {r.writer}, {r.reader}',
                   current_database());
END
$roles$;

-- Behind PgBouncer the package cannot send session timeouts at connect: the roles carry them.
ALTER ROLE {r.writer} SET idle_in_transaction_session_timeout = '60s';
ALTER ROLE {r.reader} SET idle_in_transaction_session_timeout = '60s';

GRANT USAGE, CREATE ON SCHEMA {schema} TO {r.owner};
GRANT USAGE ON SCHEMA {schema} TO {r.writer}, {r.reader};
-- Tables the owner creates later (partitions, new revisions) are readable by the reader.
ALTER DEFAULT PRIVILEGES FOR ROLE {r.owner} IN SCHEMA {schema}
    GRANT SELECT ON TABLES TO {r.reader};

-- Grants on the tables that exist now (run again after `alembic upgrade head`).
DO $grants$
DECLARE
    id_sequence text;
BEGIN
{writer_grants}    IF to_regclass('{schema}.orderbook_symbols') IS NOT NULL THEN
        GRANT SELECT ON {schema}.orderbook_symbols TO {r.reader};
    END IF;
    IF to_regclass('{schema}.orderbook_data') IS NOT NULL THEN
        GRANT SELECT ON {schema}.orderbook_data TO {r.reader};
        id_sequence := pg_get_serial_sequence('{schema}.orderbook_data', 'id');
        IF id_sequence IS NOT NULL THEN
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO {r.writer}', id_sequence);
        END IF;
    END IF;
    IF to_regclass('{schema}.alembic_version') IS NOT NULL THEN
        GRANT SELECT ON {schema}.alembic_version TO {r.writer}, {r.reader};
    END IF;
END
$grants$;

COMMIT;
"""


def print_sql(names: RoleNames | None = None, schema: str = "public") -> None:
    """Print the script to stdout (what ``orderbook-store roles --print-sql`` does)."""
    print(roles_sql(names, schema), end="")
