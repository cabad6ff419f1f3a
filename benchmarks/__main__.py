"""``python -m benchmarks`` (``make bench``): run every benchmark module's ``main()`` in turn."""

from __future__ import annotations

import importlib
import pkgutil

import benchmarks


def main() -> None:
    """Import each ``benchmarks.<name>`` module (not private ones, nor those that set
    ``RUN_WITH_THE_OTHERS = False``) and call its ``main()``."""
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if not getattr(module, "RUN_WITH_THE_OTHERS", True):
            continue
        run = getattr(module, "main", None)
        if callable(run):
            run()


if __name__ == "__main__":
    main()
