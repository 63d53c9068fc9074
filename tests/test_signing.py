"""Signed control messages (hasync.signing) and their checks in the router: unit and property tests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.sim import heartbeat, release, renew
from hasync import signing
from hasync.inbound import Router, ToElection
from hasync.messages import Command, DropReason, MessageError
from hasync.signing import Keyring, Signer, SigningError
from hasync.topics import Topics
from hasync.transport import Incoming

T = Topics("hasync", "home")


def make_signer(node: str, tmp_path: Path) -> Signer:
    return Signer(node, signing.generate(tmp_path / f"{node}.key"))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Signer, Keyring]:
    a, b = make_signer("a", tmp_path), make_signer("b", tmp_path)
    return a, b, Keyring.from_texts({"a": a.public_key, "b": b.public_key})


def test_a_signed_message_verifies_as_its_signers_and_nobody_elses(keys: tuple[Signer, Signer, Keyring]) -> None:
    a, _, ring = keys
    payload = a.sign(T.heartbeat("a"), heartbeat("a").to_payload())
    sig = json.loads(payload)["sig"]
    assert len(sig) == signing.SIG_CHARS
    assert ring.check(T.heartbeat("a"), payload, "a", sig) is None
    assert ring.check(T.heartbeat("a"), payload, "b", sig) is DropReason.BAD_SIGNATURE  # a's key is not b's
    assert ring.check(T.heartbeat("b"), payload, "a", sig) is DropReason.BAD_SIGNATURE  # bound to its topic
    assert ring.check(T.heartbeat("a"), payload, "c", sig) is DropReason.UNKNOWN_SIGNER
    assert ring.check(T.heartbeat("a"), heartbeat("a").to_payload(), "a", None) is DropReason.UNSIGNED
    lax = Keyring(ring.keys, required=False)
    assert lax.check(T.heartbeat("a"), heartbeat("a").to_payload(), "a", None) is None
    assert lax.check(T.heartbeat("b"), payload, "a", sig) is DropReason.BAD_SIGNATURE  # signed: still verified


def test_the_signature_must_be_the_last_member_exactly_as_written(keys: tuple[Signer, Signer, Keyring]) -> None:
    a, _, ring = keys
    payload = a.sign(T.lease, renew("a", 1, 1).to_payload())
    sig = json.loads(payload)["sig"]
    moved = json.dumps({"sig": sig, **{k: v for k, v in json.loads(payload).items() if k != "sig"}}).encode()
    assert ring.check(T.lease, moved, "a", sig) is DropReason.BAD_SIGNATURE
    spaced = payload[:-2] + b' "}'
    assert ring.check(T.lease, spaced, "a", sig) is DropReason.BAD_SIGNATURE


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(0, 7))
def test_no_single_bit_flip_of_a_signed_record_verifies(position: int, bit: int) -> None:
    payload = SIGNER.sign(T.lease, release("a", 7, 3, successor="b").to_payload())
    flipped = bytearray(payload)
    flipped[position % len(payload)] ^= 1 << bit
    try:
        sig = json.loads(bytes(flipped))["sig"]
    except (ValueError, KeyError, TypeError):
        return  # no longer a message at all: the parser drops it
    assert RING.check(T.lease, bytes(flipped), "a", sig) is not None


def test_keys_are_created_private_never_overwritten_and_checked_on_load(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = signing.generate(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(SigningError, match="exists"):
        signing.generate(path)
    assert signing.load_private_key(path).public_key() == key.public_key()
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        signing.load_private_key(tmp_path / "junk.key")
    with pytest.raises(SigningError, match="cannot read"):
        signing.load_private_key(tmp_path / "missing.key")
    other = Signer("b", signing.generate(tmp_path / "b.key")).public_key
    with pytest.raises(SigningError, match=r"does not match public_keys\.a"):
        signing.load("a", path, {"a": other})
    signer, ring = signing.load("a", path, {"a": signing.public_key_text(key.public_key()), "b": other})
    assert signer.node_id == "a" and set(ring.keys) == {"a", "b"}
    with pytest.raises(SigningError, match="public key of b"):
        Keyring.from_texts({"b": "AAAA"})


def test_openssl_keys_ed25519_loads_and_others_are_refused_by_name(tmp_path: Path) -> None:
    def openssl(*args: str) -> Path:
        path = tmp_path / f"{args[-1]}.key"
        subprocess.run(["openssl", "genpkey", *args, "-out", str(path)], check=True, capture_output=True)
        return path

    ed = openssl("-algorithm", "ed25519")
    public = subprocess.run(["openssl", "pkey", "-in", str(ed), "-pubout", "-outform", "DER"], check=True,
                            capture_output=True).stdout
    assert signing.load_private_key(ed).public_key().raw == public[-32:]  # the same key as OpenSSL's
    ours = signing.generate(tmp_path / "ours.key")  # and OpenSSL reads ours
    public = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "ours.key"), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    assert ours.public_key().raw == public[-32:]
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        signing.load_private_key(openssl("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"))
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        signing.load_private_key(openssl("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"))
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(ed), "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
                   check=True, capture_output=True)
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        signing.load_private_key(encrypted)


# ---- the router -----------------------------------------------------------------------------------


def route(router: Router, topic: str, payload: bytes, *, retain: bool = False) -> ToElection:
    routed = router.route(Incoming(topic, payload, retain))
    assert isinstance(routed, ToElection)
    return routed


def reason(router: Router, topic: str, payload: bytes) -> DropReason:
    with pytest.raises(MessageError) as caught:
        router.route(Incoming(topic, payload, False))
    return caught.value.reason


def test_the_router_accepts_only_what_the_node_it_speaks_for_signed(keys: tuple[Signer, Signer, Keyring]) -> None:
    a, b, ring = keys
    router = Router(T, "a", keyring=ring)
    route(router, T.lease, b.sign(T.lease, renew("b", 1, 1).to_payload()))
    route(router, T.heartbeat("b"), b.sign(T.heartbeat("b"), heartbeat("b").to_payload()))
    # b cannot speak for a: not a renewal, nor a will, nor a release naming itself
    assert reason(router, T.lease, b.sign(T.lease, renew("a", 1, 2).to_payload())) is DropReason.BAD_SIGNATURE
    will = heartbeat("a", online=False).to_payload()
    assert reason(router, T.heartbeat("a"), b.sign(T.heartbeat("a"), will)) is DropReason.BAD_SIGNATURE
    assert reason(router, T.heartbeat("a"), will) is DropReason.UNSIGNED
    forged = release("a", 1, 3, successor="b").to_payload()
    assert reason(router, T.lease, forged) is DropReason.UNSIGNED
    # a's own heartbeat replayed on b's topic is b's topic's mismatch, signed or not
    assert reason(router, T.heartbeat("b"), a.sign(T.heartbeat("b"), heartbeat("a").to_payload())) is (
        DropReason.NODE_MISMATCH)


def test_commands_signed_recent_and_new_or_unsigned_if_allowed(keys: tuple[Signer, Signer, Keyring]) -> None:
    _, b, ring = keys
    now = 1_800_000_000.0
    router = Router(T, "a", keyring=ring, wall=lambda: now)
    topic = T.command("a")

    def signed(by: Signer, sent_at: float, **fields: object) -> bytes:
        command = Command.model_validate({"command": "step_down", "by": by.node_id, "sent_at": sent_at, **fields})
        return by.sign(topic, command.to_payload())

    fresh = signed(b, now - 5)
    assert route(router, topic, fresh).command is not None
    assert reason(router, topic, fresh) is DropReason.STALE_COMMAND  # a replay
    assert reason(router, topic, signed(b, now - 120)) is DropReason.STALE_COMMAND
    assert reason(router, topic, signed(b, now + 120)) is DropReason.STALE_COMMAND
    spoofed = Command(command="step_down", by="a", sent_at=now).to_payload()
    assert reason(router, topic, b.sign(topic, spoofed)) is DropReason.BAD_SIGNATURE
    assert reason(router, T.command("a"), b.sign(T.command("b"), Command(
        command="resume", by="b", sent_at=now).to_payload())) is DropReason.BAD_SIGNATURE  # sent to b, not a
    unsigned = Command(command="step_down").to_payload()  # Home Assistant's button
    route(router, topic, unsigned)
    strict = Router(T, "a", keyring=ring, wall=lambda: now, unsigned_commands=False)
    assert reason(strict, topic, unsigned) is DropReason.UNSIGNED
    with pytest.raises(MessageError, match="names its signer"):
        route(router, topic, b.sign(topic, Command(command="step_down").to_payload()))


def test_without_a_keyring_signatures_are_neither_needed_nor_checked(keys: tuple[Signer, Signer, Keyring]) -> None:
    _, b, _ = keys
    router = Router(T, "a")
    route(router, T.lease, renew("b", 1, 1).to_payload())
    route(router, T.lease, b.sign(T.lease, renew("a", 1, 1).to_payload()))  # even a wrong one: unauthenticated


def _module_keys() -> tuple[Signer, Keyring]:
    signer = Signer("a", signing.PrivateKey.generate())
    return signer, Keyring.from_texts({"a": signer.public_key})


SIGNER, RING = _module_keys()


@settings(max_examples=500, deadline=None)
@given(
    topic=st.sampled_from([T.lease, T.heartbeat("a"), T.heartbeat("b"), T.command("a"), T.command("b")]),
    payload=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda body, sig: body + b',"sig":"' + sig.encode() + b'"}', st.binary(max_size=200),
                  st.from_regex(r"[A-Za-z0-9_-]{86}", fullmatch=True)),
        st.builds(lambda sig: renew("a", 1, 1).to_payload()[:-1] + b',"sig":"' + sig.encode() + b'"}',
                  st.text(max_size=100)),
    ),
)
def test_whatever_arrives_the_router_with_keys_routes_or_drops_with_a_reason(topic: str, payload: bytes) -> None:
    router = Router(T, "a", keyring=RING, wall=lambda: 1_800_000_000.0)
    try:
        router.route(Incoming(topic, payload, False))
    except MessageError as exc:
        assert isinstance(exc.reason, DropReason)


def test_a_signature_has_one_spelling(keys: tuple[Signer, Signer, Keyring]) -> None:
    """The last base64 character carries two unused bits: changing them, or adding characters a decoder
    skips, keeps the signature's bytes. Accepting such a spelling would let a replayed command look new."""
    _, b, ring = keys
    payload = b.sign(T.lease, renew("b", 1, 1).to_payload())
    sig = json.loads(payload)["sig"]
    assert ring.check(T.lease, payload, "b", sig) is None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    for low in range(4):
        respelled = sig[:-1] + alphabet[(last & ~3) | low]
        if respelled == sig:
            continue
        forged = payload.replace(sig.encode(), respelled.encode())
        assert ring.check(T.lease, forged, "b", respelled) is DropReason.BAD_SIGNATURE
