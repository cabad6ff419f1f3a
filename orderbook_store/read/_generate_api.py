"""Writes ``read/api.py`` and ``read/sync_api.py``: the read API, declared once, for both faces.

One spec per method (its parameters, the call it makes, its docstring) gives the asynchronous
methods of ``OrderbookRepository`` and their synchronous twins on ``OrderbookStore``, each with
one overload per ``output``. Run ``python -m orderbook_store.read._generate_api`` after
editing this file; ``tests/test_read_api.py`` fails while the generated modules are out of
date.
"""

from pathlib import Path

OUTPUTS = [
    ("pandas", "pd.DataFrame"),
    ("polars", "pl.DataFrame"),
    ("arrow", "pa.Table"),
    ("numpy", "NumpyColumns"),
]

METHODS = {
    "quotes": dict(
        params="""        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: {out},
        exact: bool = False,""",
        call=(
            "symbols, start, end, exchange=exchange, columns=columns, output=output, exact=exact"
        ),
        doc="""Quotes of ``symbols`` with ``start <= timestamp < end``, ordered by symbol, time and
        id: float64 prices (``Decimal`` with ``exact=True``), times as ``datetime64[us, UTC]``.
        See ``orderbook_store.read.reader.Reader.quotes`` for what it costs.""",
    ),
    "latest": dict(
        params="""        symbols: str | Iterable[str] | None = None,
        *,
        output: {out},
        exact: bool = False,""",
        call="symbols, output=output, exact=exact",
        doc="The last quote of each symbol (every stored symbol when ``symbols`` is None).",
    ),
    "asof": dict(
        params="""        symbol: str,
        times: Iterable[TimeLike] | TimeLike,
        *,
        exchange: str | None = None,
        output: {out},
        exact: bool = False,""",
        call="symbol, times, exchange=exchange, output=output, exact=exact",
        doc="The quote in force at each of ``times`` (``merge_asof``, backward), one row each.",
    ),
    "resample": dict(
        params="""        symbol: str,
        start: TimeLike,
        end: TimeLike,
        freq: str | dt.timedelta | int = "1min",
        *,
        exchange: str | None = None,
        output: {out},""",
        call="symbol, start, end, freq, exchange=exchange, output=output",
        doc="""Per bucket of ``freq``: OHLC of the mid, last bid and ask, mean spread, count.
        ``freq`` is a fixed width as pandas spells it (``"100ms"``, ``"5s"``, ``"1min"``,
        ``"1h"``, ``"1D"``), a timedelta or int µs; calendar ones (``"M"``, ``"Y"``...) are
        refused.""",
    ),
}

ITER = dict(
    params="""        symbols: str | Iterable[str],
        start: TimeLike,
        end: TimeLike,
        *,
        chunk_rows: int = 1_000_000,
        exchange: str | None = None,
        columns: Sequence[str] | None = None,
        output: {out},
        exact: bool = False,""",
    call=(
        "symbols, start, end, chunk_rows=chunk_rows, exchange=exchange, columns=columns, "
        "output=output, exact=exact"
    ),
    doc="``quotes()`` as frames of at most ``chunk_rows`` rows each, memory flat.",
)


def _returns(frame: str, *, sync: bool, iterate: bool) -> str:
    if not iterate:
        return frame
    return f"Iterator[{frame}]" if sync else f"AsyncIterator[{frame}]"


def _body(name: str, call: str, *, sync: bool, iterate: bool) -> str:
    if sync:
        run = "_iterate" if iterate else "_call"
        return f"return self.{run}(self._async_reads().{name}({call}))"
    return f"return {'' if iterate else 'await '}self._reads().{name}({call})"


def overloads(name: str, spec: dict[str, str], *, sync: bool, iterate: bool = False) -> str:
    """One overload per output, then the method itself."""
    kw = "def" if (sync or iterate) else "async def"
    out = []
    for i, (literal, frame) in enumerate(OUTPUTS):
        default = ' = "pandas"' if i == 0 else ""
        params = spec["params"].format(out=f'Literal["{literal}"]{default}')
        ret = _returns(frame, sync=sync, iterate=iterate)
        out.append(
            f"    @overload\n    {kw} {name}(\n        self,\n{params}\n    ) -> {ret}: ...\n"
        )
    # Any output, as a variable: what a caller passing its own ``output`` value gets.
    params = spec["params"].format(out="Output")
    ret = _returns("Frame", sync=sync, iterate=iterate)
    out.append(f"    @overload\n    {kw} {name}(\n        self,\n{params}\n    ) -> {ret}: ...\n")
    params = spec["params"].format(out='Output = "pandas"')
    body = _body(name, spec["call"], sync=sync, iterate=iterate)
    out.append(
        f"    {kw} {name}(\n        self,\n{params}\n    ) -> {ret}:\n"
        f'        """{spec["doc"]}"""\n        {body}\n'
    )
    return "\n".join(out)


HEAD = '''"""The read API of ``OrderbookRepository``: the methods, their arguments and result types.

Each method has one overload per ``output``, so a type checker knows that ``output="polars"``
gives a ``polars.DataFrame``, ``"arrow"`` a ``pyarrow.Table`` and ``"numpy"`` a dict of numpy
arrays. The work is done by ``read.reader.Reader``; ``read.sync_api`` has the same methods,
synchronous, for ``OrderbookStore``.

Generated by ``python -m orderbook_store.read._generate_api`` (edit that, then run it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from typing_extensions import overload  # registered for get_overloads on every Python

import numpy.typing as npt

from orderbook_store.read.plan import Frame, Output
from orderbook_store.times import TimeLike

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    from orderbook_store.read.reader import Reader

__all__ = ["AsyncReads", "NumpyColumns"]

#: What ``output="numpy"`` gives: one numpy array per column.
NumpyColumns: TypeAlias = "dict[str, npt.NDArray[Any]]"


class AsyncReads:
    """The read methods of an asynchronous face; the face provides ``_reads()``."""

    def _reads(self) -> Reader:
        raise NotImplementedError

'''

SYNC_HEAD = '''"""The read API of ``OrderbookStore``: ``read.api``'s methods, synchronous.

Generated with ``read.api`` by ``python -m orderbook_store.read._generate_api``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from typing_extensions import overload  # registered for get_overloads on every Python

from orderbook_store.read.api import NumpyColumns
from orderbook_store.read.plan import Frame, Output
from orderbook_store.times import TimeLike

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    from orderbook_store.read.api import AsyncReads

__all__ = ["SyncReads"]

T = TypeVar("T")


class SyncReads:
    """The read methods of a synchronous face: each runs its ``AsyncReads`` twin to completion.

    The face provides ``_async_reads()`` (its asynchronous twin), ``_call`` (runs a coroutine
    and returns its result) and ``_iterate`` (turns an async iterator into a blocking one).
    """

    def _async_reads(self) -> AsyncReads:
        raise NotImplementedError

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        raise NotImplementedError

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        raise NotImplementedError

'''


def generate(*, sync: bool) -> str:
    """The source of ``sync_api.py`` (``sync``) or ``api.py``, before ``ruff format``."""
    parts = [SYNC_HEAD if sync else HEAD]
    for name, spec in METHODS.items():
        parts.append(overloads(name, spec, sync=sync))
        if name == "quotes":
            parts.append(overloads("iter_quotes", ITER, sync=sync, iterate=True))
    return "\n".join(parts)


def write_modules(directory: Path) -> None:
    """Write ``api.py`` and ``sync_api.py`` into ``directory``, sorted and formatted by ruff
    (a development dependency) exactly as the project's lint leaves them."""
    import subprocess
    import sys

    paths = []
    for name, sync in (("api.py", False), ("sync_api.py", True)):
        path = directory / name
        path.write_text(generate(sync=sync))
        paths.append(str(path))
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "-q", "--fix", "--select", "I", *paths], check=True)  # noqa: S603
    subprocess.run([*ruff, "format", "-q", *paths], check=True)  # noqa: S603


def main() -> None:
    write_modules(Path(__file__).parent)


if __name__ == "__main__":
    main()
