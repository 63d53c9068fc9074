"""The MQTT topic layout, built and parsed in this one place.

Everything lives under ``{prefix}/{cluster}/``::

    lease                   lease records (claims, renewals, releases): the election stream
    leader                  retained LeaderAnnouncement for other tools
    nodes/{node}            retained Heartbeat; the node's Last Will is published here
    nodes/{node}/command    Command addressed to one node
    nodes/{node}/primary    Home Assistant's primary binary sensor state (see hasync.homeassistant.discovery)
    nodes/{node}/ha-probe   the node's HA echoes a probe here (see hasync.homeassistant)
    nodes/{node}/sync-marker  the node's own marker: its subscription's retained entity records are all in
    entities/{entity_id}    retained EntityRecord of one mirrored Home Assistant entity (see hasync.sync)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

_SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A Home Assistant entity id, ``domain.object_id``: the one definition every module uses.
ENTITY_ID_PATTERN = r"^[a-z0-9_]+\.[a-z0-9_]+$"
ENTITY_ID = re.compile(ENTITY_ID_PATTERN)
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$")


class TopicKind(Enum):
    LEASE = "lease"
    LEADER = "leader"
    HEARTBEAT = "heartbeat"
    COMMAND = "command"
    ENTITY = "entity"
    SYNC_MARKER = "sync-marker"


@dataclass(frozen=True)
class ParsedTopic:
    kind: TopicKind
    node: str | None = None
    entity_id: str | None = None


def validate_segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def validate_prefix(value: str) -> str:
    if not _PREFIX.fullmatch(value):
        raise ValueError(f"topic prefix {value!r} must be 1-4 '/'-separated segments of A-Z, a-z, 0-9, '_', '-'")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str
    cluster: str

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        validate_segment(self.cluster, "cluster name")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.cluster}"

    @property
    def lease(self) -> str:
        return f"{self.base}/lease"

    @property
    def leader(self) -> str:
        return f"{self.base}/leader"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.base}/nodes/+"

    def heartbeat(self, node: str) -> str:
        return f"{self.base}/nodes/{validate_segment(node, 'node id')}"

    def primary_state(self, node: str) -> str:
        """``ON``/``OFF`` for Home Assistant's primary binary sensor of ``node`` (not parsed by agents)."""
        return f"{self.base}/nodes/{validate_segment(node, 'node id')}/primary"

    def ha_probe(self, node: str) -> str:
        """Where a node has its Home Assistant echo a probe, to prove HA's MQTT connection works."""
        return f"{self.base}/nodes/{validate_segment(node, 'node id')}/ha-probe"

    def command(self, node: str) -> str:
        return f"{self.base}/nodes/{validate_segment(node, 'node id')}/command"

    @property
    def all_entities(self) -> str:
        return f"{self.base}/entities/+"

    def entity(self, entity_id: str) -> str:
        """The retained record of one mirrored entity; ``entity_id`` is ``domain.object_id``."""
        if not ENTITY_ID.fullmatch(entity_id):
            raise ValueError(f"entity id {entity_id!r} must be 'domain.object_id' of a-z, 0-9 and '_'")
        return f"{self.base}/entities/{entity_id}"

    def sync_marker(self, node: str) -> str:
        """A node publishes a marker here after subscribing to the entities: it comes back after the
        broker's retained records, which tells the node it has them all."""
        return f"{self.base}/nodes/{validate_segment(node, 'node id')}/sync-marker"

    def is_election(self, topic: str) -> bool:
        """The lease or a node's heartbeat (Last Will): what the election reads. Cheap: the receive path asks
        it of every message (``hasync.mqtt`` hands these to the agent before anything else waiting)."""
        if topic == self.lease:
            return True
        head = f"{self.base}/nodes/"
        node = topic[len(head):]
        return topic.startswith(head) and node != "" and "/" not in node

    def parse(self, topic: str) -> ParsedTopic | None:
        """The kind of a topic under this cluster, or None for anything else."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/")
        match rest:
            case ["lease"]:
                return ParsedTopic(TopicKind.LEASE)
            case ["leader"]:
                return ParsedTopic(TopicKind.LEADER)
            case ["nodes", node] if _SEGMENT.fullmatch(node):
                return ParsedTopic(TopicKind.HEARTBEAT, node)
            case ["nodes", node, "command"] if _SEGMENT.fullmatch(node):
                return ParsedTopic(TopicKind.COMMAND, node)
            case ["nodes", node, "sync-marker"] if _SEGMENT.fullmatch(node):
                return ParsedTopic(TopicKind.SYNC_MARKER, node)
            case ["entities", entity_id] if ENTITY_ID.fullmatch(entity_id):
                return ParsedTopic(TopicKind.ENTITY, entity_id=entity_id)
        return None
