"""Managed mode: Home Assistant's automations on only on the primary (except those kept everywhere)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Commands(Protocol):
    url: str

    async def command(self, message: dict[str, Any]) -> Any: ...


class AutomationSwitch:
    """Turns this node's automations on or off through the link (``hasync.effects.Automations``)."""

    def __init__(self, link: Commands) -> None:
        self._link = link
        self._missing_logged: set[str] = set()

    async def set_automations(self, enabled: bool, *, keep: Iterable[str] = ()) -> list[str]:
        """Turn every automation on (or off) except those in ``keep``; return the entity ids changed.

        Automations already in the wanted state, and those HA shows as neither on nor off (e.g.
        ``unavailable``), are left alone. Raises :class:`HomeAssistantError` (a subclass) when there is
        no connection or HA answers with an error or not in time.
        """
        kept = set(keep)
        malformed = sorted(entity for entity in kept if not entity.startswith("automation."))
        if malformed:
            raise ValueError(f"automations to keep must be entity ids like 'automation.x', got {malformed}")
        states = await self._link.command({"type": "get_states"})
        wanted = "on" if enabled else "off"
        present: set[str] = set()
        change: list[str] = []
        for state in states if isinstance(states, list) else []:
            entity_id = state.get("entity_id") if isinstance(state, dict) else None
            if not isinstance(entity_id, str) or not entity_id.startswith("automation."):
                continue
            present.add(entity_id)
            if entity_id in kept:
                continue
            current = state.get("state")
            if current not in ("on", "off"):
                logger.debug("leaving %s alone: its state is %r", entity_id, current)
            elif current != wanted:
                change.append(entity_id)
        for entity_id in sorted(kept - present - self._missing_logged):
            self._missing_logged.add(entity_id)
            logger.warning("Home Assistant at %s has no %s, which is configured to be kept", self._link.url, entity_id)
        if not change:
            return []
        change.sort()
        service = "turn_on" if enabled else "turn_off"
        await self._link.command(
            {"type": "call_service", "domain": "automation", "service": service, "target": {"entity_id": change}}
        )
        logger.info("turned %s %d automation(s) in Home Assistant: %s", wanted, len(change), ", ".join(change))
        return change
