"""The entity record (hasync.sync.state.EntityRecord): its wire form and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from harness.records import E, rec
from hasync.messages import MessageError, parse
from hasync.sync.state import (
    EntityRecord,
)

# ---- the record ---------------------------------------------------------------------------------


def test_record_round_trip_and_wire_form() -> None:
    record = rec("on", 5, attributes={"friendly_name": "Kitchen", "nested": [1, {"x": None}]})
    payload = record.to_payload()
    assert b'"version":"1795300000005-0000-b"' in payload
    assert parse(EntityRecord, payload) == record
    tombstone = rec(None, 6)
    assert b'"state"' not in tombstone.to_payload()
    assert parse(EntityRecord, tombstone.to_payload()) == tombstone
    assert tombstone.value is None and record.value == ("on", record.attributes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tombstone": True}, "a tombstone carries no state"),
        ({"state": None}, "a record carries a state"),
        ({"origin": "c"}, "is not the node of version"),
        ({"version": "1795300000005-5-b"}, "is not '<13-digit wall_ms>"),
        ({"version": 5}, "a version is a stamp string"),
        ({"entity_id": "Input_Boolean.x"}, "String should match pattern"),
        ({"extra": 1}, "Extra inputs are not permitted"),
        ({"leader_term": "3"}, "Input should be a valid integer"),
        ({"state": "x" * 256}, "at most 255 characters"),
    ],
)
def test_record_rejects(change: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "entity_id": E, "state": "on", "attributes": {}, "version": "1795300000005-0000-b", "origin": "b",
    }
    with pytest.raises(ValidationError, match=message):
        EntityRecord.model_validate(fields | change)


def test_record_of_another_protocol_version_is_labelled() -> None:
    with pytest.raises(MessageError, match="wrong_version"):
        parse(EntityRecord, rec("on", 1).to_payload().replace(b'"v":1', b'"v":2'))
