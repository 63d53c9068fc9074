"""What a hub exports, under which identity, and the discovery message main reads: pure, no I/O.

A hub reads its Home Assistant's registries (entities, devices, areas) and states; ``Selection`` decides which
entities are exported (default deny), ``Exported`` is one of them with its identity, and ``discovery_message``
is the retained discovery config main's MQTT integration turns into a first-class entity.

Identity. An entity's ``uid`` comes from its integration's unique id (a hash of platform and unique id): it
survives a rename of the entity on the hub, so main's entity keeps its history, area and dashboards, and it
is the same on both nodes of a hub that is an HA pair (the entity registry's own id is not: each instance
makes its own), so a failover changes nothing on main. An entity without a unique id (no registry entry, so
it cannot be renamed either) is named by its entity id. Discovery unique ids and device identifiers are
hasync's own, ``hasync_fed_<cluster>_<uid>`` and ``hasync_fed_<cluster>_<device key>`` (a hash of the device's
identifiers: the same on both nodes of a pair), never the source's raw identifiers, which would merge main's
copy with the same device integrated on main itself. Every device is ``via_device`` the hub
(``hasync_fed_<cluster>``), whose status topic is in every entity's availability.

Device triggers. An exported event entity (a button, a doorbell, a remote's keys) is also a device trigger on
main, one per event type, on the device main shows for it, as Zigbee2MQTT offers its devices' actions: an
automation on main picks "<entity name>" <event type> under the device, and it fires once per event on the hub
(``trigger_messages``; the events' topic is mapping's).

No loops. Entities that came from MQTT (other hubs' exports, federated copies, Zigbee2MQTT's, hasync's own
entities) are never exported, whatever the selection says: a hub that also reads the discovery prefix, or two
hubs exporting to each other, neither recurses nor duplicates.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import mapping

# Platforms whose entities came over MQTT: exporting them would loop.
LOOPING_PLATFORMS = frozenset({"mqtt", "mqtt_statestream", "mqtt_eventstream", "remote_homeassistant"})


@dataclass(frozen=True)
class Rules:
    """One side (include or exclude) of a selection."""

    domains: frozenset[str] = frozenset()
    entities: frozenset[str] = frozenset()
    entity_globs: tuple[str, ...] = ()
    devices: frozenset[str] = frozenset()  # device registry ids or names, as the user wrote them
    areas: frozenset[str] = frozenset()  # area ids or names

    def _glob(self, entity_id: str) -> bool:
        return any(fnmatch.fnmatchcase(entity_id, pattern) for pattern in self.entity_globs)


@dataclass(frozen=True)
class Selection:
    """Which entities a hub exports. The more specific rule wins, the first that matches decides:
    entities, then entity globs, then devices, then areas, then domains (exclude before include at each
    level); anything else is not exported."""

    include: Rules = Rules()
    exclude: Rules = Rules()

    def __call__(self, entity_id: str, device: Device | None, area: Area | None) -> bool:
        inc, exc = self.include, self.exclude
        if entity_id in exc.entities:
            return False
        if entity_id in inc.entities:
            return True
        if exc._glob(entity_id):
            return False
        if inc._glob(entity_id):
            return True
        device_keys = {device.id, device.name} if device is not None else set()
        if device_keys & exc.devices:
            return False
        if device_keys & inc.devices:
            return True
        area_keys = {area.id, area.name} if area is not None else set()
        if area_keys & exc.areas:
            return False
        if area_keys & inc.areas:
            return True
        domain = entity_id.partition(".")[0]
        if domain in exc.domains:
            return False
        return domain in inc.domains


@dataclass(frozen=True)
class Area:
    id: str
    name: str


@dataclass(frozen=True)
class Device:
    id: str  # the hub's device registry id (selection by device names it, or the name)
    name: str
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None
    hw_version: str | None = None
    area_id: str | None = None
    key: str = ""  # its identity on main: a hash of its identifiers (parse_registries), else of its id

    @property
    def identity(self) -> str:
        return self.key or "d" + hashlib.sha256(self.id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Entry:
    """An entity as the hub's registries describe it (``registry_id`` None: no registry entry)."""

    entity_id: str
    registry_id: str | None = None
    platform: str | None = None
    unique_id: str | None = None  # the integration's, stable across renames and across the instances of a pair
    device_id: str | None = None
    area_id: str | None = None
    name: str | None = None  # the user's name for it on the hub
    original_name: str | None = None  # the integration's
    icon: str | None = None
    entity_category: str | None = None
    disabled: bool = False


_UID = re.compile(r"[^a-z0-9]")
_UID_TEXT = re.compile(r"[a-z0-9]{1,64}")
_COMPONENT = re.compile(r"[a-z_]{1,32}")
MAX_CONFIG_BYTES = 65_536  # a retained config beyond this is not one of ours (ours are a few kB)


def uid(entry: Entry) -> str:
    """The entity's identity in topics and unique ids (see the module's docstring)."""
    if entry.platform and entry.unique_id:
        return "u" + hashlib.sha256(f"{entry.platform}\0{entry.unique_id}".encode()).hexdigest()[:24]
    if entry.registry_id:
        return _UID.sub("", entry.registry_id.lower())[:32] or _hashed(entry.entity_id)
    return _hashed(entry.entity_id)


def _hashed(entity_id: str) -> str:
    return "e" + hashlib.sha256(entity_id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Hub:
    """The exporting cluster: its topics and the names main shows."""

    prefix: str  # the topic prefix
    cluster: str
    discovery_prefix: str = "homeassistant"
    agent_version: str = ""

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.cluster}/fed"

    @property
    def status_topic(self) -> str:
        return f"{self.base}/status"

    @property
    def identifier(self) -> str:
        return f"hasync_fed_{self.cluster}"

    def topics(self, entity_uid: str) -> mapping.Topics:
        return mapping.Topics(f"{self.base}/{entity_uid}")

    def config_topic(self, component: str, entity_uid: str) -> str:
        # The hub's own node level (<prefix>/<component>/<node id>/<object id>/config): a broker ACL can give
        # a hub's user its configs and nothing else's (a `+` cannot match part of a level).
        return f"{self.discovery_prefix}/{component}/{self.identifier}/{entity_uid}/config"

    @property
    def configs_filter(self) -> str:
        """Every discovery config under this hub's node id, and no other hub's."""
        return f"{self.discovery_prefix}/+/{self.identifier}/+/config"

    def parse_config_topic(self, topic: str) -> tuple[str, str] | None:
        """(component, uid) of a config topic under this hub's node id; None for any other topic."""
        head = self.discovery_prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 4 or parts[1] != self.identifier or parts[3] != "config":
            return None
        component, entity_uid = parts[0], parts[2]
        if not (_COMPONENT.fullmatch(component) and _UID_TEXT.fullmatch(entity_uid)):
            return None
        return component, entity_uid

    def owns_config(self, entity_uid: str, payload: bytes) -> bool:
        """Whether a retained config is this hub's own (its unique id says so): only those are ever cleared."""
        if not payload or len(payload) > MAX_CONFIG_BYTES:
            return False
        try:
            config = json.loads(payload)
        except ValueError:
            return False
        return isinstance(config, dict) and config.get("unique_id") == f"{self.identifier}_{entity_uid}"

    def self_imported(self, entries: Mapping[str, Entry]) -> list[str]:
        """Entities of the hub's own Home Assistant that are MQTT copies of this hub's exports: its HA reads
        the discovery prefix the hub exports to (never exported again: see ``exportable``)."""
        mine = f"{self.identifier}_"
        return sorted(e.entity_id for e in entries.values()
                      if e.platform == "mqtt" and (e.unique_id or "").startswith(mine))


@dataclass(frozen=True)
class Exported:
    entry: Entry
    device: Device | None
    area: Area | None  # the entity's, else its device's
    device_area: Area | None = None  # the device's own (the device block's suggested area)

    @property
    def uid(self) -> str:
        return uid(self.entry)

    @property
    def component(self) -> str | None:
        return mapping.component(self.entry.entity_id)


def exportable(entry: Entry) -> str | None:
    """Why the entity is never exported, whatever the selection; None if it may be."""
    if entry.platform in LOOPING_PLATFORMS:
        return f"it came from MQTT ({entry.platform}): exporting it would loop"
    if entry.disabled:
        return "it is disabled on the hub"
    if mapping.component(entry.entity_id) is None:
        return f"{entry.entity_id.partition('.')[0]} entities cannot be carried over MQTT discovery"
    return None


def select(entries: Mapping[str, Entry], devices: Mapping[str, Device], areas: Mapping[str, Area],
           selection: Selection, unregistered: Iterable[str] = ()) -> dict[str, Exported]:
    """The exported entities by entity id. An entity's area is its own, else its device's (as in HA).

    ``unregistered``: entity ids the hub's states list without a registry entry (no unique id). Nothing tells
    where they came from (an MQTT entity made in YAML has none either), so they are exported only when named
    by an entity id or a glob of ``include``, never by a domain; and without a registry entry they cannot be
    renamed on the hub, so their entity id is a stable identity."""
    out = {}
    for entity_id in unregistered:
        if entity_id in entries or mapping.component(entity_id) is None:
            continue
        inc, exc = selection.include, selection.exclude
        if entity_id in exc.entities or (entity_id not in inc.entities and exc._glob(entity_id)):
            continue
        if entity_id in inc.entities or inc._glob(entity_id):
            out[entity_id] = Exported(Entry(entity_id), None, None)
    for entity_id, entry in entries.items():
        if exportable(entry) is not None:
            continue
        device = devices.get(entry.device_id) if entry.device_id else None
        device_area = areas.get(device.area_id) if device is not None and device.area_id else None
        area = areas.get(entry.area_id) if entry.area_id else device_area
        if selection(entity_id, device, area):
            out[entity_id] = Exported(entry, device, area, device_area)
    return out


def discovery_message(hub: Hub, exported: Exported, state: str,
                      attributes: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The retained discovery (topic, config) main reads for the entity, or None if it is not carried."""
    component = exported.component
    entity_id = exported.entry.entity_id
    topics = hub.topics(exported.uid)
    config = mapping.discovery(entity_id, attributes, topics)
    if component is None or config is None:
        return None
    unique = f"{hub.identifier}_{exported.uid}"
    entry, device = exported.entry, exported.device
    friendly = attributes.get("friendly_name")
    if device is not None:
        # Named like an entity of its device (has_entity_name): the device's name is shown in front of it.
        name: str | None = entry.name or entry.original_name
    else:
        name = entry.name or (friendly if isinstance(friendly, str) else None) or entry.original_name
    config.update({
        "name": name,
        "unique_id": unique,
        "object_id": f"{hub.cluster}_{entity_id.partition('.')[2]}",
        "availability": [
            {"topic": hub.status_topic, "payload_available": "online", "payload_not_available": "offline"},
            mapping.entity_availability(entity_id, topics),
        ],
        "availability_mode": "all",
        "device": _device(hub, device, exported.device_area) if device is not None else _hub_device(hub),
        "origin": {"name": "hasync", "sw_version": hub.agent_version},
    })
    if entry.icon:
        config["icon"] = entry.icon
    if entry.entity_category in ("config", "diagnostic"):
        config["entity_category"] = entry.entity_category
    return hub.config_topic(component, exported.uid), config


def retired_state(component: str) -> bytes:
    """The retained state of an entity that is no longer exported, until its config is cleared: unavailable.
    (Only a light's state message has a schema of its own, and only the light domain becomes a light.)"""
    return mapping.state_payload(f"{component}.retired", "unavailable", {})


def trigger_messages(hub: Hub, events: Iterable[tuple[Exported, Mapping[str, Any]]]
                     ) -> list[tuple[str, dict[str, Any]]]:
    """The retained discovery (topic, config) of main's device triggers for exported event entities, given
    with their attributes (``event_types``): one per entity and event type, on the entity's device on main.

    A trigger is ``type`` the event type and ``subtype`` the entity's name (the integration's, which a rename
    on the hub does not change; main's automations name a trigger by device, type and subtype), as Home
    Assistant's own integrations name a remote's keys. Two event entities of one device with the same name
    would make the same trigger, which main refuses: the later one (by entity id) gets its entity id added."""
    out: list[tuple[str, dict[str, Any]]] = []
    taken: set[tuple[str, str, str]] = set()
    for exported, attributes in sorted(events, key=lambda item: item[0].entry.entity_id):
        entry, device = exported.entry, exported.device
        if exported.component != "event":
            continue
        block = _device(hub, device, exported.device_area) if device is not None else _hub_device(hub)
        friendly = attributes.get("friendly_name")
        name = (entry.original_name or entry.name or (friendly if isinstance(friendly, str) else None)
                or entry.entity_id.partition(".")[2])
        topics = hub.topics(exported.uid)
        for event_type in dict.fromkeys(mapping.event_types(attributes)):
            subtype = name
            if (block["identifiers"][0], event_type, subtype) in taken:
                subtype = f"{name} ({entry.entity_id})"
            taken.add((block["identifiers"][0], event_type, subtype))
            slug = _SLUG.sub("_", event_type.lower()).strip("_")[:32]
            if slug != event_type:  # the object id must stay unique: types that differ only in the slug
                slug += "_" + hashlib.sha256(event_type.encode()).hexdigest()[:8]
            # unique_id: HA 2024.3 drops it from a trigger's config, later versions want it; it names the
            # config as this hub's own, as an entity's does.
            config = {"automation_type": "trigger", "unique_id": f"{hub.identifier}_{exported.uid}_{slug}",
                      "type": event_type, "subtype": subtype,
                      "topic": topics.event, "value_template": "{{ value_json.event_type }}",
                      "payload": event_type, "qos": 1, "device": block,
                      "origin": {"name": "hasync", "sw_version": hub.agent_version}}
            out.append((f"{hub.discovery_prefix}/device_automation/{hub.identifier}/{exported.uid}_{slug}/config",
                        config))
    return out


_SLUG = re.compile(r"[^a-z0-9]+")


def _hub_device(hub: Hub) -> dict[str, Any]:
    return {"identifiers": [hub.identifier], "name": f"hasync hub {hub.cluster}", "manufacturer": "hasync",
            "model": "federation hub", "sw_version": hub.agent_version}


def _device(hub: Hub, device: Device, area: Area | None) -> dict[str, Any]:
    block: dict[str, Any] = {"identifiers": [f"{hub.identifier}_{device.identity}"],
                             "name": device.name, "via_device": hub.identifier}
    for key in ("manufacturer", "model", "sw_version", "hw_version"):
        value = getattr(device, key)
        if value:
            block[key] = value
    if area is not None:
        block["suggested_area"] = area.name
    return block


# ---- the hub's registries, as its Home Assistant's WebSocket API lists them ------------------------


def _text(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) and value else None


def parse_registries(entities: Any, devices: Any, areas: Any
                     ) -> tuple[dict[str, Entry], dict[str, Device], dict[str, Area]]:
    """``config/entity_registry/list``, ``config/device_registry/list`` and ``config/area_registry/list``;
    items that are not what HA sends are skipped (a newer HA may add fields: they are ignored)."""
    entries: dict[str, Entry] = {}
    for item in entities if isinstance(entities, list) else []:
        entity_id = _text(item, "entity_id") if isinstance(item, dict) else None
        if entity_id is None or "." not in entity_id:
            continue
        entries[entity_id] = Entry(
            entity_id, registry_id=_text(item, "id"), platform=_text(item, "platform"),
            unique_id=_text(item, "unique_id"),
            device_id=_text(item, "device_id"), area_id=_text(item, "area_id"), name=_text(item, "name"),
            original_name=_text(item, "original_name"), icon=_text(item, "icon") or _text(item, "original_icon"),
            entity_category=_text(item, "entity_category"), disabled=bool(item.get("disabled_by")))
    device_map: dict[str, Device] = {}
    for item in devices if isinstance(devices, list) else []:
        device_id = _text(item, "id") if isinstance(item, dict) else None
        if device_id is None:
            continue
        identifiers = item.get("identifiers")
        pairs = sorted(json.dumps(i) for i in identifiers) if isinstance(identifiers, list) and identifiers else []
        device_map[device_id] = Device(
            device_id, name=_text(item, "name_by_user") or _text(item, "name") or device_id,
            key="d" + hashlib.sha256("\0".join(pairs).encode()).hexdigest()[:24] if pairs else "",
            manufacturer=_text(item, "manufacturer"), model=_text(item, "model"),
            sw_version=_text(item, "sw_version"), hw_version=_text(item, "hw_version"),
            area_id=_text(item, "area_id"))
    area_map: dict[str, Area] = {}
    for item in areas if isinstance(areas, list) else []:
        area_id = _text(item, "area_id") if isinstance(item, dict) else None
        if area_id is not None:
            area_map[area_id] = Area(area_id, _text(item, "name") or area_id)
    return entries, device_map, area_map
