"""The agent's HTTP endpoints: ``/healthz``, ``/role`` (200 only on the primary) and ``/metrics``.

With the memory sync backend (tests, demos, benchmarks) also ``/sync/entities``: ``GET`` lists the entities,
``PUT`` with ``{"entity_id": {"state": "on", "attributes": {...}}, ...}`` changes them as a user would in HA,
``DELETE /sync/entities/{entity_id}`` removes one; ``GET /sync/applied?after=SEQ`` lists the changes applied
from the bus after ``SEQ``, each with its ``time.monotonic()`` (shared by the processes of one host).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .topics import ENTITY_ID

if TYPE_CHECKING:
    from .replica import MemoryBackend



class HttpServer:
    """``async with HttpServer(host, port, status=..., is_primary=..., metrics=...)``; port 0 picks one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        status: Callable[[], dict[str, Any]],
        is_primary: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        memory: MemoryBackend | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._status = status
        self._is_primary = is_primary
        self._ready = ready
        self._metrics = metrics
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/role", self._role)
        app.router.add_get("/metrics", self._metrics_handler)
        self._memory = memory
        if memory is not None:
            app.router.add_get("/sync/entities", self._entities)
            app.router.add_put("/sync/entities", self._set_entities)
            app.router.add_delete("/sync/entities/{entity_id}", self._remove_entity)
            app.router.add_get("/sync/applied", self._applied)
        self._runner = web.AppRunner(app, access_log=None)

    async def __aenter__(self) -> HttpServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        body = self._status()
        return web.json_response(body, status=200 if self._ready() else 503)

    async def _role(self, request: web.Request) -> web.Response:
        primary = self._is_primary()
        body = self._status()
        return web.json_response(body, status=200 if primary else 503)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._metrics())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    # ---- the memory sync backend ----------------------------------------------------------------

    async def _entities(self, request: web.Request) -> web.Response:
        assert self._memory is not None
        return web.json_response(
            {e: {"state": v[0], "attributes": v[1]} for e, v in self._memory.entities.items()})

    async def _set_entities(self, request: web.Request) -> web.Response:
        assert self._memory is not None
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"not JSON: {exc}\n") from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='expected {"entity_id": {"state": "...", "attributes": {...}}, ...}\n')
        changes: list[tuple[str, str, dict[str, Any]]] = []
        for entity_id, value in body.items():
            state = value.get("state") if isinstance(value, dict) else None
            attributes = value.get("attributes", {}) if isinstance(value, dict) else None
            if not ENTITY_ID.fullmatch(entity_id) or not isinstance(state, str) or not isinstance(attributes, dict):
                raise web.HTTPBadRequest(text=f"{entity_id}: expected an entity id with a string state and "
                                              "an attributes object\n")
            changes.append((entity_id, state, attributes))
        for entity_id, state, attributes in changes:
            self._memory.set_local(entity_id, state, attributes)
        return web.json_response({"accepted": len(changes)})

    async def _remove_entity(self, request: web.Request) -> web.Response:
        assert self._memory is not None
        if not self._memory.remove_local(request.match_info["entity_id"]):
            raise web.HTTPNotFound(text="no such entity\n")
        return web.json_response({"removed": request.match_info["entity_id"]})

    async def _applied(self, request: web.Request) -> web.Response:
        assert self._memory is not None
        try:
            after = int(request.query.get("after", "0"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text="after must be an integer\n") from exc
        entries = self._memory.applied_since(after)
        return web.json_response(
            [{"seq": e.seq, "entity_id": e.entity_id, "state": e.state, "t": e.t} for e in entries])
