"""The messages hasync agents exchange, as strict pydantic models.

Every message is JSON with a version field ``v``. Models are frozen and forbid extra fields: a message
that does not validate is logged, counted and dropped by the caller, never half-applied.
docs/protocol.md is the human-readable form of this module.

Every number a peer can send is bounded: integers to JSON's exact range (``MAX_INT``, 2^53 - 1, which every
JSON parser reads exactly), floats to finite values. The election never adopts a term it could not follow
with a claim (see ``hasync.election.MAX_TERM``).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 16 * 1024
MAX_INT = 2**53 - 1

NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Term = Count
Seq = Count
Priority = Annotated[int, Field(ge=0, le=1000)]
WallTime = Annotated[float, Field(allow_inf_nan=False)]  # seconds since the epoch, informational only
# An Ed25519 signature, unpadded base64url, always the message's last member (hasync.signing).
Signature = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{86}$")]


class NodeRole(enum.StrEnum):
    """What a node reports itself as, in heartbeats, ``hasync status``, ``/healthz`` and metrics."""

    PRIMARY = "primary"
    STANDBY = "standby"
    CANDIDATE = "candidate"
    OBSERVING = "observing"
    FAULT = "fault"
    OFFLINE = "offline"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    v: Literal[1] = 1

    def to_payload(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class LeaseRecord(Message):
    """One record on the cluster's lease topic: a claim opening a term, a renewal, or a release.

    Claims are published without the retain flag, renewals and releases with it, so the retained
    lease is always a record its holder published while it believed itself primary.
    """

    kind: Literal["claim", "renew", "release"]
    term: Term
    seq: Seq
    holder: NodeId
    incarnation: Annotated[str, Field(min_length=1, max_length=64)]
    conn: Count
    prev_term: Term | None = None
    prev_seq: Seq | None = None
    successor: NodeId | None = None
    priority: Priority = 0
    lease_ms: Annotated[int, Field(gt=0, le=MAX_INT)]
    sent_at: WallTime  # wall clock, informational only: never used to judge expiry
    sig: Signature | None = None  # by ``holder``

    @model_validator(mode="after")
    def _shape(self) -> LeaseRecord:
        if self.kind == "claim":
            if self.prev_term is None or self.prev_seq is None:
                raise ValueError("a claim names the record it follows (prev_term, prev_seq)")
            if self.term != self.prev_term + 1:
                raise ValueError("a claim opens the term after prev_term")
            if self.seq != 0:
                raise ValueError("a claim has seq 0")
        else:
            if self.prev_term is not None or self.prev_seq is not None:
                raise ValueError(f"a {self.kind} carries no prev_term/prev_seq")
            if self.seq < 1:
                raise ValueError(f"a {self.kind} has seq >= 1")
        if self.successor is not None and self.kind != "release":
            raise ValueError("only a release names a successor")
        return self


class View(BaseModel):
    """The newest lease record a node has accepted: its position in the lease stream."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    term: Term
    seq: Seq


class SyncSummary(BaseModel):
    """A node's entity sync, for ``hasync status``: informational only."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    synced: bool
    entities: Count
    pending: Count
    queued: Count
    lag_ms: Count | None = None


class Heartbeat(Message):
    """A node's retained status; its Last Will is the same message with ``online`` false."""

    node: NodeId
    incarnation: Annotated[str, Field(min_length=1, max_length=64)]
    conn: Count
    online: bool
    role: NodeRole
    view: View | None = None
    leader: NodeId | None = None
    priority: Priority = 0
    preempt: bool = True
    healthy: bool = False
    eligible: bool = False
    maintenance: bool = False
    checks: Annotated[dict[Annotated[str, Field(max_length=64)], bool], Field(max_length=64)] = Field(
        default_factory=dict)
    agent_version: Annotated[str, Field(max_length=64)] = ""
    sync: SyncSummary | None = None
    sent_at: WallTime = 0.0
    sig: Signature | None = None  # by ``node``


class LeaderAnnouncement(Message):
    """Retained on the leader topic for other tools: who is primary, for which term.

    ``leader`` is null when a primary stepped down gracefully; it is always written out.
    """

    leader: NodeId | None = None
    term: Term
    sent_at: WallTime

    def to_payload(self) -> bytes:
        return self.model_dump_json().encode()


class Command(Message):
    """A request to one node: hand leadership over (optionally to a named node); take leadership back from
    worse nodes again after a step-down (``resume``); or switch its maintenance mode (``on``), in which it
    refuses leadership.

    A command from hasync's own tools is signed by the node whose configuration the tool ran with
    (``by``), and stamped with its wall clock (``sent_at``: a signed command is accepted only close to
    the receiver's clock, and once). Home Assistant's buttons cannot sign: the broker's ACL authorises
    them."""

    command: Literal["step_down", "resume", "maintenance"]
    successor: NodeId | None = None
    on: bool | None = None
    by: NodeId | None = None
    sent_at: WallTime | None = None
    sig: Signature | None = None  # by ``by``

    @model_validator(mode="after")
    def _shape(self) -> Command:
        if self.command == "maintenance" and self.on is None:
            raise ValueError("a maintenance command says on: true or false")
        if self.command != "maintenance" and self.on is not None:
            raise ValueError("only a maintenance command takes 'on'")
        if self.command != "step_down" and self.successor is not None:
            raise ValueError("only a step_down command names a successor")
        if self.sig is not None and (self.by is None or self.sent_at is None):
            raise ValueError("a signed command names its signer (by) and its time (sent_at)")
        return self


class DropReason(enum.StrEnum):
    """Why a message was dropped (the ``reason`` label of ``hasync_messages_dropped_total``)."""

    INVALID = "invalid"
    OVERSIZED = "oversized"
    WRONG_VERSION = "wrong_version"
    NODE_MISMATCH = "node_mismatch"
    ENTITY_MISMATCH = "entity_mismatch"
    RETAINED_COMMAND = "retained_command"
    FAILED = "failed"  # valid, but handling it raised: a bug, logged with its traceback
    # Signatures (hasync.signing), when the cluster has keys:
    UNSIGNED = "unsigned"
    UNKNOWN_SIGNER = "unknown_signer"
    BAD_SIGNATURE = "bad_signature"
    STALE_COMMAND = "stale_command"  # a signed command outside the time window, or seen before


class MessageError(ValueError):
    """A payload that is not a valid message; ``reason`` is its label for metrics."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


M = TypeVar("M", bound="Message")


def parse(model: type[M], payload: bytes) -> M:
    """Validate a payload as ``model``; raise MessageError with a metrics label otherwise."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(DropReason.OVERSIZED, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        errors = exc.errors()
        if any(err["loc"] == ("v",) for err in errors):
            raise MessageError(DropReason.WRONG_VERSION, str(errors[0].get("input"))) from exc
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MessageError(DropReason.INVALID, f"{where}: {first['msg']}") from exc
