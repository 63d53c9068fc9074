"""Entity sync's in-memory backend: entities kept in the agent, changed through its HTTP API, for tests, the
demo and benchmarks (``sync.backend: memory``; never for a home).

Its routes (served by the agent's HTTP server only when this backend is configured): ``GET /sync/entities``
lists the entities; ``PUT /sync/entities`` with ``{"entity_id": {"state": "on", "attributes": {...}}, ...}``
changes them as a user would in HA; ``DELETE /sync/entities/{entity_id}`` removes one;
``GET /sync/applied?after=SEQ`` lists the changes applied from the bus after ``SEQ``, each with its
``time.monotonic()`` (shared by the processes of one host), of the last ``log_size`` (50,000) applied: about
120 bytes each, part of the footprint the benchmarks measure on a standby.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..http import Request, Response, Route
from ..topics import ENTITY_ID
from .backend import Sink
from .state import Apply, Attributes, Remove, Value


@dataclass(frozen=True, slots=True)  # (slots: a standby logs a thousand a second under the benchmarks' load)
class AppliedEntry:
    seq: int
    entity_id: str
    state: str | None
    t: float  # time.monotonic() when applied


class MemoryBackend:
    """Entities kept in memory, changed through the agent's HTTP API: for tests, demos and benchmarks.

    Applies take effect at once and are logged (``applied_since``) with their monotonic time, so a benchmark
    can time a change from one node to another.
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, log_size: int = 50_000) -> None:
        self.entities: dict[str, Value] = {}
        self._sink: Sink | None = None
        self._selected: Callable[[str], bool] = lambda _: True
        self._clock = clock
        self._log: deque[AppliedEntry] = deque(maxlen=log_size)
        self._seq = 0

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None:
        self._sink, self._selected = sink, selected
        sink.local_snapshot({})

    def set_local(self, entity_id: str, state: str, attributes: Attributes | None = None) -> None:
        """A local change, as a user would make it in HA."""
        assert self._sink is not None
        appeared = entity_id not in self.entities
        value: Value = (state, dict(attributes or {}))
        self.entities[entity_id] = value
        self._sink.local_changed(entity_id, value, appeared=appeared)

    def remove_local(self, entity_id: str) -> bool:
        assert self._sink is not None
        if self.entities.pop(entity_id, None) is None:
            return False
        self._sink.local_changed(entity_id, None)
        return True

    async def apply(self, batch: list[Apply | Remove]) -> None:
        assert self._sink is not None
        now = self._clock()
        for item in batch:
            if isinstance(item, Apply):
                self.entities[item.entity_id] = (item.state, dict(item.attributes))
            else:
                self.entities.pop(item.entity_id, None)
            self._seq += 1
            self._log.append(AppliedEntry(self._seq, item.entity_id, getattr(item, "state", None), now))
            self._sink.applied(item.entity_id, item.version)

    def applied_since(self, seq: int, limit: int = 10_000) -> list[AppliedEntry]:
        out: list[AppliedEntry] = []
        for entry in reversed(self._log):
            if entry.seq <= seq:
                break
            out.append(entry)
        out.reverse()
        return out[:limit]

    # ---- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/sync/entities", self._get_entities),
            Route("PUT", "/sync/entities", self._put_entities),
            Route("DELETE", "/sync/entities/{entity_id}", self._delete_entity),
            Route("GET", "/sync/applied", self._get_applied),
        ]

    async def _get_entities(self, request: Request) -> Response:
        return Response.json({e: {"state": v[0], "attributes": v[1]} for e, v in self.entities.items()})

    async def _put_entities(self, request: Request) -> Response:
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            return Response.text(f"not JSON: {exc}\n", 400)
        if not isinstance(body, dict):
            return Response.text('expected {"entity_id": {"state": "...", "attributes": {...}}, ...}\n', 400)
        changes: list[tuple[str, str, dict[str, Any]]] = []
        for entity_id, value in body.items():
            state = value.get("state") if isinstance(value, dict) else None
            attributes = value.get("attributes", {}) if isinstance(value, dict) else None
            if not ENTITY_ID.fullmatch(entity_id) or not isinstance(state, str) or not isinstance(attributes, dict):
                return Response.text(f"{entity_id}: expected an entity id with a string state and an attributes "
                                     "object\n", 400)
            changes.append((entity_id, state, attributes))
        for entity_id, state, attributes in changes:
            self.set_local(entity_id, state, attributes)
        # One turn of the event loop before answering: the agent's publisher, woken by these changes, puts them
        # on the wire first, so they do not wait for the answer's write (a benchmark times them from the request).
        await asyncio.sleep(0)
        return Response.json({"accepted": len(changes)})

    async def _delete_entity(self, request: Request) -> Response:
        if not self.remove_local(request.params["entity_id"]):
            return Response.text("no such entity\n", 404)
        return Response.json({"removed": request.params["entity_id"]})

    async def _get_applied(self, request: Request) -> Response:
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return Response.text("after must be an integer\n", 400)
        return Response.json(
            [{"seq": e.seq, "entity_id": e.entity_id, "state": e.state, "t": e.t} for e in self.applied_since(after)])
