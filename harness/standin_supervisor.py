"""A stand-in for Home Assistant's Supervisor, as an add-on sees it, in front of a real Home Assistant.

The real Supervisor gives each add-on a token (``SUPERVISOR_TOKEN``) and answers, for that token only:
``/services/mqtt`` (the Mosquitto add-on's host, port and credentials), ``/core/websocket`` (Home
Assistant's WebSocket API: the add-on authenticates with its own token, and the Supervisor with Home
Assistant's) and ``/core/api/...`` (the REST API, likewise). This one does the same on a free port, on a
thread of its own, so synchronous tests and containers on the host network can use it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Self

import aiohttp
from aiohttp import WSMsgType, web

from .wait import free_port


class StandInSupervisor:
    def __init__(self, *, token: str, ha_url: str, ha_token: str, mqtt: dict[str, Any] | None) -> None:
        self.token = token
        self.ha_url = ha_url.rstrip("/")
        self.ha_token = ha_token
        self.mqtt = mqtt
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.refused = 0  # requests with a wrong or missing token
        self.websockets = 0  # WebSocket sessions authenticated and proxied to Home Assistant
        self.api_calls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stand-in-supervisor", daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/services/mqtt", self._services_mqtt)
        app.router.add_get("/core/websocket", self._websocket)
        app.router.add_route("*", "/core/api/{path:.*}", self._api)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _authorised(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self.refused += 1
        return False

    async def _services_mqtt(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"result": "error", "message": "Unauthorized"}, status=401)
        if self.mqtt is None:
            return web.json_response({"result": "error", "message": "No mqtt service"}, status=400)
        return web.json_response({"result": "ok", "data": self.mqtt})

    async def _api(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401, text="401: Unauthorized")
        self.api_calls += 1
        async with aiohttp.ClientSession() as session, session.request(
            request.method, f"{self.ha_url}/api/{request.match_info['path']}", data=await request.read(),
            headers={"Authorization": f"Bearer {self.ha_token}", "Content-Type": "application/json"},
        ) as response:
            return web.Response(status=response.status, body=await response.read(),
                                content_type=response.content_type)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Home Assistant's auth handshake with the add-on (its token), then every frame both ways."""
        client = web.WebSocketResponse()
        await client.prepare(request)
        await client.send_json({"type": "auth_required", "ha_version": "stand-in"})
        try:
            auth = await client.receive_json(timeout=10)
        except (TypeError, ValueError, TimeoutError):
            await client.close()
            return client
        if not isinstance(auth, dict) or auth.get("type") != "auth" or auth.get("access_token") != self.token:
            self.refused += 1
            await client.send_json({"type": "auth_invalid", "message": "Invalid access token or password"})
            await client.close()
            return client
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{self.ha_url}/api/websocket") as core:
            await core.receive_json(timeout=10)  # auth_required
            await core.send_json({"type": "auth", "access_token": self.ha_token})
            answer = await core.receive_json(timeout=10)
            await client.send_json(answer)
            if answer.get("type") != "auth_ok":
                await client.close()
                return client
            self.websockets += 1
            await asyncio.gather(_pipe(client, core), _pipe(core, client))
        await client.close()
        return client


async def _pipe(source: Any, sink: Any) -> None:
    """Text frames from one WebSocket to the other until either closes; then both close."""
    try:
        async for message in source:
            if message.type != WSMsgType.TEXT:
                break
            await sink.send_str(message.data)
    except (aiohttp.ClientError, ConnectionError, RuntimeError):
        pass
    finally:
        await source.close()
        await sink.close()

