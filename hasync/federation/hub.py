"""The hub's exporter: while this node is primary, its Home Assistant's selected entities on main, and main's
commands carried out here. The I/O around the pure ``mapping``, ``export`` and ``lifecycle``.

Theory of operation
-------------------
Only the primary of the hub's cluster exports (``set_active``), so a hub that is an HA pair exports once and,
on a failover, the new primary takes over with the same identities: main's entities keep their ids.

An export runs on an MQTT session of its own (the agent's Last Will is its heartbeat; this one's is the hub's
status, ``offline``, retained). It reads the registries and the states from Home Assistant, publishes every
exported entity's discovery config and state and the event entities' device triggers (retained; with
``send``, not one awaited publish each: 1,000 entities go out in a fraction of a second), then ``online`` on
the status topic, and subscribes
to the command topics, main's birth (``<discovery prefix>/status``), its own status topic and every config
under its own node id (``<discovery prefix>/+/hasync_fed_<cluster>/+/config``). Then:

* a state change of an exported entity publishes its new state (the link's state events, ``on_state_changed``);
  the exporter keeps every state of the hub (not only the exported ones), so an entity that becomes exported
  is published at once; an event entity's new event is published as its event message (never retained: main's
  event entity and device triggers fire once per event, not at every publish of the state);
* a registry change (``on_registry_updated``: an entity created, renamed, disabled, moved or removed; a device
  or an area changed) marks that registry to be read again; the reads are debounced (``lifecycle.Debounce``)
  and the selection is made again from what they return. An entity newly selected is published; one whose
  config changed (a new name, area, device, entity id) has it published again under the same topic and
  unique id, so main keeps its entity id (Home Assistant keeps the entity id of a unique id it knows); one
  no longer selected is retiring (``lifecycle.Retirements``): unavailable at once, cleared after the grace
  (``removal_grace``) unless it comes back. A rename on the hub changes neither the topic nor the unique id
  (both come from the integration's unique id), and the state subscription follows the new entity id;
* a config under its own node id that it does not export (retained by an earlier run, or by the other node
  of its pair with a different selection), and whose unique id says it is this hub's, is retiring too: the
  way Zigbee2MQTT cleans up the configs of devices it no longer has, but after the same grace rather than
  at once (an entity without a registry entry appears only once its integration has set up: a Home
  Assistant still starting must not have its entities deleted on main). Configs of other hubs have another
  node id and are never seen; a standby exports nothing, so it clears nothing;
* main's birth (``online``) publishes every config (the event entities' device triggers too) and state again;
* ``offline`` on the status topic while exporting (the will of the previous primary's session, arriving late
  after a failover) is answered with ``online`` at once;
* a command (never a retained one: an old retained command would run again at every start) becomes the
  service call ``mapping.command`` checks, made on this node's Home Assistant; its result (done, refused and
  why, failed and HA's message) is published on ``<entity>/result`` and counted.

Self-check: an entity of the hub's own Home Assistant that is an MQTT copy of one of its exports (its unique id
is this hub's) means that Home Assistant reads the prefix the hub exports to. It is never exported again (MQTT
entities never are), so nothing loops, but the hub shows a duplicate of each export: one warning, and the
count in ``hasync_federation_self_imported`` and ``/healthz``.

A lost connection to Home Assistant makes the node unhealthy, so it stops being primary: the next export
(here or on the other node) reads every registry and state again, and nothing missed meanwhile is lost.

When the node stops being primary (its Home Assistant went away, a handover, the agent stops) it publishes
``offline`` and closes the session cleanly; the next primary, if any, says ``online``. A crash or a cut of a
single-node hub leaves the will. Either way main shows the hub's entities unavailable, never deleted, rather
than states nobody can vouch for. What was retiring is forgotten with the session; the next export finds the
configs retained and starts their grace again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..aio import Backoff
from ..homeassistant.errors import HomeAssistantError
from ..metrics import Metrics
from ..transport import Connect, MqttFailure, Session, Will
from . import mapping
from .export import (
    Entry,
    Exported,
    Hub,
    Selection,
    discovery_message,
    parse_registries,
    retired_state,
    select,
    trigger_messages,
)
from .lifecycle import Debounce, Retirements

logger = logging.getLogger(__name__)

HaCommand = Callable[[dict[str, Any]], Awaitable[Any]]
QUEUE_LIMIT = 10_000  # state changes waiting to be published; beyond it the oldest are dropped (counted)
FOREIGN_LOGGED = 100  # configs under the hub's node id that are not its own, logged at WARNING (then DEBUG)

# Home Assistant's registry events (HA 2024.3: ``data`` names the entry and the old values of what changed,
# not the new ones, so the registry is read again) and the registry each one marks to be read.
REGISTRY_EVENTS: Mapping[str, str] = {
    "entity_registry_updated": "entities",
    "device_registry_updated": "devices",
    "area_registry_updated": "areas",
}
_LISTS: Mapping[str, str] = {
    "entities": "config/entity_registry/list",
    "devices": "config/device_registry/list",
    "areas": "config/area_registry/list",
}
# A burst of registry events is one read, REREAD_QUIET s after its last event, at most REREAD_LONGEST s
# after its first; a read Home Assistant could not answer is tried again REREAD_RETRY s later.
REREAD_QUIET = 0.5
REREAD_LONGEST = 5.0
REREAD_RETRY = 10.0


class Exporter:
    def __init__(self, hub: Hub, selection: Selection, *, ha_command: HaCommand, connect: Connect, client_id: str,
                 metrics: Metrics, removal_grace: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.selection = selection
        self._ha_command = ha_command
        self._connect = connect
        self._client_id = client_id
        self._metrics = metrics
        self._grace = removal_grace
        self._clock = clock
        self._active = asyncio.Event()
        self._changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self.exported: dict[str, Exported] = {}
        self._attributes: dict[str, dict[str, Any]] = {}
        self._by_uid: dict[str, str] = {}
        # What one export session knows (reset by each): HA's states and registry lists, the exported configs
        # by topic, what was sent for each (entity id, config), what is retiring, what to read again.
        self._states: dict[str, dict[str, Any]] = {}
        self._lists: dict[str, Any] = {}
        self._entries: dict[str, Entry] = {}
        self._topics: dict[str, Exported] = {}
        self._sent: dict[str, tuple[str, bytes]] = {}
        self._retiring = Retirements(removal_grace)
        self._dirty: set[str] = set()
        self._reread = Debounce(REREAD_QUIET, REREAD_LONGEST)
        self._reread_failing = False
        self._self_imported: list[str] = []
        self._self_import_warned = False
        self._foreign: set[str] = set()
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

    def on_registry_updated(self, event: dict[str, Any]) -> None:
        """One of Home Assistant's registry events (``REGISTRY_EVENTS``): that registry is read again soon."""
        event_type = event.get("event_type") if isinstance(event, dict) else None
        kind = REGISTRY_EVENTS.get(event_type) if isinstance(event_type, str) else None
        if kind is None or not self._active.is_set():
            return
        self._dirty.add(kind)
        self._poke()

    def status(self) -> dict[str, Any]:
        """For ``/healthz``."""
        return {"exporting": self._active.is_set(), "exported": len(self.exported), "retiring": len(self._retiring),
                "removal_grace_s": self._grace, "self_imported": len(self._self_imported)}

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
            self._changes.put_nowait({})  # an empty event: the export loop looks at _active and its timers again

    def _poke(self) -> None:
        idle = self._reread.deadline is None
        self._reread.poke(self._clock())
        if idle:  # later pokes only move the deadline later: the loop wakes at the earlier one and looks again
            self._wake()

    async def _export(self) -> None:
        hub = self.hub
        self._dirty, self._reread = set(), Debounce(REREAD_QUIET, REREAD_LONGEST)  # a change from now on: read again
        self._lists = await self._read_lists(tuple(_LISTS))
        self._states = _state_map(await self._ha_command({"type": "get_states"}))
        self._retiring = Retirements(self._grace)
        self._topics, self._sent, self.exported, self._attributes, self._by_uid = {}, {}, {}, {}, {}
        self._event_marks = {}
        async with self._connect(f"{self._client_id}-fed", Will(hub.status_topic, b"offline")) as session:
            self._select(session)
            await session.publish(hub.status_topic, b"online", retain=True)
            logger.info("federation: exporting %d entities as %s", len(self.exported), hub.identifier)
            # Last: the retained configs under this hub's node id come after every config just published.
            await session.subscribe(f"{hub.base}/+/set", f"{hub.base}/+/set/+", hub.status_topic,
                                    f"{hub.discovery_prefix}/status", hub.configs_filter)
            await self._serve(session)
            # A clean disconnect sends no will: without this, main would go on showing the last states as current
            # (this node's Home Assistant went away, the agent stops). A next primary answers it with online.
            session.send(hub.status_topic, b"offline", retain=True)
        logger.info("federation: export ended (not primary)")

    async def _serve(self, session: Session) -> None:
        messages = session.messages()
        next_message = asyncio.ensure_future(anext(messages))
        next_change = asyncio.ensure_future(self._changes.get())
        try:
            while self._active.is_set():
                deadlines = [d for d in (self._reread.deadline, self._retiring.deadline) if d is not None]
                timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
                done, _ = await asyncio.wait({next_message, next_change}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if next_change in done:
                    event = next_change.result()
                    next_change = asyncio.ensure_future(self._changes.get())
                    self._on_state_event(session, event)
                if next_message in done:
                    message = next_message.result()  # a lost connection raises here
                    next_message = asyncio.ensure_future(anext(messages))
                    await self._on_message(session, message.topic, message.payload, message.retain)
                if self._reread.due(self._clock()):
                    await self._read_again(session)
                self._clear_due(session)
        finally:
            # However the export ended (not primary, or the session lost): nothing is exported from here.
            self._metrics.federation_exported.set(0)
            self._metrics.federation_retiring.set(0)
            for task in (next_message, next_change):
                task.cancel()

    # ---- Home Assistant's states and registries ------------------------------------------------------

    def _on_state_event(self, session: Session, event: dict[str, Any]) -> None:
        data = event.get("data") if isinstance(event, dict) else None
        entity_id = data.get("entity_id") if isinstance(data, dict) else None
        if not isinstance(entity_id, str):
            return
        new_state = data.get("new_state") if isinstance(data, dict) else None
        if new_state is None:  # removed from the state machine (a rename, a removal, a reload)
            if self._states.pop(entity_id, None) is not None and entity_id not in self._entries:
                self._poke()  # no registry entry: its state is all that tells it exists
            return
        if not isinstance(new_state, dict) or new_state.get("entity_id") != entity_id:
            return
        appeared = entity_id not in self._states
        self._states[entity_id] = new_state
        if appeared and entity_id not in self._entries:
            self._poke()
        item = self.exported.get(entity_id)
        if item is None or item.component is None:
            return
        sent = self._sent.get(self.hub.config_topic(item.component, item.uid))
        if sent is None or sent[0] != entity_id:  # exported before its state was known, or renamed
            self._publish_entity(session, entity_id, new_state)
        else:
            self._publish_event(session, new_state)
            self._publish_state(session, new_state)
            self._mark_event(new_state)

    async def _read_lists(self, kinds: tuple[str, ...]) -> dict[str, Any]:
        results = await asyncio.gather(*(self._ha_command({"type": _LISTS[kind]}) for kind in kinds))
        return dict(zip(kinds, results, strict=True))

    async def _read_again(self, session: Session) -> None:
        kinds = tuple(sorted(self._dirty))
        self._dirty.clear()
        if kinds:  # nothing marked: an entity without a registry entry came or went, the selection is made again
            try:
                lists = await self._read_lists(kinds)
            except HomeAssistantError as exc:
                self._dirty.update(kinds)
                self._reread.retry(self._clock() + REREAD_RETRY)
                level = logging.DEBUG if self._reread_failing else logging.WARNING
                self._reread_failing = True
                logger.log(level, "federation: cannot read the registries again: %s; trying again in %.0f s", exc,
                           REREAD_RETRY)
                return
            self._reread_failing = False
            self._lists.update(lists)
            self._metrics.federation_rereads.inc()
        if self._active.is_set():
            self._select(session)

    def _select(self, session: Session) -> None:
        """The selection made again from the registries and states: publish what is new or changed, retire
        what is no longer exported, take back what returned within its grace."""
        hub, now = self.hub, self._clock()
        entries, devices, areas = parse_registries(self._lists.get("entities"), self._lists.get("devices"),
                                                   self._lists.get("areas"))
        self._entries = entries
        self._check_self_import(entries)
        before = self._topics
        self.exported = select(entries, devices, areas, self.selection, unregistered=self._states)
        self._by_uid = {item.uid: entity_id for entity_id, item in self.exported.items()}
        self._attributes = {e: a for e, a in self._attributes.items() if e in self.exported}
        self._topics = {hub.config_topic(item.component, item.uid): item for item in self.exported.values()
                        if item.component is not None}
        gone = [topic for topic in before if topic not in self._topics]
        for topic in gone:
            item = before[topic]
            assert item.component is not None
            self._retire(session, topic, item.component, item.uid, now)
        returned = 0
        for topic, item in self._topics.items():
            back = self._retiring.back(topic)
            returned += back  # retiring dropped what was sent: it is published again
            state = self._states.get(item.entry.entity_id)
            if state is not None:
                self._publish_entity(session, item.entry.entity_id, state)
        self._publish_triggers(session)
        if gone or returned:
            logger.info("federation: %d entities no longer exported (cleared on main after %.0f s unless they come "
                        "back, e.g. %s), %d came back within their grace", len(gone), self._grace,
                        ", ".join(before[t].entry.entity_id for t in gone[:3]) or "-", returned)
        self._metrics.federation_exported.set(len(self.exported))
        self._metrics.federation_retiring.set(len(self._retiring))

    def _check_self_import(self, entries: Mapping[str, Entry]) -> None:
        self._self_imported = self.hub.self_imported(entries)
        self._metrics.federation_self_imported.set(len(self._self_imported))
        if self._self_imported and not self._self_import_warned:
            self._self_import_warned = True
            logger.warning(
                "federation: this hub's Home Assistant reads the discovery prefix %r the hub exports to: it made "
                "%d MQTT copies of the hub's own exports (e.g. %s). They are never exported again, so nothing "
                "loops, but they duplicate the hub's entities there: give that Home Assistant's MQTT integration "
                "another discovery prefix (and hasync's homeassistant.discovery_prefix the same, "
                "federation.discovery_prefix main's), or turn its discovery off", self.hub.discovery_prefix,
                len(self._self_imported), ", ".join(self._self_imported[:3]))

    # ---- MQTT ---------------------------------------------------------------------------------------

    def _publish_entity(self, session: Session, entity_id: str, state: dict[str, Any], *, again: bool = False) -> bool:
        """The entity's config and state, unless main already has this config for this entity id (``again``:
        publish anyway). True if they were published."""
        attributes = _attributes(state)
        message = discovery_message(self.hub, self.exported[entity_id], str(state.get("state")), attributes)
        if message is None:
            return False
        topic, config = message
        payload = json.dumps(config).encode()
        if not again and self._sent.get(topic) == (entity_id, payload):
            return False
        session.send(topic, payload, retain=True)
        self._sent[topic] = (entity_id, payload)
        self._publish_state(session, state)
        self._mark_event(state)  # what the hub's entity shows now is no new event
        return True

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

    def _publish_triggers(self, session: Session, *, again: bool = False) -> None:
        """The exported event entities' device triggers, unless main already has each (``again``: anyway)."""
        events = [(item, _attributes(self._states[entity_id])) for entity_id, item in self.exported.items()
                  if item.component == "event" and entity_id in self._states]
        for topic, config in trigger_messages(self.hub, events):
            payload = json.dumps(config).encode()
            if again or self._sent.get(topic) != ("", payload):
                session.send(topic, payload, retain=True)
                self._sent[topic] = ("", payload)

    def _retire(self, session: Session, config_topic: str, component: str, entity_uid: str, now: float) -> None:
        state_topic = self.hub.topics(entity_uid).state
        if self._retiring.leave(config_topic, state_topic, now):
            session.send(state_topic, retired_state(component), retain=True)
            self._sent.pop(config_topic, None)

    def _clear_due(self, session: Session) -> None:
        if not self._active.is_set():  # only the exporting primary ever deletes anything on main
            return
        due = self._retiring.due(self._clock())
        if not due:
            return
        for retiring in due:
            session.send(retiring.config_topic, b"", retain=True)  # main deletes its entity
            session.send(retiring.state_topic, b"", retain=True)
        self._metrics.federation_cleared.inc(len(due))
        self._metrics.federation_retiring.set(len(self._retiring))
        logger.info("federation: cleared %d configs not exported for %.0f s (e.g. %s)", len(due), self._grace,
                    ", ".join(r.config_topic for r in due[:3]))

    def _on_config(self, session: Session, topic: str, payload: bytes) -> None:
        """A config under this hub's node id: its own (exported), an empty one (cleared), or one it no longer
        exports, which retires if its unique id says it is this hub's."""
        parsed = self.hub.parse_config_topic(topic)
        if parsed is None or not payload or topic in self._topics or topic in self._retiring:
            return
        component, entity_uid = parsed
        if not self.hub.owns_config(entity_uid, payload):
            level = logging.DEBUG if len(self._foreign) >= FOREIGN_LOGGED or topic in self._foreign else logging.WARNING
            if level == logging.WARNING:
                self._foreign.add(topic)
            logger.log(level, "federation: a config under this hub's node id is not the hub's own (its unique id "
                       "says otherwise); left alone: %s", topic)
            return
        self._retire(session, topic, component, entity_uid, self._clock())
        self._metrics.federation_retiring.set(len(self._retiring))
        logger.info("federation: %s is retained but not exported: cleared in %.0f s unless it comes back", topic,
                    self._grace)

    async def _on_message(self, session: Session, topic: str, payload: bytes, retain: bool) -> None:
        hub = self.hub
        if topic == f"{hub.discovery_prefix}/status":
            if payload == b"online":  # main (re)started: the discovery configs and states again, as HA asks
                logger.info("federation: main announced itself; publishing %d entities again", len(self.exported))
                for exported_id in self.exported:
                    state = self._states.get(exported_id)
                    if state is not None:
                        self._publish_entity(session, exported_id, state, again=True)
                self._publish_triggers(session, again=True)
            return
        if topic == hub.status_topic:
            if payload != b"online":
                session.send(hub.status_topic, b"online", retain=True)  # a late will of the previous primary
            return
        if not topic.startswith(hub.base + "/"):
            self._on_config(session, topic, payload)
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


def _state_map(states: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(states, list):
        return {}
    return {s["entity_id"]: s for s in states if isinstance(s, dict) and isinstance(s.get("entity_id"), str)}


def _attributes(state: dict[str, Any]) -> dict[str, Any]:
    attributes = state.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _result(status: str, detail: str) -> bytes:
    return json.dumps({"status": status, "detail": detail}).encode()
