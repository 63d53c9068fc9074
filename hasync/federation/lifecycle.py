"""What main holds of a hub, and when it changes: pure, no I/O, the clock passed in.

Theory of operation
-------------------
The hub's registries change while it exports: entities are created, renamed, disabled, removed, moved to
another area; devices and areas are renamed. Home Assistant announces each change as an event
(``entity_registry_updated``, ``device_registry_updated``, ``area_registry_updated``) that says which
entry changed but not all it changed into, so the exporter reads the registry again. A burst (an
integration setting up 500 entities) is 500 events: ``Debounce`` makes it one read, due ``quiet`` seconds
after the last event and never later than ``longest`` after the first, so a steady stream of changes is
still read at least every ``longest`` seconds and never more often than one read per burst.

Main holds a retained discovery config (and state) per exported entity. An entity that stops being
exported (removed on the hub, disabled, renamed out of a glob, its area no longer included), or a config
found retained under this hub's node id that it does not export (left by an earlier run, or the other
node of a pair), is **retiring**: its state says ``unavailable`` at once, and only when ``grace`` has
passed without it coming back are its config and state cleared (empty retained messages: main deletes its
entity). An entity that comes back within the grace (an integration reloading removes and re-adds its
entities; a device re-paired; a hub Home Assistant still starting) loses nothing on main: not its entity
id, its area, its history or its place on dashboards. ``Retirements`` keeps the retiring configs by topic,
each with its deadline. Clearing, a deletion on main, is the one irreversible thing an exporter does, so it
waits; being late costs an entity shown unavailable a while longer.
"""

from __future__ import annotations

from dataclasses import dataclass


class Debounce:
    """Coalesces pokes into one action, due ``quiet`` after the last poke and at most ``longest`` after the
    first; ``retry`` makes it due at a given time without a poke (an action that failed)."""

    def __init__(self, quiet: float, longest: float) -> None:
        if not 0 <= quiet <= longest:
            raise ValueError(f"need 0 <= quiet <= longest, got {quiet=}, {longest=}")
        self.quiet = quiet
        self.longest = longest
        self._first: float | None = None
        self._last: float | None = None
        self._retry: float | None = None

    def poke(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def retry(self, at: float) -> None:
        self._retry = at if self._retry is None else min(self._retry, at)

    @property
    def deadline(self) -> float | None:
        """When the action is due; None if nothing is waiting."""
        due = None if self._first is None or self._last is None else min(self._last + self.quiet,
                                                                          self._first + self.longest)
        if self._retry is not None:
            due = self._retry if due is None else min(due, self._retry)
        return due

    def due(self, now: float) -> bool:
        """True once the deadline has come; the caller acts, and the next poke starts a new burst."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        self._first = self._last = self._retry = None
        return True


@dataclass(frozen=True)
class Retiring:
    """A retained config main still holds for an entity this hub no longer exports."""

    config_topic: str
    state_topic: str
    deadline: float


class Retirements:
    """Configs waiting out the grace before they are cleared, by config topic."""

    def __init__(self, grace: float) -> None:
        if grace < 0:
            raise ValueError(f"the removal grace must be >= 0, got {grace}")
        self.grace = grace
        self._by_topic: dict[str, Retiring] = {}

    def __len__(self) -> int:
        return len(self._by_topic)

    def __contains__(self, config_topic: object) -> bool:
        return config_topic in self._by_topic

    def leave(self, config_topic: str, state_topic: str, now: float) -> bool:
        """The config is no longer exported: its grace starts now, unless it is already running (a second
        sighting never postpones the clearing). True if it started now."""
        if config_topic in self._by_topic:
            return False
        self._by_topic[config_topic] = Retiring(config_topic, state_topic, now + self.grace)
        return True

    def back(self, config_topic: str) -> bool:
        """The entity is exported again within its grace: nothing is cleared. True if it was retiring."""
        return self._by_topic.pop(config_topic, None) is not None

    def due(self, now: float) -> list[Retiring]:
        """The configs whose grace is over, removed from the waiting set: clear them now."""
        over = [r for r in self._by_topic.values() if r.deadline <= now]
        for retiring in over:
            del self._by_topic[retiring.config_topic]
        return sorted(over, key=lambda r: (r.deadline, r.config_topic))

    @property
    def deadline(self) -> float | None:
        return min((r.deadline for r in self._by_topic.values()), default=None)
