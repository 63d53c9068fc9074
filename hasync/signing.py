"""Signed control messages: one Ed25519 key per node, over the exact bytes that go on the wire.

Any client that may write the cluster's topics could otherwise speak for any node: publish the
primary's Last Will, or a release of its term naming a successor, and have that successor take over
while the real primary still acts. With signing, every record that can move leadership (lease records,
heartbeats and wills, commands from hasync's own tools) carries a signature by the node it speaks for,
and a node drops what does not verify against that node's public key in its configuration. One
compromised node can then speak only for itself.

Format (docs/protocol.md, "Signed messages")
--------------------------------------------
A signed message is the unsigned message's JSON with one more member, last: ``"sig"``, the Ed25519
signature as unpadded base64url (86 characters). The signature covers::

    b"hasync-sig-1\\n" + topic + b"\\n" + body

where ``body`` is the payload with that last member removed (``payload[:-96] + b"}"``). Binding the
topic means a node's heartbeat cannot be replayed as another's, nor a command to one node sent to
another. Nothing is re-serialised to verify: the bytes signed are the bytes sent, so another
implementation needs no canonical JSON. A replayed signed message is judged like any
other: lease records by term and sequence (a replay is stale), wills by incarnation and connection (an
old connection's will is ignored); a replayed heartbeat only repeats what its node said before, and the
election gives a peer's heartbeat no power over the current term unless its view has reached it.
Signed commands carry the sender's wall clock and are accepted within ``COMMAND_WINDOW`` of the
receiver's, each signature once.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .messages import DropReason, Message

DOMAIN = b"hasync-sig-1\n"
SIG_CHARS = 86  # unpadded base64url of 64 bytes
_PREFIX = b',"sig":"'
_SUFFIX_LEN = len(_PREFIX) + SIG_CHARS + len(b'"}')
COMMAND_WINDOW = 60.0  # seconds either side of the receiver's wall clock
# An Ed25519 private key in PKCS#8 (RFC 8410) is this DER prefix and the 32-byte seed; the version-2 form
# (OneAsymmetricKey) adds the public key after it.
_PKCS8_V1 = bytes.fromhex("302e020100300506032b657004220420")
_PKCS8_V2 = bytes.fromhex("3053020101300506032b657004220420")
_PKCS8_V2_PUBLIC = bytes.fromhex("812100")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END \1-----")


class SigningError(ValueError):
    """A key that cannot be read or used; the message is one line for the user."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PublicKey:
    """An Ed25519 public key (PyNaCl, imported only by a node that has keys: libsodium is small)."""

    def __init__(self, raw: bytes) -> None:
        from nacl.signing import VerifyKey

        if len(raw) != 32:
            raise SigningError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
        self.raw = raw
        self._key = VerifyKey(raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        from nacl.exceptions import BadSignatureError

        try:
            self._key.verify(data, signature)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True


class PrivateKey:
    """An Ed25519 private key: its 32-byte seed."""

    def __init__(self, seed: bytes) -> None:
        from nacl.signing import SigningKey

        self._key = SigningKey(seed)
        self._public = PublicKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(os.urandom(32))

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data).signature

    def pem(self) -> bytes:
        """PKCS#8 PEM, as ``openssl genpkey -algorithm ed25519`` writes it."""
        der = base64.b64encode(_PKCS8_V1 + bytes(self._key)).decode()
        return f"-----BEGIN PRIVATE KEY-----\n{der}\n-----END PRIVATE KEY-----\n".encode()


def public_key_text(key: PublicKey) -> str:
    """A public key as it is written in the configuration: the 32 raw bytes, unpadded base64url."""
    return _b64(key.raw)


def parse_public_key(text: str) -> PublicKey:
    try:
        raw = _unb64(text.strip())
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"not base64: {exc}") from None
    return PublicKey(raw)


def generate(path: Path) -> PrivateKey:
    """Write a new private key to ``path`` (PEM, PKCS#8, mode 0600; never overwrites)."""
    key = PrivateKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} exists; not overwriting a key") from None
    except OSError as exc:
        raise SigningError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key.pem())
    return key


def load_private_key(path: Path) -> PrivateKey:
    """A private key from a PEM file (``hasync keygen``, or ``openssl genpkey -algorithm ed25519``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the private key {path}: {exc.strerror}") from None
    found = _PEM.search(data)
    if found is None or found.group(1) not in (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"):
        kind = f" (it holds a {found.group(1).decode().lower()})" if found else ""
        raise SigningError(f"{path} is not an unencrypted PEM private key{kind}")
    try:
        der = base64.b64decode(b"".join(found.group(2).split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if len(der) == 48 and der.startswith(_PKCS8_V1):
        return PrivateKey(der[16:])
    if len(der) == 83 and der.startswith(_PKCS8_V2) and der[48:51] == _PKCS8_V2_PUBLIC:
        key = PrivateKey(der[16:48])
        if key.public_key().raw != der[51:]:
            raise SigningError(f"{path}: the public key in the file does not belong to its private key")
        return key
    raise SigningError(f"{path} holds a private key, not an Ed25519 key (hasync keygen makes one)")


def signed_bytes(topic: str, body: bytes) -> bytes:
    return DOMAIN + topic.encode() + b"\n" + body


class Signer:
    """Signs this node's messages."""

    def __init__(self, node_id: str, key: PrivateKey) -> None:
        self.node_id = node_id
        self.key = key

    @property
    def public_key(self) -> str:
        return public_key_text(self.key.public_key())

    def sign(self, topic: str, body: bytes) -> bytes:
        """``body`` (a JSON object without ``sig``) with its signature appended as the last member."""
        if not body.endswith(b"}") or body == b"{}":
            raise ValueError("not a JSON object with members")
        sig = _b64(self.key.sign(signed_bytes(topic, body)))
        return body[:-1] + _PREFIX + sig.encode() + b'"}'


def sealer(signer: Signer | None) -> Callable[[str, Message], bytes]:
    """How a node encodes the messages it publishes on a topic: signed when it has a key."""
    if signer is None:
        return lambda topic, message: message.to_payload()
    return lambda topic, message: signer.sign(topic, message.to_payload())


def load(node_id: str, private_key: Path, public_keys: Mapping[str, str], *,
         required: bool = True) -> tuple[Signer, Keyring]:
    """This node's signer and the cluster's keyring, checked against each other (``SigningError``)."""
    signer = Signer(node_id, load_private_key(private_key))
    keyring = Keyring.from_texts(public_keys, required=required)
    listed = keyring.keys.get(node_id)
    if listed is None or listed != signer.key.public_key():
        raise SigningError(f"the private key {private_key} does not match public_keys.{node_id} "
                           f"(its public key is {signer.public_key})")
    return signer, keyring


@dataclass(frozen=True)
class Keyring:
    """The cluster's public keys, by node id. ``required``: unsigned messages are dropped (otherwise they
    are accepted, and signed ones still verified: for a rolling change to signing)."""

    keys: Mapping[str, PublicKey]
    required: bool = True

    @classmethod
    def from_texts(cls, keys: Mapping[str, str], *, required: bool = True) -> Keyring:
        parsed = {}
        for node, text in keys.items():
            try:
                parsed[node] = parse_public_key(text)
            except SigningError as exc:
                raise SigningError(f"public key of {node}: {exc}") from None
        return cls(parsed, required)

    def check(self, topic: str, payload: bytes, signer: str, sig: str | None) -> DropReason | None:
        """None if ``payload`` (already parsed, with ``sig`` its parsed signature) may be accepted as
        ``signer``'s; otherwise why not."""
        if sig is None:
            return DropReason.UNSIGNED if self.required else None
        key = self.keys.get(signer)
        if key is None:
            return DropReason.UNKNOWN_SIGNER
        # The parsed "sig" must be the payload's last member, exactly as written: what is signed is
        # everything before it.
        suffix = _PREFIX + sig.encode() + b'"}'
        if len(sig) != SIG_CHARS or not payload.endswith(suffix):
            return DropReason.BAD_SIGNATURE
        body = payload[:-_SUFFIX_LEN] + b"}"
        try:
            raw = _unb64(sig)
        except (binascii.Error, ValueError):
            return DropReason.BAD_SIGNATURE
        # One spelling per signature: 86 characters carry 516 bits for 512, and a decoder ignores the last
        # two (and skips characters outside the alphabet). Another spelling of a valid signature would pass
        # the check and look new to SeenSignatures: a replayed command.
        if _b64(raw) != sig:
            return DropReason.BAD_SIGNATURE
        return None if key.verify(raw, signed_bytes(topic, body)) else DropReason.BAD_SIGNATURE


class SeenSignatures:
    """Signatures of commands accepted recently: each is accepted once (bounded)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first_time(self, sig: str) -> bool:
        if sig in self._seen:
            return False
        self._seen[sig] = None
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return True
