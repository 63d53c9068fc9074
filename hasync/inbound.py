"""What an incoming MQTT message means: the agent's demultiplexer, pure (the simulation uses it too).

``Router.route(message)`` parses the topic (``hasync.topics``) and the payload (``hasync.messages``) and
returns what the message is for: an event of the election, a record for entity sync, the node's sync
marker, or Home Assistant announcing that it is back. A message that is not valid, or (when the cluster
has keys, ``hasync.signing``) not signed by the node it speaks for, raises ``MessageError`` with its
reason; the caller counts and drops it. Messages of other topics (another
cluster, a topic this version does not know) are None.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .election import (
    Event,
    HeartbeatReceived,
    MaintenanceChanged,
    RecordReceived,
    Resume,
    StepDown,
)
from .messages import Command, DropReason, Heartbeat, LeaseRecord, MessageError, parse
from .signing import COMMAND_WINDOW, Keyring, SeenSignatures
from .topics import TopicKind, Topics
from .transport import Incoming


@dataclass(frozen=True, slots=True)
class ToElection:
    event: Event
    command: Command | None = None  # the command it came from, for the log


@dataclass(frozen=True, slots=True)
class ToSync:
    entity_id: str
    payload: bytes
    retained: bool


@dataclass(frozen=True, slots=True)
class SyncMarker:
    payload: bytes


@dataclass(frozen=True, slots=True)
class HomeAssistantOnline:
    """Home Assistant announced it (re)started: discovery and states must be published again."""


Inbound = ToElection | ToSync | SyncMarker | HomeAssistantOnline


class Router:
    def __init__(
        self,
        topics: Topics,
        node_id: str,
        *,
        ha_status_topic: str | None = None,
        keyring: Keyring | None = None,
        unsigned_commands: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.node_id = node_id
        self.ha_status_topic = ha_status_topic
        self.keyring = keyring
        self.unsigned_commands = unsigned_commands
        self.wall = wall
        self._seen = SeenSignatures()

    def subscriptions(self) -> list[str]:
        """The election's topics (sync's are the replica's), and HA's status topic if discovery is on."""
        t = self.topics
        topics = [t.lease, t.all_heartbeats, t.command(self.node_id)]
        if self.ha_status_topic is not None:
            topics.append(self.ha_status_topic)
        return topics

    def kind(self, topic: str) -> TopicKind | None:
        parsed = self.topics.parse(topic)
        return None if parsed is None else parsed.kind

    def route(self, message: Incoming) -> Inbound | None:
        if message.topic == self.ha_status_topic:
            # Only a live "online" is news; the retained one is HA's state from before we connected.
            return HomeAssistantOnline() if message.payload == b"online" and not message.retain else None
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return None
        if parsed.kind is TopicKind.ENTITY:
            assert parsed.entity_id is not None
            return ToSync(parsed.entity_id, message.payload, message.retain)
        if not message.payload:
            return None  # a retained message being cleared (e.g. a decommissioned node)
        match parsed.kind:
            case TopicKind.LEASE:
                record = parse(LeaseRecord, message.payload)
                self._verify(message, record.holder, record.sig)
                return ToElection(RecordReceived(record, retained=message.retain))
            case TopicKind.HEARTBEAT:
                heartbeat = parse(Heartbeat, message.payload)
                if heartbeat.node != parsed.node:
                    raise MessageError(DropReason.NODE_MISMATCH, f"{heartbeat.node} on {parsed.node}'s topic")
                self._verify(message, heartbeat.node, heartbeat.sig)
                return ToElection(HeartbeatReceived(heartbeat))
            case TopicKind.COMMAND if parsed.node == self.node_id:
                command = parse(Command, message.payload)
                if message.retain:
                    raise MessageError(DropReason.RETAINED_COMMAND, "commands must not be retained")
                self._verify_command(message, command)
                return ToElection(_command_event(command), command)
            case TopicKind.SYNC_MARKER if parsed.node == self.node_id:
                return SyncMarker(message.payload)
        return None


    def _verify(self, message: Incoming, signer: str, sig: str | None) -> None:
        if self.keyring is None:
            return
        why = self.keyring.check(message.topic, message.payload, signer, sig)
        if why is not None:
            raise MessageError(why, f"not accepted as {signer}'s")

    def _verify_command(self, message: Incoming, command: Command) -> None:
        """Unsigned commands (Home Assistant's buttons) are authorised by the broker's ACL, unless the
        configuration refuses them; signed ones must verify, be recent, and be new."""
        if self.keyring is None:
            return
        if command.sig is None:
            if not self.unsigned_commands:
                raise MessageError(DropReason.UNSIGNED, "unsigned commands are refused (signing.unsigned_commands)")
            return
        assert command.by is not None and command.sent_at is not None  # the model requires them with sig
        self._verify(message, command.by, command.sig)
        if abs(self.wall() - command.sent_at) > COMMAND_WINDOW:
            raise MessageError(DropReason.STALE_COMMAND, f"sent {self.wall() - command.sent_at:.0f} s from now")
        if not self._seen.first_time(command.sig):
            raise MessageError(DropReason.STALE_COMMAND, "a replay of a command already accepted")


def _command_event(command: Command) -> Event:
    match command.command:
        case "maintenance":
            assert command.on is not None
            return MaintenanceChanged(on=command.on)
        case "resume":
            return Resume()
    return StepDown("step-down requested", successor=command.successor)
