"""The read API is declared once: the async and sync faces and the reader agree on every method.

``read/api.py`` and ``read/sync_api.py`` are generated from one spec
(``read/_generate_api.py``); these tests fail when they are edited by hand or left stale, and
when a face's signature drifts from the reader that does the work.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typing_extensions import get_overloads

from orderbook_store import OrderbookRepository, OrderbookStore
from orderbook_store.read import _generate_api
from orderbook_store.read.api import AsyncReads
from orderbook_store.read.reader import Reader
from orderbook_store.read.sync_api import SyncReads

METHODS = ["quotes", "iter_quotes", "latest", "asof", "resample"]
PACKAGE = Path(_generate_api.__file__).parent


def test_the_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    _generate_api.write_modules(tmp_path)
    for name in ("api.py", "sync_api.py"):
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text(), (
            f"{name} is stale: run python -m orderbook_store.read._generate_api"
        )


def parameters(function: object) -> list[tuple[str, object, object]]:
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("method", METHODS)
def test_async_face_sync_face_and_reader_take_the_same_arguments(method: str) -> None:
    async_face = getattr(AsyncReads, method)
    sync_face = getattr(SyncReads, method)
    assert parameters(async_face) == parameters(sync_face)
    assert parameters(async_face) == parameters(getattr(Reader, method))
    # the faces are what users get
    assert getattr(OrderbookRepository, method) is async_face
    assert getattr(OrderbookStore, method) is sync_face


@pytest.mark.parametrize("method", METHODS)
def test_each_output_has_its_own_overload_on_both_faces(method: str) -> None:
    for face in (AsyncReads, SyncReads):
        outputs = [
            inspect.signature(overload).parameters["output"].annotation
            for overload in get_overloads(getattr(face, method))
        ]
        assert outputs == [
            "Literal['pandas']",
            "Literal['polars']",
            "Literal['arrow']",
            "Literal['numpy']",
            "Output",
        ]


@pytest.mark.parametrize("method", METHODS)
def test_the_sync_face_returns_what_the_async_face_awaits(method: str) -> None:
    for async_overload, sync_overload in zip(
        get_overloads(getattr(AsyncReads, method)),
        get_overloads(getattr(SyncReads, method)),
        strict=True,
    ):
        awaited = inspect.signature(async_overload).return_annotation
        returned = inspect.signature(sync_overload).return_annotation
        assert returned == awaited.replace("AsyncIterator[", "Iterator[")
