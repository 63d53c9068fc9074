"""Agent configuration: a YAML file, overridden by ``HASYNC_*`` environment variables, then by flags.

``load_config`` returns a validated ``AgentConfig`` or raises ``ConfigError`` whose message names each
offending key and what is wrong with it. The models here import no I/O module: the health checks and
hooks that read their sections (``hasync.health``, ``hasync.hooks``) import them from here.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .election import Timing
from .sync.selection import DEFAULT_DOMAINS, Selector, ThrottleRule
from .topics import ENTITY_ID, validate_prefix, validate_segment

# Where the agent and the command line look for their configuration when none is given.
DEFAULT_CONFIG_PATH = Path("/etc/hasync/hasync.yaml")

# How late the kernel may remove an address whose lifetime ran out (hasync.vip, "Lifetimes"): up to 0.25 s
# (its check is rounded up to a whole second when that is near), up to 1 s when another address of the
# network namespace changed in the second before (measured: 0.93 s), plus the timer's granularity and the
# scheduling of its worker.
ADDRESS_LIFETIME_LAG = 1.25  # s


class ConfigError(Exception):
    """The configuration is invalid; the message lists ``key: problem`` lines."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerConfig(_Model):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    keepalive: Annotated[int, Field(ge=2, le=600)] = 5
    connect_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    reconnect_min: Annotated[float, Field(gt=0, le=60)] = 0.2
    reconnect_max: Annotated[float, Field(gt=0, le=600)] = 10.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"scheme must be mqtt:// or mqtts://, not {parts.scheme or 'missing'!r}")
        if not parts.hostname:
            raise ValueError("the URL names no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from exc
        if port == 0:
            raise ValueError("port 0 is not a broker port")
        if parts.path not in ("", "/"):
            raise ValueError("the URL takes no path")
        return value

    @model_validator(mode="after")
    def _files(self) -> BrokerConfig:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: {path} is not a readable file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None
        return host

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password: explicit settings win over ones embedded in the URL."""
        parts = urlsplit(self.url)
        user = self.username or (unquote(parts.username) if parts.username else None)
        password = self.password or (unquote(parts.password) if parts.password else None)
        return user, password

    def redacted_url(self) -> str:
        """The URL without credentials, for logs."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        if parts.port is None:
            host = f"{host}:{self.port}"
        return f"{parts.scheme}://{host}"


_CHECK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # Linux: IFNAMSIZ - 1 bytes, no '/' nor spaces
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class _CheckBase(BaseModel):
    """What every check has. ``weight`` 0 gates eligibility (a failing check makes the node not eligible);
    otherwise, like keepalived's, it moves the node's priority: a negative weight is added while the check
    fails, a positive one while it passes. ``when: primary`` runs the check only on the primary (is the
    service it started answering?): failing, the primary runs its fault hook and hands over."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    weight: Annotated[int, Field(ge=-1000, le=1000)] = 0
    when: Literal["always", "primary"] = "always"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CHECK_NAME.fullmatch(value):
            raise ValueError(
                f"check name {value!r} must be 1-64 characters of A-Z, a-z, 0-9, '_', '.' or '-'"
            )
        return value

    @field_validator("interval", "timeout")
    @classmethod
    def _positive_seconds(cls, value: float, info: ValidationInfo) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{info.field_name} must be a finite number of seconds > 0, got {value}")
        return value

    @field_validator("rise", "fall")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1 (consecutive results), got {value}")
        return value

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> Self:
        if self.timeout > self.interval:
            raise ValueError(
                f"check {self.name!r}: timeout ({self.timeout:g}s) must not exceed interval "
                f"({self.interval:g}s), so one run finishes before the next starts"
            )
        if self.when == "primary" and self.weight != 0:
            raise ValueError(f"check {self.name!r}: a check that runs only on the primary hands over when it "
                             "fails; it cannot have a weight")
        return self


class CommandCheck(_CheckBase):
    """Run ``command`` with ``/bin/sh -c``; exit status 0 is success."""

    type: Literal["command"]
    command: str

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("command must not be empty")
        return value


class HttpCheck(_CheckBase):
    """GET ``url`` (redirects are not followed); success is a 2xx status, or one of ``expect_status``."""

    type: Literal["http"]
    url: str
    expect_status: list[int] | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// URL with a host, got {value!r}")
        return value

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("expect_status must list at least one status (omit it to accept any 2xx)")
        bad = [status for status in value if not 100 <= status <= 599]
        if bad:
            raise ValueError(f"expect_status must hold HTTP statuses 100-599, got {bad}")
        return value


class TcpCheck(_CheckBase):
    """Connect to ``host``:``port``; success is an accepted connection within the timeout."""

    type: Literal["tcp"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"host must be a host name or an address, got {value!r}")
        return value


class DnsCheck(_CheckBase):
    """Ask ``server`` (an address) for ``query``'s ``record`` over UDP; success is an answer without error
    that holds a record of that type (and, with ``expect``, one of those addresses)."""

    type: Literal["dns"]
    server: str
    port: Annotated[int, Field(ge=1, le=65535)] = 53
    query: str
    record: Literal["A", "AAAA"] = "A"
    expect: list[str] | None = None

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"server must be an IP address (a name would need the DNS it checks), got {value!r}")\
                from None
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        labels = value.rstrip(".").split(".")
        if len(value) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"query must be a DNS name (labels of 1-63 letters, digits, '-' or '_'), got {value!r}")
        return value

    @model_validator(mode="after")
    def _expected_addresses(self) -> Self:
        for address in self.expect or []:
            try:
                version = ipaddress.ip_address(address).version
            except ValueError:
                raise ValueError(f"expect must list IP addresses, got {address!r}") from None
            if version != (4 if self.record == "A" else 6):
                raise ValueError(f"expect: {address} is not an answer to a {self.record} query")
        return self


class InterfaceCheck(_CheckBase):
    """The network interface is up with a carrier (keepalived's ``track_interface``)."""

    type: Literal["interface"]
    interface: str

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str) -> str:
        if not _IFNAME.fullmatch(value):
            raise ValueError(f"interface must be an interface name (1-15 characters, no '/' or spaces), "
                             f"got {value!r}")
        return value


HealthCheckConfig = Annotated[CommandCheck | HttpCheck | TcpCheck | DnsCheck | InterfaceCheck,
                              Field(discriminator="type")]



class HookEvent(enum.StrEnum):
    """A role change that runs a hook (keepalived's notify_master / notify_backup / notify_fault)."""

    PROMOTE = "promote"
    DEMOTE = "demote"
    FAULT = "fault"


class BrokerLoss(enum.StrEnum):
    """What a resource of the primary (a floating IP, the role hooks) does when the primary loses the broker
    (``hasync.kept``)."""

    FENCED = "fenced"  # released at the renew deadline, with the lease
    KEPT = "kept"  # held through the outage while no other node may be primary


class HooksConfig(BaseModel):
    """Shell commands to run on role changes; None disables a hook. ``on_broker_loss: kept``: a primary that
    loses the broker does not run its demote hook until the kept resources are released (``hasync.kept``).
    ``on_promote_failure: handover``: a promote hook that fails makes the primary step down. ``fence``: run by
    the guardian (``hasync.guardian``), not the agent, when the agent dies as primary (kill -9, a crash) or
    stalls past its deadline (SIGSTOP, starved: fenced hooks only), to stop what the promote hook started
    before another node starts its own; ``HASYNC_EVENT=fence``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    promote: str | None = None
    demote: str | None = None
    fault: str | None = None
    fence: str | None = None
    timeout: float = 30.0
    on_broker_loss: BrokerLoss = BrokerLoss.FENCED
    on_promote_failure: Literal["stay", "handover"] = "stay"

    @field_validator("promote", "demote", "fault", "fence")
    @classmethod
    def _command(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"the {info.field_name} hook is empty; leave it out (or null) to disable it")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"hook timeout must be a finite number of seconds > 0, got {value}")
        return value

    def command(self, event: HookEvent) -> str | None:
        command: str | None = getattr(self, event.value)
        return command


_DEFAULT_TIMING = Timing()

# Timing profiles (``election.profile``): values for the keys a config leaves out; keys it sets win. ``fast``
# replaces a hung or cut-off primary in about a second (a lease of 0.85 s) at the cost of about four times the
# election's messages, and a primary that demotes itself if its event loop stalls for about 0.6 s
# (README, "Timing profiles"). It asks the broker for the shortest keepalive too: a cut-off agent notices a
# dead connection, and the broker sends its will, sooner. (Failover itself comes from the lease, not the will.)
PROFILES: dict[str, dict[str, float]] = {
    "default": {},
    "fast": {"lease_duration": 0.85, "renew_deadline": 0.7, "renew_interval": 0.1, "heartbeat_interval": 0.3,
             "claim_stagger": 0.05},
}
PROFILE_KEEPALIVE: dict[str, int] = {"fast": 2}
Profile = Literal["default", "fast"]


class ElectionConfig(_Model):
    """Seconds. The relations are what the safety argument needs (see hasync.election). ``profile`` presets the
    timings a config leaves out (``PROFILES``)."""

    profile: Profile = "default"
    # The defaults are the election's own (hasync.election.Timing): one source of truth.
    lease_duration: Annotated[float, Field(gt=0, le=600)] = _DEFAULT_TIMING.lease_duration
    renew_deadline: Annotated[float, Field(gt=0, le=600)] = _DEFAULT_TIMING.renew_deadline
    renew_interval: Annotated[float, Field(gt=0, le=60)] = _DEFAULT_TIMING.renew_interval
    heartbeat_interval: Annotated[float, Field(gt=0, le=60)] = _DEFAULT_TIMING.heartbeat_interval
    claim_stagger: Annotated[float, Field(ge=0, le=10)] = _DEFAULT_TIMING.claim_stagger
    preempt_delay: Annotated[float, Field(ge=0, le=3600)] = _DEFAULT_TIMING.preempt_delay
    will_fast_path: bool = _DEFAULT_TIMING.will_fast_path
    release_fast_path: bool = _DEFAULT_TIMING.release_fast_path
    flap_damping: bool = _DEFAULT_TIMING.flap_damping
    damping_hold: Annotated[float, Field(ge=0, le=86400)] = _DEFAULT_TIMING.damping_hold
    damping_max: Annotated[float, Field(ge=0, le=86400)] = _DEFAULT_TIMING.damping_max
    damping_half_life: Annotated[float, Field(gt=0, le=86400)] = _DEFAULT_TIMING.damping_half_life
    damping_max_rtt: Annotated[float, Field(gt=0, le=60)] = _DEFAULT_TIMING.damping_max_rtt

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("profile"), str):
            return {**PROFILES.get(data["profile"], {}), **data}  # an unknown name fails on the field itself
        return data

    @model_validator(mode="after")
    def _relations(self) -> ElectionConfig:
        if not self.renew_interval < self.renew_deadline:
            raise ValueError(
                f"renew_interval ({self.renew_interval}) must be shorter than renew_deadline "
                f"({self.renew_deadline}), or one late renewal demotes the primary"
            )
        if not (self.renew_deadline * 1.2 <= self.lease_duration and self.renew_deadline < self.lease_duration):
            raise ValueError(
                f"lease_duration ({self.lease_duration}) must be at least 1.2 x renew_deadline "
                f"({self.renew_deadline}): the primary must stop before anyone else may start"
            )
        if not self.heartbeat_interval <= self.lease_duration / 2:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be at most half of "
                f"lease_duration ({self.lease_duration})"
            )
        if self.damping_hold > self.damping_max:
            raise ValueError(f"damping_hold ({self.damping_hold}) must not exceed damping_max ({self.damping_max})")
        return self

    def timing(self) -> Timing:
        return Timing(**self.model_dump(exclude={"profile"}))


def earliest_takeover(election: ElectionConfig, broker: BrokerConfig) -> float:
    """Seconds from the sending of a primary's newest renewal until another node can at the earliest be elected
    without its release, should it freeze or vanish: a lease of silence, or (with the will fast path) its
    Last Will, which the broker publishes 1.5 keepalives after the primary's last packet."""
    will = 1.5 * broker.keepalive if election.will_fast_path else math.inf
    return min(election.lease_duration, will)


def _web_url(value: str, schemes: tuple[str, ...], what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{value!r} is not an {' or '.join(f'{s}://' for s in schemes)} URL of {what}")
    return value


class HomeAssistantConfig(_Model):
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    url: str | None = None
    token: str | None = None
    # Where HA's WebSocket API is, when not at {url}/api/websocket: under the Supervisor (an add-on) it is
    # http://supervisor/core/websocket.
    websocket_url: str | None = None
    managed_automations: bool = False
    run_everywhere: list[str] = Field(default_factory=list)

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return validate_prefix(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _web_url(value, ("http", "https"), "Home Assistant").rstrip("/")

    @field_validator("websocket_url")
    @classmethod
    def _websocket_url(cls, value: str | None) -> str | None:
        return None if value is None else _web_url(value, ("http", "https", "ws", "wss"),
                                                   "Home Assistant's WebSocket API")

    @field_validator("run_everywhere")
    @classmethod
    def _automations(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not re.fullmatch(r"automation\.[a-z0-9_]+", v)]
        if bad:
            raise ValueError(f"not automation entity ids: {', '.join(bad)} (expected e.g. automation.water_flowers)")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> HomeAssistantConfig:
        if (self.url is None) != (self.token is None):
            raise ValueError("url and token go together: the agent needs both to reach Home Assistant")
        if self.managed_automations and self.url is None:
            raise ValueError("managed_automations needs url and token")
        return self


_FILTER_SHAPES = {  # field: (pattern, what it holds, an example)
    "domains": (re.compile(r"[a-z0-9_]+"), "domains", "input_boolean"),
    "entities": (ENTITY_ID, "entity ids", "input_boolean.guest_mode"),
    "entity_globs": (re.compile(r"[a-z0-9_.*?\[\]!-]+"), "entity globs", "sensor.*_temperature"),
}


class SyncFilter(_Model):
    domains: list[str] = Field(default_factory=list)
    entities: list[str] = Field(default_factory=list)
    entity_globs: list[str] = Field(default_factory=list)

    @field_validator("domains", "entities", "entity_globs")
    @classmethod
    def _shapes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        pattern, what, example = _FILTER_SHAPES[info.field_name or ""]
        bad = [v for v in value if not pattern.fullmatch(v)]
        if bad:
            raise ValueError(f"not {what}: {', '.join(map(repr, bad))} (expected e.g. {example})")
        return value


class SyncInclude(SyncFilter):
    domains: list[str] = Field(default_factory=lambda: list(DEFAULT_DOMAINS))


class ThrottleConfig(_Model):
    entity_globs: Annotated[list[str], Field(min_length=1)]
    min_interval: Annotated[float, Field(ge=0, le=86400)] = 0.0
    deadband: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _something(self) -> ThrottleConfig:
        if self.min_interval == 0 and self.deadband == 0:
            raise ValueError("a throttle rule needs min_interval or deadband (or both) above 0")
        return self


class SyncConfig(_Model):
    """Entity state sync (hasync.sync). On by default wherever the agent has a Home Assistant to talk to.

    ``backend: memory`` keeps the entities in the agent's memory instead of Home Assistant, set through the
    HTTP API: for tests, demos and benchmarks, never for a home.
    """

    enabled: bool = True
    backend: Literal["homeassistant", "memory"] = "homeassistant"
    include: SyncInclude = SyncInclude()
    exclude: SyncFilter = SyncFilter()
    throttle: list[ThrottleConfig] = Field(default_factory=list)
    max_entities: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    max_clock_drift: Annotated[float, Field(ge=1, le=86400)] = 60.0
    reconcile_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    retry_interval: Annotated[float, Field(gt=0, le=3600)] = 10.0

    def selector(self) -> Selector:
        i, e = self.include, self.exclude
        return Selector(
            include_domains=frozenset(i.domains), include_entities=frozenset(i.entities),
            include_globs=tuple(i.entity_globs), exclude_domains=frozenset(e.domains),
            exclude_entities=frozenset(e.entities), exclude_globs=tuple(e.entity_globs),
        )

    def throttle_rules(self) -> list[ThrottleRule]:
        return [ThrottleRule(tuple(t.entity_globs), t.min_interval, t.deadband) for t in self.throttle]




class VipAddress(_Model):
    """One floating IP (``hasync.vip``): held by the primary only. ``address`` takes its prefix length, as
    ``ip addr add`` does: ``192.168.1.50/24``, ``fd00::50/64``."""

    address: str
    interface: str
    label: str | None = None  # IPv4 only: the kernel's label, "eth0" or "eth0:something"
    on_broker_loss: BrokerLoss = BrokerLoss.FENCED

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        text = value.strip()
        if "/" not in text:
            raise ValueError(f"{value!r} has no prefix length: write it as ip addr does, e.g. 192.168.1.50/24 "
                             "or fd00::50/64")
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address with a prefix length "
                             "(e.g. 192.168.1.50/24 or fd00::50/64)") from None
        ip, net = iface.ip, iface.network
        if ip.is_multicast or ip.is_loopback or ip.is_unspecified or ip.is_link_local:
            raise ValueError(f"{value!r} is a multicast, loopback, link-local or unspecified address, "
                             "not one a LAN's clients can be sent to")
        if ip.version == 4 and net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"{value!r} is the network's {'network' if ip == net.network_address else 'broadcast'}"
                             " address, not a host's")
        return str(iface)

    @field_validator("interface")
    @classmethod
    def _interface(cls, value: str) -> str:
        if not _IFNAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a network interface name (1-15 of A-Z a-z 0-9 _ . : @ -)")
        return value

    @model_validator(mode="after")
    def _label(self) -> Self:
        if self.label is None:
            return self
        if self.ip.version == 6:
            raise ValueError(f"{self.address}: labels are for IPv4 addresses only (the kernel has none for IPv6)")
        if len(self.label) > 15 or not (self.label == self.interface or self.label.startswith(f"{self.interface}:")):
            raise ValueError(f"label {self.label!r} must be the interface's name, or it followed by ':' (e.g. "
                             f"{self.interface}:ha), 15 characters at most")
        return self

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_interface(self.address).ip

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_interface(self.address).network.prefixlen

    @property
    def ip_interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.address)


class FederationRules(_Model):
    domains: list[str] = Field(default_factory=list)
    entities: list[str] = Field(default_factory=list)
    entity_globs: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)  # device ids or names, as the hub's HA shows them
    areas: list[str] = Field(default_factory=list)  # area ids or names


class FederationConfig(_Model):
    """This node's cluster is a hub: its Home Assistant's selected entities appear on a main instance
    (``hasync.federation``). Nothing is exported unless included."""

    include: FederationRules = FederationRules()
    exclude: FederationRules = FederationRules()
    # Seconds an entity no longer exported (removed, disabled, excluded) stays on main, unavailable, before its
    # config is cleared and main deletes it; one that comes back within it loses nothing on main. Longer than
    # a Home Assistant start may take to set up its integrations (HA's own bootstrap gives them up to 12 min).
    removal_grace: Annotated[float, Field(ge=0)] = 900.0
    # The discovery prefix main's MQTT integration reads; by default homeassistant.discovery_prefix. Set it
    # when the hub's own Home Assistant reads another prefix (so that it does not import the hub's exports).
    discovery_prefix: str | None = None

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return None if value is None else validate_prefix(value)


class HttpConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765


_PUBLIC_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=?$")  # 32 bytes, base64url (hasync.signing)


class SigningConfig(_Model):
    """Signed control messages (``hasync.signing``): this node's private key, every node's public key."""

    private_key: Path
    public_keys: dict[str, str]
    # False: accept unsigned messages too (verifying signed ones), while a cluster moves to signing.
    required: bool = True
    # Commands without a signature (Home Assistant's buttons), authorised by the broker's ACL.
    unsigned_commands: bool = True

    @model_validator(mode="after")
    def _keys(self) -> SigningConfig:
        if not self.private_key.is_file():
            raise ValueError(f"private_key: {self.private_key} is not a readable file (create it with hasync keygen)")
        for node, key in self.public_keys.items():
            validate_segment(node, "node id")
            if not _PUBLIC_KEY.match(key.strip()):
                raise ValueError(f"public_keys.{node}: not an Ed25519 public key as hasync keygen prints it")
        return self


class LogConfig(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64].strip("-")
    return name or "node"


class AgentConfig(_Model):
    node_id: str = Field(default_factory=default_node_id)
    cluster: str = "home"
    topic_prefix: str = "hasync"
    priority: Annotated[int, Field(ge=0, le=1000)] = 100
    preempt: bool = True
    maintenance: bool = False
    broker: BrokerConfig = BrokerConfig()
    election: ElectionConfig = ElectionConfig()
    health_checks: list[HealthCheckConfig] = Field(default_factory=list)
    hooks: HooksConfig = HooksConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    sync: SyncConfig = SyncConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    events_file: Path | None = None
    signing: SigningConfig | None = None
    federation: FederationConfig | None = None
    vip: list[VipAddress] = Field(default_factory=list)

    @property
    def takeover_after(self) -> float:
        """Seconds from the sending of the primary's newest renewal until another node can at the earliest
        hold its resources without its release (``earliest_takeover``)."""
        return earliest_takeover(self.election, self.broker)

    @property
    def keeps_resources(self) -> bool:
        """Whether any resource is kept through a broker outage (``on_broker_loss: kept``)."""
        return self.hooks.on_broker_loss is BrokerLoss.KEPT or any(
            v.on_broker_loss is BrokerLoss.KEPT for v in self.vip)

    @field_validator("node_id")
    @classmethod
    def _node(cls, value: str) -> str:
        return validate_segment(value, "node id")

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        return validate_segment(value, "cluster name")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return validate_prefix(value)

    @field_validator("vip")
    @classmethod
    def _unique_vips(cls, value: list[VipAddress]) -> list[VipAddress]:
        seen: dict[str, int] = {}
        for i, vip in enumerate(value):
            ip = str(vip.ip)
            if ip in seen:
                raise ValueError(f"{ip} is listed twice (entries {seen[ip]} and {i}): each floating IP once")
            seen[ip] = i
        return value

    @model_validator(mode="before")
    @classmethod
    def _profile_keepalive(cls, data: Any) -> Any:
        """The election profile's broker keepalive, unless the config sets one."""
        if not isinstance(data, Mapping):
            return data
        election = data.get("election")
        profile = election.get("profile") if isinstance(election, Mapping) else getattr(election, "profile", None)
        broker = data.get("broker", {})
        if not isinstance(profile, str) or profile not in PROFILE_KEEPALIVE or not isinstance(broker, Mapping) \
                or "keepalive" in broker:
            return data
        return {**data, "broker": {**broker, "keepalive": PROFILE_KEEPALIVE[profile]}}

    @field_validator("vip")
    @classmethod
    def _fenced_lifetime(cls, value: list[VipAddress], info: ValidationInfo) -> list[VipAddress]:
        # A fenced address lives a whole number of seconds from each renewal that came back, and the kernel may
        # remove it up to ADDRESS_LIFETIME_LAG late (hasync.vip, "Lifetimes"): a second must fit before anyone
        # else can be elected, even after a renewal that took a whole renew interval to come back.
        election, broker = info.data.get("election"), info.data.get("broker")
        if election is None or broker is None or all(v.on_broker_loss is BrokerLoss.KEPT for v in value):
            return value
        need = 1 + election.renew_interval + ADDRESS_LIFETIME_LAG
        if earliest_takeover(election, broker) < need:
            will = (f" and 1.5 x broker.keepalive ({1.5 * broker.keepalive:g} s)"
                    if election.will_fast_path else "")
            raise ValueError(
                f"a fenced floating IP needs election.lease_duration ({election.lease_duration:g} s){will} of at "
                f"least {need:g} s (1 s + renew_interval + {ADDRESS_LIFETIME_LAG:g} s): the kernel drops the address "
                "of a frozen agent after a lifetime of whole seconds, and must have before another node can be "
                "elected; lengthen them, or make the address on_broker_loss: kept")
        return value

    @model_validator(mode="after")
    def _will_after_deadline(self) -> AgentConfig:
        # Mosquitto publishes a silent client's will 1.5 x keepalive after its last packet; with the
        # will fast path on, that must be after the hung primary's renew deadline has passed.
        if self.election.will_fast_path and 1.5 * self.broker.keepalive < self.election.renew_deadline:
            raise ValueError(
                f"broker.keepalive ({self.broker.keepalive}) x 1.5 must be at least election.renew_deadline "
                f"({self.election.renew_deadline}) while election.will_fast_path is on: a hung primary's will "
                "must not arrive before it has stopped acting"
            )
        return self

    @model_validator(mode="after")
    def _sensor_expires_first(self) -> AgentConfig:
        # HA's expire_after is whole seconds and must be shorter than the renew deadline, so that HA
        # stops showing a hung primary as primary before another node can be elected.
        if self.homeassistant.discovery and self.election.renew_deadline <= 1:
            if self.election.profile != "default":
                raise ValueError(
                    f"election.profile {self.election.profile} (renew_deadline {self.election.renew_deadline} s) "
                    "needs homeassistant.discovery: false: the primary sensor's expire_after is whole seconds, too "
                    "coarse to stop showing a hung primary within a sub-second renew deadline")
            raise ValueError(
                f"election.renew_deadline ({self.election.renew_deadline}) must exceed 1 s while "
                "homeassistant.discovery is on: the primary sensor's expire_after (whole seconds) must be "
                "shorter than it"
            )
        return self

    @model_validator(mode="after")
    def _own_key_listed(self) -> AgentConfig:
        if self.signing is not None and self.node_id not in self.signing.public_keys:
            raise ValueError(f"signing.public_keys must list this node ({self.node_id}) too")
        return self

    @model_validator(mode="after")
    def _federation_needs_home_assistant(self) -> AgentConfig:
        if self.federation is not None and (self.homeassistant.url is None or self.homeassistant.token is None):
            raise ValueError("federation exports this node's Home Assistant: set homeassistant.url and token")
        return self

    @model_validator(mode="after")
    def _unique_checks(self) -> AgentConfig:
        names = [c.name for c in self.health_checks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"health check names must be unique: {', '.join(dupes)}")
        return self


# Environment variables and the config keys they set (flags use the same keys).
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "HASYNC_BROKER": ("broker", "url"),
    "HASYNC_BROKER_USERNAME": ("broker", "username"),
    "HASYNC_BROKER_PASSWORD": ("broker", "password"),
    "HASYNC_CLUSTER": ("cluster",),
    "HASYNC_NODE_ID": ("node_id",),
    "HASYNC_PRIORITY": ("priority",),
    "HASYNC_TOPIC_PREFIX": ("topic_prefix",),
    "HASYNC_HTTP_HOST": ("http", "host"),
    "HASYNC_HTTP_PORT": ("http", "port"),
    "HASYNC_LOG_FORMAT": ("log", "format"),
    "HASYNC_LOG_LEVEL": ("log", "level"),
    "HASYNC_EVENTS_FILE": ("events_file",),
    "HASYNC_HA_URL": ("homeassistant", "url"),
    "HASYNC_HA_TOKEN": ("homeassistant", "token"),
}


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = {}
            tree[key] = node
        tree = node
    tree[path[-1]] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> AgentConfig:
    """File, then environment, then ``overrides`` (flags) keyed by config path."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
        tree = loaded or {}
    for name, key in ENV_KEYS.items():
        value = (os.environ if env is None else env).get(name)
        if value is not None and value != "":
            _set(tree, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(tree, key, value)
    try:
        return AgentConfig.model_validate(tree)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{_describe(exc)}") from exc
