"""Home Assistant's websocket API in memory, for the in-process tier.

``FakeHomeAssistant.open`` is a ``hasync.homeassistant.websocket.OpenWebSocket``: give it to
``HomeAssistantLink(open_websocket=...)`` or ``Agent(open_websocket=...)``. It speaks the frames hasync's
link uses: the auth phase, ``ping``, ``get_states``, ``subscribe_events``/``unsubscribe_events`` for
``state_changed`` and the registries' events, ``call_service`` (``scene.apply`` with contexts,
``mqtt.publish``, ``automation.turn_on`` and ``turn_off``), ``config_entries/get``, ``mqtt/subscribe``,
``config/entity_registry/get``, the UI helpers' ``{domain}/delete`` and the entity, device and area
registries' ``list``. Every frame it sends is a recorded frame of the real Home Assistant
(``harness/haframes.json``, see ``harness.haframes``) with its values filled in: the same keys, the same
types, the same order of events and answers (a call's ``state_changed`` events come before its result).

What the real HA would do with a value is modelled where hasync depends on it: ``scene.apply`` skips
entities HA does not have and leaves an entity unchanged when the value is not one it takes (an
``input_number`` out of range, an ``input_select`` option it does not list); an unchanged value causes no
event. The controls a test needs: ``set_state`` (a user's change), ``remove``, ``stop``/``start`` (HA down
and back), ``mqtt_connected`` (HA's own MQTT client), ``mqtt_entry_state``, ``hang`` (no answers), and
``calls`` (every command received). The registries, as an integration or a user changes them, each change
announced by its ``*_registry_updated`` event as HA 2024.3 does (the entry's id, the action, for an update
the old values of what changed): ``register``, ``update_entry`` (a rename moves the state to the new entity
id; disabling removes it), ``unregister`` (and the state), ``add_device``/``update_device``/``remove_device``,
``add_area``/``update_area``/``remove_area``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from hasync.homeassistant.errors import NotConnected

from . import haframes

Value = tuple[str, dict[str, Any]]

_VALUE_ONLY = {"input_boolean", "input_number", "input_select", "input_text", "input_datetime", "counter", "timer",
               "automation"}

_TEMPLATES = haframes.load()


def _frame(name: str, **values: Any) -> dict[str, Any]:
    frame: dict[str, Any] = copy.deepcopy(_TEMPLATES[name])
    frame.update(values)
    return frame


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _context(user: bool = True) -> dict[str, Any]:
    context: dict[str, Any] = copy.deepcopy(_TEMPLATES["call_service"]["result"]["context"])
    context.update(id=secrets.token_hex(13).upper()[:26], parent_id=None,
                   user_id=context["user_id"] if user else None)
    return context


def _error(template: str, ident: int, code: str, message: str) -> dict[str, Any]:
    frame = _frame(template, id=ident)
    frame["error"] = {"code": code, "message": message}
    return frame


@dataclass
class _Entity:
    entity_id: str
    state: str
    attributes: dict[str, Any]
    context: dict[str, Any]
    changed: str = field(default_factory=_now)
    ui_helper: bool = False  # made in HA's UI: deletable with {domain}/delete

    def state_object(self) -> dict[str, Any]:
        state: dict[str, Any] = copy.deepcopy(_TEMPLATES["get_states"]["result"][0])
        state.update(entity_id=self.entity_id, state=self.state, attributes=copy.deepcopy(self.attributes),
                     context=copy.deepcopy(self.context), last_changed=self.changed, last_updated=self.changed)
        return state


class FakeWebSocket:
    """One client connection: what the link sends is handled at once; answers queue up for ``receive``."""

    def __init__(self, ha: FakeHomeAssistant) -> None:
        self._ha = ha
        self._out: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self.authenticated = False
        self.closed = False
        self.subscriptions: dict[int, str] = {}  # id -> "state_changed" or "mqtt:<topic>"
        self.push(_frame("auth_required", ha_version=ha.version))

    def push(self, frame: dict[str, Any]) -> None:
        if not self.closed:
            self._out.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, _dumps(frame), None))

    async def send_json(self, data: Any) -> None:
        if self.closed:
            raise ConnectionResetError("Cannot write to closing transport")
        await asyncio.sleep(0)
        self._ha.handle(self, data)

    async def receive(self) -> aiohttp.WSMessage:
        return await self._out.get()

    async def close(self) -> bool:
        self.drop(1000)
        return True

    def drop(self, code: int = 1001) -> None:
        """Close from HA's side (HA stopping: code 1001)."""
        if self.closed:
            return
        self._out.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, code, ""))
        self.closed = True
        self._ha.sockets.discard(self)


def _dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame)


class FakeHomeAssistant:
    def __init__(self, *, token: str = "fake-token", entities: dict[str, Value] | None = None) -> None:
        self.token = token
        self.version = str(_TEMPLATES["auth_ok"]["ha_version"])
        self.entities: dict[str, _Entity] = {}
        self.sockets: set[FakeWebSocket] = set()
        self.up = True
        self.hang = False  # answers nothing (HA hung); the connection stays open
        self.mqtt_connected = True
        self.mqtt_echo = True  # False: HA publishes, but the broker never sends it back (an ACL dropping it)
        self.mqtt_entry_state: str | None = "loaded"  # None: the MQTT integration is not set up
        self.admin = True  # the token's user may use mqtt/subscribe
        self.calls: list[dict[str, Any]] = []
        self.connections = 0
        self.registry: dict[str, dict[str, Any]] = {}  # entity id -> its entity registry entry
        self.devices: dict[str, dict[str, Any]] = {}
        self.areas: dict[str, dict[str, Any]] = {}
        self._registry_ids = itertools.count(1)
        for entity_id, (state, attributes) in (entities or {}).items():
            self.add(entity_id, state, attributes)

    # ---- the seam ---------------------------------------------------------------------------------

    async def open(self, url: str, request_timeout: float) -> FakeWebSocket:
        await asyncio.sleep(0)
        if not self.up:
            raise NotConnected(f"Home Assistant unreachable at {url}: Cannot connect (Connection refused)")
        ws = FakeWebSocket(self)
        self.sockets.add(ws)
        self.connections += 1
        return ws

    # ---- what a user or the test does ---------------------------------------------------------------

    def add(self, entity_id: str, state: str, attributes: dict[str, Any] | None = None, *,
            ui_helper: bool = False) -> None:
        """An entity appears (HA starting, or a helper created in the UI)."""
        old = self.entities.get(entity_id)
        entity = _Entity(entity_id, state, dict(attributes or {}), _context(user=False), ui_helper=ui_helper)
        self.entities[entity_id] = entity
        self._changed(entity_id, old, entity)

    def set_state(self, entity_id: str, state: str, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
        """A user's change, as from HA's UI; returns its context."""
        context = _context()
        self._set(entity_id, state, attributes, context)
        return context

    def remove(self, entity_id: str) -> None:
        entity = self.entities.pop(entity_id, None)
        if entity is not None:
            self._changed(entity_id, entity, None)

    # ---- the registries ---------------------------------------------------------------------------

    def register(self, entity_id: str, *, platform: str, unique_id: str, device_id: str | None = None,
                 area_id: str | None = None, name: str | None = None, original_name: str | None = None,
                 disabled: bool = False) -> None:
        """An entity registry entry appears (an integration set the entity up, a helper was made)."""
        entry: dict[str, Any] = copy.deepcopy(_TEMPLATES["entity_registry_list"]["result"][0])
        entry.update(entity_id=entity_id, platform=platform, unique_id=unique_id, device_id=device_id,
                     area_id=area_id, name=name, original_name=original_name,
                     disabled_by="user" if disabled else None, id=f"{next(self._registry_ids):032x}",
                     config_entry_id=None if device_id is None else f"{hash(platform) & 0xffffffff:032x}")
        self.registry[entity_id] = entry
        self._fire("entity_registry_updated", {"action": "create", "entity_id": entity_id})

    def update_entry(self, entity_id: str, **changes: Any) -> None:
        """A user changes an entry (``new_entity_id``, ``name``, ``area_id``, ``disabled_by``...). A rename moves
        the entity's state to the new id; disabling removes the state; as in HA, after the event."""
        entry = self.registry[entity_id]
        new_id = changes.pop("new_entity_id", entity_id)
        old = {key: entry[key] for key in changes if entry.get(key) != changes[key]}
        entry.update(changes)
        data: dict[str, Any] = {"action": "update", "entity_id": new_id, "changes": old}
        if new_id != entity_id:
            old["entity_id"] = entity_id
            entry["entity_id"] = new_id
            data["old_entity_id"] = entity_id
            del self.registry[entity_id]
            self.registry[new_id] = entry
        self._fire("entity_registry_updated", data)
        state = self.entities.get(entity_id)
        if state is not None and (new_id != entity_id or entry.get("disabled_by")):
            self.remove(entity_id)
            if not entry.get("disabled_by"):
                self.add(new_id, state.state, state.attributes)

    def unregister(self, entity_id: str) -> None:
        """The entry is removed (the entity deleted, its device removed): the event, then its state goes."""
        del self.registry[entity_id]
        self._fire("entity_registry_updated", {"action": "remove", "entity_id": entity_id})
        self.remove(entity_id)

    def add_device(self, device_id: str, name: str, *, identifiers: list[list[str]], area_id: str | None = None,
                   manufacturer: str | None = None, model: str | None = None) -> None:
        device: dict[str, Any] = copy.deepcopy(_TEMPLATES["device_registry_list"]["result"][0])
        device.update(id=device_id, name=name, identifiers=identifiers, area_id=area_id, manufacturer=manufacturer,
                      model=model)
        self.devices[device_id] = device
        self._fire("device_registry_updated", {"action": "create", "device_id": device_id})

    def update_device(self, device_id: str, **changes: Any) -> None:
        device = self.devices[device_id]
        old = {key: device[key] for key in changes if device.get(key) != changes[key]}
        device.update(changes)
        self._fire("device_registry_updated", {"action": "update", "device_id": device_id, "changes": old})

    def remove_device(self, device_id: str) -> None:
        del self.devices[device_id]
        self._fire("device_registry_updated", {"action": "remove", "device_id": device_id})

    def add_area(self, area_id: str, name: str) -> None:
        area: dict[str, Any] = copy.deepcopy(_TEMPLATES["area_registry_list"]["result"][0])
        area.update(area_id=area_id, name=name)
        self.areas[area_id] = area
        self._fire("area_registry_updated", {"action": "create", "area_id": area_id})

    def update_area(self, area_id: str, name: str) -> None:
        self.areas[area_id]["name"] = name
        self._fire("area_registry_updated", {"action": "update", "area_id": area_id})

    def remove_area(self, area_id: str) -> None:
        del self.areas[area_id]
        self._fire("area_registry_updated", {"action": "remove", "area_id": area_id})

    def state(self, entity_id: str) -> str | None:
        entity = self.entities.get(entity_id)
        return None if entity is None else entity.state

    def stop(self) -> None:
        """HA stops: every connection closes; none is accepted until ``start``."""
        self.up = False
        for ws in list(self.sockets):
            ws.drop()

    def start(self) -> None:
        self.up = True

    def send_raw(self, text: str) -> None:
        """Something HA's websocket would not normally say, to every connection (garbage, a stray answer)."""
        for ws in list(self.sockets):
            ws._out.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, text, None))

    def commands(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c.get("type") == kind]

    def service_calls(self, domain: str, service: str) -> list[dict[str, Any]]:
        return [c for c in self.commands("call_service") if (c.get("domain"), c.get("service")) == (domain, service)]

    # ---- the server ---------------------------------------------------------------------------------

    def handle(self, ws: FakeWebSocket, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if not ws.authenticated:
            if message.get("type") == "auth" and message.get("access_token") == self.token:
                ws.authenticated = True
                ws.push(_frame("auth_ok", ha_version=self.version))
            else:
                ws.push(_frame("auth_invalid"))
                ws.drop(1000)
            return
        self.calls.append(message)
        if self.hang:
            return
        ident = message.get("id")
        if not isinstance(ident, int):
            return
        kind = message.get("type")
        handler = getattr(self, "_" + str(kind).replace("/", "_"), None)
        if handler is None and isinstance(kind, str) and kind.endswith("/delete"):
            handler = self._delete
        if handler is None:
            ws.push(_frame("unknown_command", id=ident))
            return
        handler(ws, ident, message)

    def _result(self, ws: FakeWebSocket, ident: int, result: Any) -> None:
        ws.push(_frame("subscribe_events", id=ident, result=result))

    def _ping(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        ws.push(_frame("pong", id=ident))

    def _get_states(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        self._result(ws, ident, [e.state_object() for e in self.entities.values()])

    def _subscribe_events(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        ws.subscriptions[ident] = str(message.get("event_type"))
        self._result(ws, ident, None)

    def _unsubscribe_events(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        if ws.subscriptions.pop(message.get("subscription"), None) is None:  # type: ignore[arg-type]
            ws.push(_error("entity_registry_get_missing", ident, "not_found", "Subscription not found."))
            return
        self._result(ws, ident, None)

    def _config_entries_get(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        entries = []
        if message.get("domain") == "mqtt" and self.mqtt_entry_state is not None:
            entry = copy.deepcopy(_TEMPLATES["config_entries_get"]["result"][0])
            entry["state"] = self.mqtt_entry_state
            entries.append(entry)
        self._result(ws, ident, entries)

    def _mqtt_subscribe(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        if not self.admin:
            ws.push(_error("unknown_command", ident, "unauthorized", "Unauthorized"))
            return
        ws.subscriptions[ident] = f"mqtt:{message.get('topic')}"
        self._result(ws, ident, None)

    def _config_entity_registry_list(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        self._result(ws, ident, copy.deepcopy(list(self.registry.values())))

    def _config_device_registry_list(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        self._result(ws, ident, copy.deepcopy(list(self.devices.values())))

    def _config_area_registry_list(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        self._result(ws, ident, copy.deepcopy(list(self.areas.values())))

    def _config_entity_registry_get(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        entity = self.entities.get(str(message.get("entity_id")))
        if entity is None or not entity.ui_helper:
            ws.push(_frame("entity_registry_get_missing", id=ident))
            return
        entry = copy.deepcopy(_TEMPLATES["entity_registry_get"]["result"])
        domain, _, object_id = entity.entity_id.partition(".")
        entry.update(entity_id=entity.entity_id, platform=domain, unique_id=object_id,
                     id=f"{next(self._registry_ids):032x}")
        self._result(ws, ident, entry)

    def _delete(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        domain = str(message["type"]).removesuffix("/delete")
        entity_id = f"{domain}.{message.get(f'{domain}_id')}"
        entity = self.entities.get(entity_id)
        if entity is None or not entity.ui_helper:
            ws.push(_error("entity_registry_get_missing", ident, "not_found",
                           f"Unable to find {domain}_id {message.get(f'{domain}_id')}"))
            return
        self.remove(entity_id)
        ws.push(_frame("input_boolean_delete", id=ident))

    def _call_service(self, ws: FakeWebSocket, ident: int, message: dict[str, Any]) -> None:
        domain, service = message.get("domain"), message.get("service")
        data = message.get("service_data") or {}
        context = _context()
        match (domain, service):
            case ("scene", "apply"):
                for entity_id, value in dict(data.get("entities") or {}).items():
                    self._reproduce(entity_id, value, context)
            case ("mqtt", "publish"):
                if not self.mqtt_connected:
                    ws.push(_frame("mqtt_publish_disconnected", id=ident))
                    return
                if self.mqtt_echo:
                    self._mqtt_message(str(data.get("topic")), str(data.get("payload")))
            case ("automation", "turn_on" | "turn_off"):
                targets = (message.get("target") or {}).get("entity_id") or []
                for entity_id in [targets] if isinstance(targets, str) else targets:
                    if entity_id in self.entities:
                        self._set(entity_id, "on" if service == "turn_on" else "off", None, context)
            case _:
                ws.push(_frame("call_service_unknown", id=ident))
                return
        ws.push(_frame("call_service", id=ident, result={"context": context}))

    # ---- state ----------------------------------------------------------------------------------

    def _reproduce(self, entity_id: str, value: Any, context: dict[str, Any]) -> None:
        """scene.apply's reproduce-state for one entity: skipped if absent or not a value it takes."""
        entity = self.entities.get(entity_id)
        if entity is None:
            return
        attributes: dict[str, Any] = {}
        if isinstance(value, dict):
            state = value.get("state")
            attributes = {k: v for k, v in value.items() if k != "state"}
        else:
            state = value
        if not isinstance(state, str) or not self._takes(entity, state):
            return
        # Reproduce-state sets a helper's value only (its min, max, options are its configuration); other
        # domains take attributes too (a light's brightness, a climate's target temperature).
        keep = entity.entity_id.partition(".")[0] in _VALUE_ONLY or not attributes
        self._set(entity_id, state, None if keep else {**entity.attributes, **attributes}, context)

    @staticmethod
    def _takes(entity: _Entity, state: str) -> bool:
        domain = entity.entity_id.partition(".")[0]
        if domain == "input_number":
            try:
                number = float(state)
            except ValueError:
                return False
            low, high = entity.attributes.get("min"), entity.attributes.get("max")
            return (low is None or number >= low) and (high is None or number <= high)
        if domain == "input_select":
            return state in entity.attributes.get("options", [state])
        if domain in ("input_boolean", "automation"):
            return state in ("on", "off")
        return True

    def _set(self, entity_id: str, state: str, attributes: dict[str, Any] | None, context: dict[str, Any]) -> None:
        old = self.entities.get(entity_id)
        if old is None:
            raise KeyError(f"the fake Home Assistant has no {entity_id}")
        new_attributes = dict(old.attributes if attributes is None else attributes)
        if old.state == state and old.attributes == new_attributes:
            return  # HA writes no state (and fires no event) for an unchanged value
        new = _Entity(entity_id, state, new_attributes, copy.deepcopy(context), ui_helper=old.ui_helper)
        self.entities[entity_id] = new
        self._changed(entity_id, old, new)

    def _changed(self, entity_id: str, old: _Entity | None, new: _Entity | None) -> None:
        event = copy.deepcopy(_TEMPLATES["state_changed"]["event"])
        source = new if new is not None else old
        event["context"] = copy.deepcopy(source.context) if source is not None else _context()
        event["data"] = {"entity_id": entity_id, "old_state": old.state_object() if old else None,
                         "new_state": new.state_object() if new else None}
        event["time_fired"] = _now()
        for ws in list(self.sockets):
            for ident, kind in ws.subscriptions.items():
                if kind == "state_changed":
                    ws.push({**_frame("state_changed", id=ident), "event": event})

    def _fire(self, event_type: str, data: dict[str, Any]) -> None:
        template = _TEMPLATES[f"{event_type}_{data['action']}"]
        event = copy.deepcopy(template["event"])
        event.update(data=data, time_fired=_now(), context=_context(user=False))
        for ws in list(self.sockets):
            for ident, kind in ws.subscriptions.items():
                if kind == event_type:
                    ws.push({**copy.deepcopy(template), "id": ident, "event": copy.deepcopy(event)})

    def _mqtt_message(self, topic: str, payload: str) -> None:
        for ws in list(self.sockets):
            for ident, kind in ws.subscriptions.items():
                if kind == f"mqtt:{topic}":
                    event = copy.deepcopy(_TEMPLATES["mqtt_message"]["event"])
                    event.update(topic=topic, payload=payload)
                    ws.push({**_frame("mqtt_message", id=ident), "event": event})


class HealthChanges:
    """Records every ``on_change(healthy, detail)`` of a link; ``wait_for`` waits for one that matches."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []
        self._changed = asyncio.Event()
        self._seen = 0

    def __call__(self, healthy: bool, detail: str) -> None:
        self.calls.append((healthy, detail))
        self._changed.set()

    async def wait_for(
        self, healthy: bool, within: float, detail: Callable[[str], bool] = lambda _: True
    ) -> tuple[bool, str]:
        """The first call since the last wait_for() (or the start) with ``healthy`` and a matching detail."""
        async with asyncio.timeout(within):
            while True:
                for index, call in enumerate(self.calls[self._seen :], start=self._seen):
                    if call[0] == healthy and detail(call[1]):
                        self._seen = index + 1
                        return call
                self._changed.clear()
                await self._changed.wait()
