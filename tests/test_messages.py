"""Wire messages: LeaseRecord shape rules, strictness, payload round trips, parse() error labels."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from hasync.messages import (
    MAX_INT,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    Command,
    Heartbeat,
    LeaderAnnouncement,
    LeaseRecord,
    MessageError,
    NodeRole,
    SyncSummary,
    View,
    parse,
)

NODE = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
TERMS = st.integers(min_value=0, max_value=MAX_INT)


def lease(**fields: Any) -> dict[str, Any]:
    """The fields of a valid renewal, with ``fields`` replacing or adding some."""
    base: dict[str, Any] = {
        "kind": "renew", "term": 7, "seq": 3, "holder": "ha-1", "incarnation": "i-1", "conn": 2,
        "priority": 100, "lease_ms": 3000, "sent_at": 1700000000.5,
    }
    return base | fields


def claim(**fields: Any) -> dict[str, Any]:
    return lease(kind="claim", term=8, seq=0, prev_term=7, prev_seq=3) | fields


def heartbeat(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"node": "ha-1", "incarnation": "i-1", "conn": 1, "online": True, "role": "standby"}
    return base | fields


def payload(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


# ---- LeaseRecord shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        claim(),
        claim(term=1, prev_term=0, prev_seq=0),
        lease(),
        lease(kind="renew", seq=1),
        lease(kind="release"),
        lease(kind="release", successor="ha-2"),
        lease(term=MAX_INT, seq=MAX_INT),
        lease(priority=0),
        lease(priority=1000),
    ],
)
def test_valid_lease_records(fields: dict[str, Any]) -> None:
    record = LeaseRecord(**fields)
    assert record.v == PROTOCOL_VERSION
    assert record.kind == fields["kind"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (claim(prev_term=None), "a claim names the record it follows"),
        (claim(prev_seq=None), "a claim names the record it follows"),
        (claim(term=9), "a claim opens the term after prev_term"),
        (claim(term=7), "a claim opens the term after prev_term"),
        (claim(seq=1), "a claim has seq 0"),
        (claim(successor="ha-2"), "only a release names a successor"),
        (lease(seq=0), "a renew has seq >= 1"),
        (lease(kind="release", seq=0), "a release has seq >= 1"),
        (lease(prev_term=6), "a renew carries no prev_term/prev_seq"),
        (lease(prev_seq=1), "a renew carries no prev_term/prev_seq"),
        (lease(kind="release", prev_term=6, prev_seq=2), "a release carries no prev_term/prev_seq"),
        (lease(successor="ha-2"), "only a release names a successor"),
        (lease(kind="steal"), "kind"),
        (lease(term=-1), "term"),
        (lease(term=MAX_INT + 1), "term"),
        (lease(seq=-1), "seq"),
        (lease(seq=MAX_INT + 1), "seq"),
        (lease(conn=-1), "conn"),
        (lease(conn=MAX_INT + 1), "conn"),
        (lease(priority=-1), "priority"),
        (lease(priority=1001), "priority"),
        (lease(lease_ms=0), "lease_ms"),
        (lease(lease_ms=MAX_INT + 1), "lease_ms"),
        (lease(sent_at=float("inf")), "sent_at"),
        (lease(sent_at=float("nan")), "sent_at"),
        (lease(incarnation=""), "incarnation"),
        (lease(incarnation="x" * 65), "incarnation"),
        (lease(holder="bad node"), "holder"),
        (lease(kind="release", successor="a/b"), "successor"),
    ],
)
def test_invalid_lease_records(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LeaseRecord(**fields)


def test_missing_fields_are_named() -> None:
    fields = lease()
    del fields["holder"], fields["lease_ms"]
    with pytest.raises(ValidationError) as info:
        LeaseRecord(**fields)
    assert {err["loc"] for err in info.value.errors()} == {("holder",), ("lease_ms",)}


def test_extra_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LeaseRecord(**lease(token="x"))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Heartbeat(**heartbeat(uptime=5))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        View(term=1, seq=1, holder="ha-1")  # type: ignore[call-arg]


def test_messages_are_frozen() -> None:
    record = LeaseRecord(**lease())
    with pytest.raises(ValidationError, match="frozen"):
        record.term = 8  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        View(term=1, seq=1).seq = 2  # type: ignore[misc]
    assert hash(record) == hash(LeaseRecord(**lease()))


@pytest.mark.parametrize(
    "fields",
    [
        lease(term="7"),
        lease(seq=3.0),
        lease(term=True),
        lease(conn="2"),
        lease(lease_ms=3000.0),
        lease(holder=1),
        lease(sent_at="1700000000.5"),
    ],
)
def test_types_are_strict(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LeaseRecord(**fields)
    with pytest.raises(MessageError) as info:
        parse(LeaseRecord, payload(fields))
    assert info.value.reason == "invalid"


def test_an_integer_sent_at_is_a_float() -> None:
    record = parse(LeaseRecord, payload(lease(sent_at=1700000000)))
    assert record.sent_at == 1700000000.0


def test_version_must_be_1() -> None:
    assert LeaseRecord(**lease(v=1)).v == 1
    with pytest.raises(ValidationError, match="v"):
        LeaseRecord(**lease(v=2))


# ---- payloads and parse() -----------------------------------------------------------------------


def test_to_payload_omits_none_and_round_trips() -> None:
    record = LeaseRecord(**lease())
    data = json.loads(record.to_payload())
    assert data == {"v": 1} | lease()
    assert "prev_term" not in data and "successor" not in data
    assert parse(LeaseRecord, record.to_payload()) == record


@pytest.mark.parametrize("fields", [claim(), lease(), lease(kind="release", successor="ha-2")])
def test_lease_record_round_trip(fields: dict[str, Any]) -> None:
    record = LeaseRecord(**fields)
    assert parse(LeaseRecord, record.to_payload()) == record


def test_parse_accepts_a_payload_of_exactly_the_maximum_size() -> None:
    body = LeaseRecord(**lease()).to_payload()
    padded = body + b" " * (MAX_PAYLOAD_BYTES - len(body))
    assert len(padded) == MAX_PAYLOAD_BYTES
    assert parse(LeaseRecord, padded) == LeaseRecord(**lease())


def test_parse_rejects_oversized_payloads_before_decoding() -> None:
    body = LeaseRecord(**lease()).to_payload()
    with pytest.raises(MessageError) as info:
        parse(LeaseRecord, body + b" " * (MAX_PAYLOAD_BYTES + 1 - len(body)))
    assert info.value.reason == "oversized"
    assert str(MAX_PAYLOAD_BYTES) in info.value.detail
    with pytest.raises(MessageError) as info:
        parse(Heartbeat, b"x" * (MAX_PAYLOAD_BYTES + 1))
    assert info.value.reason == "oversized"


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_parse_labels_another_version(version: object) -> None:
    with pytest.raises(MessageError) as info:
        parse(LeaseRecord, payload(lease(v=version)))
    assert info.value.reason == "wrong_version"
    assert str(info.value).startswith("wrong_version: ")


def test_parse_labels_another_version_even_with_other_errors() -> None:
    with pytest.raises(MessageError) as info:
        parse(Heartbeat, payload({"v": 2, "node": "a new shape"}))
    assert info.value.reason == "wrong_version"


def test_a_missing_version_means_version_1() -> None:
    fields = lease()
    assert "v" not in fields
    assert parse(LeaseRecord, payload(fields)).v == 1


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"not json", "message"),
        (b"", "message"),
        (b"\xff\xfe", "message"),
        (b"[]", "message"),
        (b"null", "message"),
        (b'"renew"', "message"),
        (payload(lease(term="7")), "term"),
        (payload(lease(holder="bad node")), "holder"),
        (payload(lease(holder="ha-1\n")), "holder"),
        (payload(lease(holder="x" * 65)), "holder"),
        (payload(lease(seq=0)), "message"),
        (payload(lease(extra=1)), "extra"),
        (payload({k: v for k, v in lease().items() if k != "lease_ms"}), "lease_ms"),
    ],
)
def test_parse_labels_invalid_payloads(data: bytes, where: str) -> None:
    with pytest.raises(MessageError) as info:
        parse(LeaseRecord, data)
    assert info.value.reason == "invalid"
    assert info.value.detail.startswith(f"{where}: ")
    assert isinstance(info.value, ValueError)


# ---- Heartbeat, Command, LeaderAnnouncement -----------------------------------------------------


def make_heartbeat(**fields: Any) -> Heartbeat:
    values = heartbeat(**fields)
    return Heartbeat(**{**values, "role": NodeRole(values["role"])})


def test_heartbeat_defaults_and_round_trip() -> None:
    minimal = make_heartbeat()
    assert (minimal.view, minimal.leader, minimal.healthy, minimal.eligible, minimal.checks) == (
        None, None, False, False, {}
    )
    assert parse(Heartbeat, minimal.to_payload()) == minimal
    full = make_heartbeat(**dict(
        role="primary", view=View(term=7, seq=42), leader="ha-1", priority=100, preempt=False, healthy=True,
        eligible=True, maintenance=True, checks={"ha-api": True, "disk": False}, agent_version="0.1.0",
        sync=SyncSummary(synced=True, entities=12, pending=1, queued=0, lag_ms=3), sent_at=1700000000.25,
    ))
    assert json.loads(full.to_payload())["view"] == {"term": 7, "seq": 42}
    assert json.loads(full.to_payload())["sync"] == {"synced": True, "entities": 12, "pending": 1, "queued": 0,
                                                     "lag_ms": 3}
    assert parse(Heartbeat, full.to_payload()) == full


def test_the_last_will_is_the_same_heartbeat_offline() -> None:
    will = make_heartbeat(online=False, role="offline")
    assert parse(Heartbeat, will.to_payload()) == will


@pytest.mark.parametrize(
    "fields",
    [
        heartbeat(role="leader"),
        heartbeat(online="yes"),
        heartbeat(node="a.b"),
        heartbeat(leader="a b"),
        heartbeat(view={"term": 1}),
        heartbeat(view={"term": 1, "seq": 1, "x": 1}),
        heartbeat(checks={"ha": "up"}),
        heartbeat(sync={"synced": True, "entities": -1, "pending": 0, "queued": 0}),
        heartbeat(sync={"synced": True, "entities": 1, "pending": 0}),
    ],
)
def test_invalid_heartbeats(fields: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        parse(Heartbeat, payload(fields))
    assert info.value.reason == "invalid"


def test_command_round_trip() -> None:
    for command in (Command(command="step_down"), Command(command="step_down", successor="ha-2")):
        assert parse(Command, command.to_payload()) == command
    assert json.loads(Command(command="step_down").to_payload()) == {"v": 1, "command": "step_down"}


@pytest.mark.parametrize("fields", [{"command": "reboot"}, {"command": "step_down", "successor": "#"}, {}])
def test_invalid_commands(fields: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        parse(Command, payload(fields))
    assert info.value.reason == "invalid"


def test_leader_announcement_round_trip() -> None:
    announcement = LeaderAnnouncement(leader="ha-1", term=7, sent_at=1700000000.5)
    assert json.loads(announcement.to_payload()) == {"v": 1, "leader": "ha-1", "term": 7, "sent_at": 1700000000.5}
    assert parse(LeaderAnnouncement, announcement.to_payload()) == announcement


def test_a_leader_announcement_with_a_null_leader_parses() -> None:
    # docs/protocol.md: a primary stepping down publishes {"leader": null, ...}
    data = b'{"v": 1, "leader": null, "term": 7, "sent_at": 1700000000.5}'
    assert parse(LeaderAnnouncement, data).leader is None


def test_a_step_down_announcement_round_trips() -> None:
    announcement = LeaderAnnouncement(leader=None, term=7, sent_at=1700000000.5)
    assert json.loads(announcement.to_payload()).get("leader", "missing") is None
    assert parse(LeaderAnnouncement, announcement.to_payload()) == announcement


# ---- node ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["a", "Z", "0", "-", "_", "ha-kitchen_2", "x" * 64])
def test_node_id_pattern_accepts(node: str) -> None:
    assert make_heartbeat(node=node).node == node
    assert Command(command="step_down", successor=node).successor == node


@pytest.mark.parametrize("node", ["", "x" * 65, "a b", "a.b", "a/b", "+", "#", "\u00e4", "ha-1\n", "\nha-1", "a\x00"])
def test_node_id_pattern_rejects(node: str) -> None:
    with pytest.raises(ValidationError, match="String should match pattern"):
        make_heartbeat(node=node)
    with pytest.raises(ValidationError, match="String should match pattern"):
        LeaseRecord(**lease(holder=node))


# ---- property -----------------------------------------------------------------------------------


@st.composite
def lease_records(draw: st.DrawFn) -> LeaseRecord:
    kind = draw(st.sampled_from(["claim", "renew", "release"]))
    fields: dict[str, Any] = {
        "kind": kind,
        "holder": draw(NODE),
        "incarnation": draw(st.text(min_size=1, max_size=64)),
        "conn": draw(st.integers(min_value=0, max_value=MAX_INT)),
        "priority": draw(st.integers(min_value=0, max_value=1000)),
        "lease_ms": draw(st.integers(min_value=1, max_value=MAX_INT)),
        # sent_at is time.time(): always finite (JSON has no NaN or infinity)
        "sent_at": draw(st.floats(allow_nan=False, allow_infinity=False)),
    }
    if kind == "claim":
        prev_term = draw(st.integers(min_value=0, max_value=MAX_INT - 1))
        fields |= {"term": prev_term + 1, "seq": 0, "prev_term": prev_term, "prev_seq": draw(TERMS)}
    else:
        fields |= {"term": draw(TERMS), "seq": draw(st.integers(min_value=1, max_value=MAX_INT))}
        if kind == "release":
            fields["successor"] = draw(st.none() | NODE)
    return LeaseRecord(**fields)


@given(lease_records())
def test_lease_records_round_trip_through_their_payload(record: LeaseRecord) -> None:
    data = record.to_payload()
    assert len(data) <= MAX_PAYLOAD_BYTES
    assert parse(LeaseRecord, data) == record
