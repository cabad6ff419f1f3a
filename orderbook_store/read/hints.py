"""A hint for a read that found nothing: the symbol is stored, spelled in another case.

Symbols are case-sensitive (``btcusdt`` is not ``BTCUSDT``), and an empty frame alone does not
tell a user that. Only reads that come back empty for a symbol pay for the check: one query of
index probes for the symbol's upper- and lower-case spellings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import asyncpg

from orderbook_store.errors import SymbolCaseWarning
from orderbook_store.models import SYMBOL_MAX_CHARS

__all__ = ["warn_other_case"]

#: Which of the given spellings are stored (an index probe each, never a scan).
_STORED_SQL = (
    "SELECT s.symbol FROM unnest($1::text[]) AS s(symbol)"
    " WHERE EXISTS (SELECT 1 FROM orderbook_data o WHERE o.symbol = s.symbol)"
)


async def warn_other_case(raw: asyncpg.Connection, missing: Iterable[str]) -> None:
    """Warn (``SymbolCaseWarning``, once per read) naming the stored spelling of each symbol
    in ``missing`` that is not stored as given but is in upper or lower case."""
    variants = {
        name: sorted({name.upper(), name.lower()} - {name})
        for name in sorted(set(missing))
        if len(name) <= SYMBOL_MAX_CHARS
    }
    if not any(variants.values()):
        return
    asked = sorted({*variants, *(v for spellings in variants.values() for v in spellings)})
    stored = {row[0] for row in await raw.fetch(_STORED_SQL, asked)}
    described = [
        f"{name!r} is stored as {' and '.join(repr(v) for v in spellings if v in stored)}"
        for name, spellings in variants.items()
        if name not in stored and any(v in stored for v in spellings)
    ]
    if described:
        warnings.warn(
            f"no quotes found: {'; '.join(described)} (symbols are case-sensitive)",
            SymbolCaseWarning,
            stacklevel=2,
        )
