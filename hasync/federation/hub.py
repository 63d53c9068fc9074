"""The hub's exporter: while this node is primary, its Home Assistant's selected entities on main, and main's
commands carried out here. The I/O around the pure ``mapping`` and ``export``.

Theory of operation
-------------------
Only the primary of the hub's cluster exports (``set_active``), so a hub that is an HA pair exports once and,
on a failover, the new primary takes over with the same identities: main's entities keep their ids.

An export runs on an MQTT session of its own (the agent's Last Will is its heartbeat; this one's is the hub's
status, ``offline``, retained). It reads the registries and the states from Home Assistant, publishes every
exported entity's discovery config and state and the event entities' device triggers (retained; with
``send``, not one awaited publish each: 1,000 entities go out in a fraction of a second), then ``online`` on
the status topic, and subscribes
to the command topics, main's birth (``<discovery prefix>/status``) and its own status topic. Then:

* a state change of an exported entity publishes its new state (the link's state events, ``on_state_changed``),
  and an event entity's new event its event message (never retained: main's event entity and device triggers
  fire once per event, not at every publish of the state);
* main's birth (``online``) publishes every config (the event entities' device triggers too) and state again;
* ``offline`` on the status topic while exporting (the will of the previous primary's session, arriving late
  after a failover) is answered with ``online`` at once;
* a command (never a retained one: an old retained command would run again at every start) becomes the
  service call ``mapping.command`` checks, made on this node's Home Assistant; its result (done, refused and
  why, failed and HA's message) is published on ``<entity>/result`` and counted.

When the node stops being primary the session is closed cleanly (no will: the next primary says ``online``);
a crash or a cut of a single-node hub leaves the will, and main shows the hub's entities unavailable, never
deleted. The registries are read once per export: an entity added on the hub is exported at the next
promotion or reconnect (removal after a grace period, and reading registry changes, are not done yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..aio import Backoff
from ..metrics import Metrics
from ..transport import Connect, MqttFailure, Session, Will
from . import mapping
from .export import Exported, Hub, Selection, discovery_message, parse_registries, select, trigger_messages

logger = logging.getLogger(__name__)

HaCommand = Callable[[dict[str, Any]], Awaitable[Any]]
QUEUE_LIMIT = 10_000  # state changes waiting to be published; beyond it the oldest are dropped (counted)


class Exporter:
    def __init__(self, hub: Hub, selection: Selection, *, ha_command: HaCommand, connect: Connect, client_id: str,
                 metrics: Metrics) -> None:
        self.hub = hub
        self.selection = selection
        self._ha_command = ha_command
        self._connect = connect
        self._client_id = client_id
        self._metrics = metrics
        self._active = asyncio.Event()
        self._changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self.exported: dict[str, Exported] = {}
        self._attributes: dict[str, dict[str, Any]] = {}
        self._by_uid: dict[str, str] = {}
        self._event_marks: dict[str, str | None] = {}  # event entities: the state a new event must differ from

    # ---- from the agent ---------------------------------------------------------------------------

    def set_active(self, active: bool) -> None:
        """This node became primary (export) or stopped being (stop exporting)."""
        if active:
            self._active.set()
        else:
            self._active.clear()
            self._wake()

    def on_state_changed(self, event: dict[str, Any]) -> None:
        """Home Assistant's ``state_changed`` event (the link's subscription: ``data.new_state``)."""
        if not self._active.is_set():
            return
        if self._changes.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._changes.get_nowait()
            self._metrics.federation_dropped.inc()
        self._changes.put_nowait(event)

    # ---- the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while True:
            await self._active.wait()
            try:
                await self._export()
                backoff.reset()
            except (MqttFailure, OSError) as exc:
                delay = backoff.next_delay()
                logger.warning("federation: the export stopped: %s; again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # Home Assistant not reachable, or answering with errors
                delay = backoff.next_delay()
                logger.warning("federation: cannot export: %s: %s; again in %.0f s", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    def _wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._changes.put_nowait({})  # an empty event: the export loop looks at _active again

    async def _export(self) -> None:
        hub = self.hub
        entities, devices, areas = await asyncio.gather(
            self._ha_command({"type": "config/entity_registry/list"}),
            self._ha_command({"type": "config/device_registry/list"}),
            self._ha_command({"type": "config/area_registry/list"}))
        states = await self._ha_command({"type": "get_states"})
        state_map = {s["entity_id"]: s for s in states if isinstance(s, dict) and isinstance(s.get("entity_id"), str)} \
            if isinstance(states, list) else {}
        entries, device_map, area_map = parse_registries(entities, devices, areas)
        self.exported = select(entries, device_map, area_map, self.selection, unregistered=state_map)
        self._by_uid = {item.uid: entity_id for entity_id, item in self.exported.items()}
        self._attributes = {}
        self._event_marks = {}
        async with self._connect(f"{self._client_id}-fed", Will(hub.status_topic, b"offline")) as session:
            for entity_id in self.exported:
                state = state_map.get(entity_id)
                if state is not None:
                    self._publish_entity(session, entity_id, state)
            self._publish_triggers(session, state_map)
            await session.publish(hub.status_topic, b"online", retain=True)
            logger.info("federation: exporting %d entities as %s", len(self.exported), hub.identifier)
            await session.subscribe(f"{hub.base}/+/set", f"{hub.base}/+/set/+", hub.status_topic,
                                    f"{hub.discovery_prefix}/status")
            self._metrics.federation_exported.set(len(self.exported))
            await self._serve(session, state_map)
        logger.info("federation: export ended (not primary)")
        self._metrics.federation_exported.set(0)

    async def _serve(self, session: Session, state_map: dict[str, dict[str, Any]]) -> None:
        messages = session.messages()
        next_message = asyncio.ensure_future(anext(messages))
        next_change = asyncio.ensure_future(self._changes.get())
        try:
            while self._active.is_set():
                done, _ = await asyncio.wait({next_message, next_change}, return_when=asyncio.FIRST_COMPLETED)
                if next_change in done:
                    event = next_change.result()
                    next_change = asyncio.ensure_future(self._changes.get())
                    data = event.get("data") if isinstance(event, dict) else None
                    new_state = data.get("new_state") if isinstance(data, dict) else None
                    if isinstance(new_state, dict) and new_state.get("entity_id") in self.exported:
                        state_map[new_state["entity_id"]] = new_state
                        self._publish_state(session, new_state)
                        self._publish_event(session, new_state)
                        self._mark_event(new_state)
                if next_message in done:
                    message = next_message.result()  # a lost connection raises here
                    next_message = asyncio.ensure_future(anext(messages))
                    await self._on_message(session, state_map, message.topic, message.payload, message.retain)
        finally:
            for task in (next_message, next_change):
                task.cancel()

    def _publish_entity(self, session: Session, entity_id: str, state: dict[str, Any]) -> None:
        attributes = _attributes(state)
        message = discovery_message(self.hub, self.exported[entity_id], str(state.get("state")), attributes)
        if message is None:
            return
        topic, config = message
        session.send(topic, json.dumps(config).encode(), retain=True)
        self._publish_state(session, state)
        self._mark_event(state)  # what the hub's entity shows now is no new event

    def _publish_state(self, session: Session, state: dict[str, Any]) -> None:
        entity_id = state["entity_id"]
        attributes = _attributes(state)
        self._attributes[entity_id] = attributes
        payload = mapping.state_payload(entity_id, str(state.get("state")), attributes)
        session.send(self.hub.topics(self.exported[entity_id].uid).state, payload, retain=True)

    def _publish_event(self, session: Session, state: dict[str, Any]) -> None:
        """The event an event entity's state change reports, if it is a new one (``mapping.event_message``)."""
        entity_id = state["entity_id"]
        if not entity_id.startswith("event."):
            return
        message = mapping.event_message(self._event_marks.get(entity_id), str(state.get("state")), _attributes(state))
        if message is not None:
            session.send(self.hub.topics(self.exported[entity_id].uid).event, message, retain=False)

    def _mark_event(self, state: dict[str, Any]) -> None:
        entity_id = state["entity_id"]
        if entity_id.startswith("event."):
            self._event_marks[entity_id] = mapping.event_mark(self._event_marks.get(entity_id), str(state.get("state")))

    def _publish_triggers(self, session: Session, state_map: dict[str, dict[str, Any]]) -> None:
        events = [(item, _attributes(state_map[entity_id])) for entity_id, item in self.exported.items()
                  if item.component == "event" and entity_id in state_map]
        for topic, config in trigger_messages(self.hub, events):
            session.send(topic, json.dumps(config).encode(), retain=True)

    async def _on_message(self, session: Session, state_map: dict[str, dict[str, Any]], topic: str, payload: bytes,
                          retain: bool) -> None:
        hub = self.hub
        if topic == f"{hub.discovery_prefix}/status":
            if payload == b"online":  # main (re)started: the discovery configs and states again, as HA asks
                logger.info("federation: main announced itself; publishing %d entities again", len(self.exported))
                for exported_id, state in state_map.items():
                    if exported_id in self.exported:
                        self._publish_entity(session, exported_id, state)
                self._publish_triggers(session, state_map)
            return
        if topic == hub.status_topic:
            if payload != b"online":
                session.send(hub.status_topic, b"online", retain=True)  # a late will of the previous primary
            return
        uid, _, rest = topic.removeprefix(hub.base + "/").partition("/")
        what = rest.removeprefix("set").lstrip("/") or None
        entity = self._by_uid.get(uid)
        result_topic = f"{hub.base}/{uid}/result"
        if retain:
            self._count("refused")
            logger.warning("federation: ignored a retained command on %s (a command runs once, when sent)", topic)
            return
        if entity is None:
            self._count("refused")
            session.send(result_topic, _result("refused", "not an entity this hub exports"), retain=False)
            return
        entity_id = entity
        call = mapping.command(entity_id, self._attributes.get(entity_id, {}), what, payload)
        if isinstance(call, mapping.Refused):
            self._count("refused")
            logger.warning("federation: refused a command for %s: %s", entity_id, call.reason)
            session.send(result_topic, _result("refused", call.reason), retain=False)
            return
        try:
            await self._ha_command({"type": "call_service", "domain": call.domain, "service": call.service,
                                    "service_data": dict(call.data), "target": {"entity_id": call.entity_id}})
        except Exception as exc:
            self._count("failed")
            logger.warning("federation: %s.%s on %s failed: %s", call.domain, call.service, entity_id, exc)
            session.send(result_topic, _result("failed", str(exc)[:300]), retain=False)
            return
        # Until HA's state change comes back, the next command sees this one's values: main sends a climate's
        # range as two commands (low, then high), and the second must not put the first end back.
        self._attributes[entity_id] = {**self._attributes.get(entity_id, {}), **call.data}
        self._count("done")
        session.send(result_topic, _result("done", f"{call.domain}.{call.service}"), retain=False)

    def _count(self, result: str) -> None:
        self._metrics.federation_commands.labels(result).inc()


def _attributes(state: dict[str, Any]) -> dict[str, Any]:
    attributes = state.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _result(status: str, detail: str) -> bytes:
    return json.dumps({"status": status, "detail": detail}).encode()
