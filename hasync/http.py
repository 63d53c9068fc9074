"""The agent's HTTP endpoints: ``/healthz``, ``/role`` (200 only on the primary) and ``/metrics``.

Other parts of the agent may add routes of their own (``routes``): the memory sync backend's test API is
served only when that backend is configured (``hasync.sync.memory``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST


class HttpServerError(Exception):
    """The endpoints could not be served (the port is taken, the address is not this host's)."""


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
        routes: Iterable[web.RouteDef] = (),
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
        app.router.add_routes(list(routes))
        self._runner = web.AppRunner(app, access_log=None)

    async def __aenter__(self) -> HttpServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise HttpServerError(
                f"cannot serve the HTTP endpoints on {self.host}:{self.port}: {why} "
                "(set http.port, or http.enabled: false)"
            ) from exc
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
