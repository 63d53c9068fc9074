"""The two sides of a sync backend: what the replica asks of it, and what it reports back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from .hlc import Stamp
from .state import Apply, Remove, Value


class Sink(Protocol):
    """What a backend reports to the replica (``hasync.sync.replica.Replica``)."""

    def local_snapshot(self, entities: Mapping[str, Value]) -> None: ...
    def local_changed(self, entity_id: str, value: Value | None, *, appeared: bool = False) -> None: ...
    def applied(self, entity_id: str, version: Stamp) -> None: ...
    def apply_failed(self, entity_id: str, version: Stamp, reason: str) -> None: ...


class Backend(Protocol):
    """Where the entities live. ``apply`` answers every item through the sink, never by raising."""

    name: str

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None: ...
    async def apply(self, batch: list[Apply | Remove]) -> None: ...
