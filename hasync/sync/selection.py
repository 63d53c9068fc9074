"""Which entities are mirrored, and how often a chatty one is published: pure, no I/O.

Selection (``Selector``), like Home Assistant's ``mqtt_statestream``: ``include`` and ``exclude`` each list
``domains``, ``entities`` and ``entity_globs`` (shell-style, ``sensor.*_temperature``). The more specific rule
wins, in this order, and the first that matches decides:

1. ``exclude.entities``  -> not mirrored
2. ``include.entities``  -> mirrored
3. ``exclude.entity_globs`` -> not mirrored
4. ``include.entity_globs`` -> mirrored
5. ``exclude.domains`` -> not mirrored
6. ``include.domains`` -> mirrored
7. anything else -> not mirrored

``include.domains`` defaults to the helper domains (``DEFAULT_DOMAINS``); a configured list replaces it.

Throttling (``Throttle``), for chatty sensors: a rule names ``entity_globs`` and a ``min_interval`` (seconds
between two changes passed on) and/or a numeric ``deadband`` (a change of a numeric state smaller than this,
from the value last passed on, is held back). A held-back value is never lost while it differs from the last
one passed on: ``due(now)`` returns it once its entity's interval has passed (trailing edge), so the bus ends
at the entity's newest value. The first rule whose glob matches applies.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DOMAINS = (
    "input_boolean",
    "input_number",
    "input_select",
    "input_text",
    "input_datetime",
    "counter",
    "timer",
)


@dataclass(frozen=True)
class Selector:
    include_domains: frozenset[str] = frozenset(DEFAULT_DOMAINS)
    include_entities: frozenset[str] = frozenset()
    include_globs: tuple[str, ...] = ()
    exclude_domains: frozenset[str] = frozenset()
    exclude_entities: frozenset[str] = frozenset()
    exclude_globs: tuple[str, ...] = ()
    _include_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _cache: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include_re", _globs(self.include_globs))
        object.__setattr__(self, "_exclude_re", _globs(self.exclude_globs))

    def __call__(self, entity_id: str) -> bool:
        """Whether ``entity_id`` is mirrored (cached: selection is asked for every state change)."""
        hit = self._cache.get(entity_id)
        if hit is None:
            hit = self._decide(entity_id)
            if len(self._cache) < 100_000:
                self._cache[entity_id] = hit
        return hit

    def _decide(self, entity_id: str) -> bool:
        if entity_id in self.exclude_entities:
            return False
        if entity_id in self.include_entities:
            return True
        if self._exclude_re is not None and self._exclude_re.fullmatch(entity_id):
            return False
        if self._include_re is not None and self._include_re.fullmatch(entity_id):
            return True
        domain = entity_id.partition(".")[0]
        if domain in self.exclude_domains:
            return False
        return domain in self.include_domains


def _globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class ThrottleRule:
    entity_globs: tuple[str, ...]
    min_interval: float = 0.0
    deadband: float = 0.0


@dataclass(slots=True)
class _Entry:
    rule: ThrottleRule | None
    passed: tuple[str, Any] | None = None  # the value last passed on
    passed_at: float = -math.inf
    held: tuple[str, Any] | None = None  # a newer value not passed on yet


class Throttle:
    """Holds back changes of entities that match a rule; ``offer`` and ``due`` say what to pass on."""

    def __init__(self, rules: Iterable[ThrottleRule] = ()) -> None:
        self.rules = tuple(rules)
        self._compiled = [(rule, _globs(rule.entity_globs)) for rule in self.rules]
        self._entries: dict[str, _Entry] = {}

    def _entry(self, entity_id: str) -> _Entry:
        entry = self._entries.get(entity_id)
        if entry is None:
            rule = next((r for r, rx in self._compiled if rx is not None and rx.fullmatch(entity_id)), None)
            entry = self._entries[entity_id] = _Entry(rule)
        return entry

    def offer(self, entity_id: str, value: tuple[str, Any], now: float) -> bool:
        """A new local value: True to pass it on now; False if it is held back (or not worth passing on)."""
        if not self._compiled:
            return True
        entry = self._entry(entity_id)
        rule = entry.rule
        if rule is None:
            return True
        if entry.passed is not None and _within_deadband(entry.passed, value, rule.deadband):
            entry.held = None  # close enough to what the bus has: nothing to pass on
            return False
        if now < entry.passed_at + rule.min_interval:  # the same sum as next_due(): no rounding gap
            entry.held = value
            return False
        entry.passed, entry.passed_at, entry.held = value, now, None
        return True

    def forget(self, entity_id: str) -> None:
        """The entity was removed, or its value was set from the bus: start afresh."""
        self._entries.pop(entity_id, None)

    def due(self, now: float) -> list[tuple[str, tuple[str, Any]]]:
        """Held values whose interval has passed, to pass on now."""
        out: list[tuple[str, tuple[str, Any]]] = []
        for entity_id, entry in self._entries.items():
            if entry.held is not None and entry.rule is not None and now >= entry.passed_at + entry.rule.min_interval:
                out.append((entity_id, entry.held))
                entry.passed, entry.passed_at, entry.held = entry.held, now, None
        return out

    def next_due(self) -> float:
        """When the earliest held value becomes due (inf if none is held)."""
        return min(
            (e.passed_at + e.rule.min_interval for e in self._entries.values() if e.held is not None and e.rule),
            default=math.inf,
        )


def _within_deadband(old: tuple[str, Any], new: tuple[str, Any], deadband: float) -> bool:
    if deadband <= 0 or old[1] != new[1]:
        return False
    try:
        a, b = float(old[0]), float(new[0])
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) < deadband
