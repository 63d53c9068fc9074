"""Home Assistant MQTT discovery: one HA device per node, with the entities users gate automations on.

Pure: builds (topic, payload) pairs; the agent publishes them (retained) when it connects and whenever
Home Assistant announces ``online`` on its status topic.

Entities of node N (unique ids ``hasync_{cluster}_{N}_{key}``):

- ``binary_sensor`` **primary**: ``ON`` only while N acts as primary. Its own state topic, refreshed
  every renew interval, with ``expire_after`` shorter than the renew deadline and availability from
  N's heartbeat (Last Will): if the agent dies or hangs, HA stops showing ``on`` before any other node
  can be elected. This is the sensor automations use as their condition.
- ``sensor`` **role**, **leader**, **term**, **health**: read from N's heartbeat.
- ``button`` **step down**: a graceful handover (``step_down`` command); the node then does not take
  leadership back from a worse node until the agent restarts or ``button`` **resume** is pressed.
- ``switch`` **maintenance**: while on, N refuses leadership (``maintenance`` command).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..messages import Command
from ..topics import Topics

PRIMARY_ON = "ON"
PRIMARY_OFF = "OFF"


def primary_state(primary: bool, until_wall: float) -> bytes:
    """The primary sensor's state message: primary or not, and the wall-clock instant it stops being
    true (the lease deadline), after which HA reads it as OFF even if it arrives late."""
    return json.dumps({"primary": primary, "until": round(until_wall, 3)}).encode()


@dataclass(frozen=True)
class Discovery:
    topics: Topics
    node: str
    discovery_prefix: str
    renew_deadline: float
    agent_version: str

    @property
    def expire_after(self) -> int:
        """Whole seconds (HA's unit), strictly shorter than the renew deadline."""
        return max(1, math.ceil(self.renew_deadline) - 1)

    @property
    def unique_prefix(self) -> str:
        return f"hasync_{self.topics.cluster}_{self.node}"

    def primary_state_topic(self) -> str:
        return self.topics.primary_state(self.node)

    def config_topic(self, component: str, key: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.unique_prefix}/{key}/config"

    def _device(self) -> dict[str, Any]:
        return {
            "identifiers": [self.unique_prefix],
            "name": f"hasync {self.node}",
            "manufacturer": "hasync",
            "model": f"hasync agent (cluster {self.topics.cluster})",
            "sw_version": self.agent_version,
        }

    def _availability(self) -> list[dict[str, str]]:
        return [{
            "topic": self.topics.heartbeat(self.node),
            "value_template": "{{ 'online' if value_json.online else 'offline' }}",
        }]

    def _entity(self, key: str, name: str, **fields: Any) -> dict[str, Any]:
        return {
            "name": name,
            "unique_id": f"{self.unique_prefix}_{key}",
            "object_id": f"{self.unique_prefix}_{key}",
            "device": self._device(),
            "availability": self._availability(),
            **fields,
        }

    def configs(self) -> list[tuple[str, bytes]]:
        """Every discovery config of this node: (retained topic, payload)."""
        hb = self.topics.heartbeat(self.node)
        command = self.topics.command(self.node)
        entities: list[tuple[str, str, dict[str, Any]]] = [
            ("binary_sensor", "primary", self._entity(
                "primary", "Primary",
                state_topic=self.primary_state_topic(),
                # A message that arrives after its own deadline (it sat in a frozen agent's buffer)
                # reads OFF: HA runs beside its agent, on the same wall clock.
                value_template=(
                    "{{ 'ON' if value_json.primary and as_timestamp(now()) < value_json.until else 'OFF' }}"
                ),
                payload_on=PRIMARY_ON, payload_off=PRIMARY_OFF,
                expire_after=self.expire_after, device_class="running",
            )),
            ("sensor", "role", self._entity("role", "Role", state_topic=hb,
                                            value_template="{{ value_json.role }}")),
            ("sensor", "leader", self._entity("leader", "Leader", state_topic=hb,
                                              value_template="{{ value_json.leader or 'none' }}")),
            ("sensor", "term", self._entity("term", "Term", state_topic=hb, entity_category="diagnostic",
                                            value_template="{{ value_json.view.term if value_json.view else 0 }}")),
            ("sensor", "health", self._entity("health", "Health", state_topic=hb,
                                              value_template="{{ 'ok' if value_json.healthy else 'failing' }}")),
            ("button", "step_down", self._entity(
                "step_down", "Step down", command_topic=command,
                payload_press=Command(command="step_down").to_payload().decode(),
            )),
            ("button", "resume", self._entity(
                "resume", "Resume", command_topic=command,
                payload_press=Command(command="resume").to_payload().decode(),
            )),
            ("switch", "maintenance", self._entity(
                "maintenance", "Maintenance", command_topic=command, state_topic=hb,
                payload_on=Command(command="maintenance", on=True).to_payload().decode(),
                payload_off=Command(command="maintenance", on=False).to_payload().decode(),
                value_template="{{ 'ON' if value_json.maintenance else 'OFF' }}",
                state_on="ON", state_off="OFF", entity_category="config",
            )),
        ]
        return [(self.config_topic(component, key), json.dumps(config).encode())
                for component, key, config in entities]

    def removals(self) -> list[tuple[str, bytes]]:
        """Empty retained payloads that remove this node's entities (and its status) from HA."""
        return [(topic, b"") for topic, _ in self.configs()] + [
            (self.primary_state_topic(), b""), (self.topics.heartbeat(self.node), b""),
        ]
