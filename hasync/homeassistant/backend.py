"""Entity sync's backend for Home Assistant: what HA holds, what changed there, and setting it.

This is the one place that reads Home Assistant's state objects and ``state_changed`` events (their
``state``, ``attributes`` and ``context`` fields). Echo suppression: ``scene.apply`` answers with the context
id of the call, and every ``state_changed`` event the call caused carries it. Events of entities in an apply
in flight are held until the call's answer, then handled in their order; those with the call's context are
the apply's own, and answer the apply instead of being reported as local changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..sync.backend import Sink
from ..sync.state import Apply, Remove, Value
from .errors import CommandFailed, HomeAssistantError
from .link import HomeAssistantLink


def _value(state: Any) -> Value | None:
    """(state, attributes) of a Home Assistant state object, or None if it is not one."""
    if not isinstance(state, dict):
        return None
    value, attributes = state.get("state"), state.get("attributes")
    if not isinstance(value, str):
        return None
    return (value, attributes if isinstance(attributes, dict) else {})


def _context_id(state: Any) -> str | None:
    context = state.get("context") if isinstance(state, dict) else None
    ident = context.get("id") if isinstance(context, dict) else None
    return ident if isinstance(ident, str) else None


class HomeAssistantBackend:
    """The entities of this node's Home Assistant, through ``HomeAssistantLink``'s state watching.

    Applies go through ``scene.apply``; removals through ``{domain}/delete`` (UI-made helpers only).
    Home Assistant cannot create an entity from a record: a record of an entity this HA lacks fails with a
    message saying so, and is retried when the entity appears.
    """

    name = "Home Assistant"

    def __init__(self) -> None:
        self.link: HomeAssistantLink | None = None  # set by the agent once the link exists
        self._sink: Sink | None = None
        self._selected: Callable[[str], bool] = lambda _: False
        self._current: dict[str, str] = {}  # the state HA shows for each mirrored entity
        self._inflight: set[str] = set()
        self._held: list[dict[str, Any]] = []
        self._removing: set[str] = set()

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None:
        self._sink, self._selected = sink, selected

    # Callbacks of HomeAssistantLink (see its state watching).

    def on_states(self, states: list[dict[str, Any]]) -> None:
        assert self._sink is not None
        snapshot: dict[str, Value] = {}
        for state in states:
            entity_id = state.get("entity_id") if isinstance(state, dict) else None
            value = _value(state)
            if isinstance(entity_id, str) and value is not None and self._selected(entity_id):
                snapshot[entity_id] = value
        self._current = {e: v[0] for e, v in snapshot.items()}
        self._held.clear()
        self._sink.local_snapshot(snapshot)

    def on_state_changed(self, event: dict[str, Any]) -> None:
        data = event.get("data")
        entity_id = data.get("entity_id") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(entity_id, str) or not self._selected(entity_id):
            return
        if entity_id in self._inflight:
            self._held.append(data)
        else:
            self._handle(data, ours=None)

    def _handle(self, data: dict[str, Any], ours: str | None) -> bool:
        """One state_changed event; True if it is the apply's own (context ``ours``)."""
        assert self._sink is not None
        entity_id = data["entity_id"]
        new = data.get("new_state")
        value = _value(new)
        if new is None:
            self._current.pop(entity_id, None)
            if entity_id in self._removing:
                return True
            self._sink.local_changed(entity_id, None)
            return False
        if value is None:
            return False
        self._current[entity_id] = value[0]
        if ours is not None and _context_id(new) == ours:
            return True
        self._sink.local_changed(entity_id, value, appeared=data.get("old_state") is None)
        return False

    async def apply(self, batch: list[Apply | Remove]) -> None:
        sink = self._sink
        assert sink is not None
        applies = [a for a in batch if isinstance(a, Apply)]
        for item in batch:
            if isinstance(item, Remove):
                await self._remove(item)
        missing = [a for a in applies if a.entity_id not in self._current]
        for a in missing:
            sink.apply_failed(a.entity_id, a.version, f"{a.entity_id} does not exist in this Home Assistant, and "
                              "hasync cannot create it: add the helper here too (same id)")
        todo = [a for a in applies if a.entity_id in self._current]
        if not todo:
            return
        if self.link is None:
            for a in todo:
                sink.apply_failed(a.entity_id, a.version, "not connected to Home Assistant")
            return
        chunks = [todo]
        while chunks:
            chunk = chunks.pop(0)
            self._inflight = {a.entity_id for a in chunk}
            ours: str | None = None
            error: str | None = None
            rejected = False  # HA answered the call with an error (a bad value), rather than not answering
            try:
                ours = await self.link.apply_states({a.entity_id: {"state": a.state, **a.attributes} for a in chunk})
            except CommandFailed as exc:
                error, rejected = str(exc), True
            except HomeAssistantError as exc:
                error = str(exc)
            finally:
                held, self._held, self._inflight = self._held, [], set()
            if rejected and len(chunk) > 1:
                # One bad value fails the whole call: find it by trying each entity alone.
                self._flush(held, None, {})
                chunks.extend([a] for a in chunk)
                continue
            wanted = {a.entity_id: a for a in chunk}
            done = self._flush(held, ours, wanted)
            for a in chunk:
                if a.entity_id in done:
                    continue
                if error is not None:
                    sink.apply_failed(a.entity_id, a.version, error)
                elif self._current.get(a.entity_id) == a.state:
                    sink.applied(a.entity_id, a.version)  # HA held that state already (attributes may differ)
                else:
                    sink.apply_failed(a.entity_id, a.version, f"Home Assistant did not take {a.state!r}: "
                                      f"{a.entity_id} shows {self._current.get(a.entity_id)!r} (out of range, or "
                                      "not an option of this helper?)")

    def _flush(self, held: list[dict[str, Any]], ours: str | None, wanted: dict[str, Apply]) -> set[str]:
        """Handle held events in order; an entity's answer goes in at the place of its apply's own event."""
        assert self._sink is not None
        done: set[str] = set()
        for data in held:
            entity_id = data["entity_id"]
            if self._handle(data, ours) and entity_id in wanted and entity_id not in done:
                done.add(entity_id)
                self._sink.applied(entity_id, wanted[entity_id].version)
        return done

    async def _remove(self, item: Remove) -> None:
        assert self._sink is not None
        if item.entity_id not in self._current:
            self._sink.applied(item.entity_id, item.version)  # already absent
            return
        if self.link is None:
            self._sink.apply_failed(item.entity_id, item.version, "not connected to Home Assistant")
            return
        self._removing.add(item.entity_id)
        try:
            await self.link.delete_helper(item.entity_id)
        except HomeAssistantError as exc:
            self._sink.apply_failed(item.entity_id, item.version, f"cannot delete {item.entity_id} (deleted on "
                                    f"another node; only helpers made in HA's UI can be deleted by hasync): {exc}")
        else:
            self._current.pop(item.entity_id, None)
            self._sink.applied(item.entity_id, item.version)
        finally:
            self._removing.discard(item.entity_id)
