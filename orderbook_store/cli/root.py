"""The ``orderbook-store`` group itself: ``--version``, ``--debug``, and how a command fails.

Whatever a command raises ends here, as one line on stderr and a non-zero exit: a usage
mistake (an unknown option, a value that is not a number or a date) as
``orderbook-store <command>: <what is wrong> (see ... --help)`` with exit code 2, anything else
as ``orderbook-store: <problem>; <fix>`` (``failures.explain``) with exit code 1. ``--debug``
prints the traceback first, with every password the settings know replaced by ``***``.
This holds for the console script, ``python -m orderbook_store`` and a test runner alike.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from orderbook_store.cli.failures import current_settings, explain, scrub, secrets_of

__all__ = ["RootGroup", "package_version"]

PROGRAM = "orderbook-store"


def package_version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("orderbook_store")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown (not installed)"


class RootGroup(TyperGroup):
    """The root command group: runs the command and turns any failure into one line."""

    debug = False

    def invoke(self, ctx: Any) -> Any:
        # The root's own options are parsed by now; the command runs inside this call.
        self.debug = bool(ctx.params.get("debug"))
        return super().invoke(ctx)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(RootGroup, self).main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        try:
            result = run()
        except SystemExit:
            raise
        except BaseException as exc:  # every failure gets its one line
            sys.exit(self._report(exc))
        sys.exit(result if isinstance(result, int) else 0)

    def _report(self, exc: BaseException) -> int:
        if isinstance(exc, typer.Exit):
            return exc.exit_code
        if isinstance(exc, typer.Abort):
            typer.echo(f"{PROGRAM}: aborted", err=True)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            typer.echo(f"{PROGRAM}: interrupted", err=True)
            return 130
        if _is_usage_error(exc):
            return _report_usage(exc)
        if self.debug:
            shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            typer.echo(scrub(shown, secrets_of(current_settings())), err=True, nl=False)
        typer.echo(f"{PROGRAM}: {explain(exc)}", err=True)
        return 1


def _is_usage_error(exc: BaseException) -> bool:
    """A Click-style exception (usage error, bad parameter): it knows its message and code."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _report_usage(exc: BaseException) -> int:
    code: int = getattr(exc, "exit_code", 2)
    message: str = exc.format_message()  # type: ignore[attr-defined]
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help itself: printed as it is
        if message.strip():
            typer.echo(message, err=True)
        return code
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else PROGRAM
    hint = f" (see `{where} --help`)" if ctx is not None else ""
    typer.echo(f"{where}: {' '.join(message.split())}{hint}", err=True)
    return code
