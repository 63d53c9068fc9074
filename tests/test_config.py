"""Configuration: file < environment < flags, defaults, validation messages that name the key, the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from hasync import config as config_module
from hasync.cli import main
from hasync.config import (
    ENV_KEYS,
    AgentConfig,
    BrokerConfig,
    CommandCheck,
    ConfigError,
    ElectionConfig,
    HooksConfig,
    HttpCheck,
    default_node_id,
    load_config,
)
from hasync.election import Timing


def write(tmp_path: Path, text: str, name: str = "hasync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tree_overrides: dict[tuple[str, ...], Any] | None = None, **env: str) -> AgentConfig:
    """load_config without a file, from ``env`` only (never os.environ) and ``tree_overrides``."""
    return load_config(None, env=env, overrides=tree_overrides)


def config_error(path: Path | None = None, *, env: dict[str, str] | None = None, **overrides: Any) -> str:
    """The message of the ConfigError that loading raises; overrides are given as ``broker__url=...``."""
    keyed = {tuple(key.split("__")): value for key, value in overrides.items()}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {}, overrides=keyed)
    return str(info.value)


def file_error(tmp_path: Path, text: str) -> str:
    return config_error(write(tmp_path, text))


# ---- defaults and sources -----------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load()
    assert cfg.node_id == default_node_id()
    assert (cfg.cluster, cfg.topic_prefix, cfg.priority, cfg.preempt, cfg.maintenance) == (
        "home", "hasync", 100, True, False
    )
    assert (cfg.broker.url, cfg.broker.host, cfg.broker.port, cfg.broker.tls) == (
        "mqtt://127.0.0.1:1883", "127.0.0.1", 1883, False
    )
    assert cfg.broker.credentials == (None, None)
    assert (cfg.broker.keepalive, cfg.broker.reconnect_min, cfg.broker.reconnect_max) == (5, 0.2, 10.0)
    assert cfg.election == ElectionConfig()
    assert (cfg.election.lease_duration, cfg.election.renew_deadline, cfg.election.renew_interval) == (3.0, 2.0, 0.5)
    assert cfg.health_checks == []
    assert cfg.hooks == HooksConfig()
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "127.0.0.1", 8765)
    assert (cfg.log.format, cfg.log.level) == ("text", "INFO")
    assert cfg.events_file is None


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("ha-kitchen", "ha-kitchen"), ("ha.lan.example", "ha"), ("my host+1", "my-host-1"), ("-x-", "x"),
     ("", "node"), ("...", "node"), ("\u00e4\u00f6", "node"), ("x" * 80, "x" * 64)],
)
def test_default_node_id_is_a_valid_segment_from_the_host_name(
    monkeypatch: pytest.MonkeyPatch, hostname: str, expected: str
) -> None:
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: hostname)
    assert default_node_id() == expected
    assert AgentConfig().node_id == expected


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == load_config(None, env={})
    assert load_config(write(tmp_path, "# only a comment\n"), env={}) == load_config(None, env={})


def test_file_sets_nested_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """
node_id: ha-1
cluster: house
topic_prefix: site/ha
priority: 150
preempt: false
broker:
  url: mqtts://broker.lan
  keepalive: 10
election:
  lease_duration: 6
  renew_deadline: 4
  renew_interval: 1
  heartbeat_interval: 2
health_checks:
  - {type: command, name: ha-api, command: "true"}
  - {type: http, name: web, url: "http://127.0.0.1:8123/", expect_status: [200, 401]}
hooks:
  promote: systemctl start home-assistant
  timeout: 5
http: {enabled: false, port: 0}
log: {format: json, level: DEBUG}
events_file: /var/lib/hasync/events.jsonl
""")
    cfg = load_config(path, env={})
    assert (cfg.node_id, cfg.cluster, cfg.topic_prefix, cfg.priority, cfg.preempt) == (
        "ha-1", "house", "site/ha", 150, False
    )
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls, cfg.broker.keepalive) == ("broker.lan", 8883, True, 10)
    assert cfg.election.lease_duration == 6.0 and cfg.election.heartbeat_interval == 2.0
    assert [type(c) for c in cfg.health_checks] == [CommandCheck, HttpCheck]
    assert cfg.hooks.promote == "systemctl start home-assistant" and cfg.hooks.timeout == 5.0
    assert (cfg.http.enabled, cfg.http.port, cfg.log.format, cfg.log.level) == (False, 0, "json", "DEBUG")
    assert cfg.events_file == Path("/var/lib/hasync/events.jsonl")


def test_every_environment_variable_sets_its_key() -> None:
    cfg = load(
        HASYNC_BROKER="mqtts://broker.lan:8884",
        HASYNC_BROKER_USERNAME="agent",
        HASYNC_BROKER_PASSWORD="s3cret",
        HASYNC_CLUSTER="house",
        HASYNC_NODE_ID="ha-2",
        HASYNC_PRIORITY="7",
        HASYNC_TOPIC_PREFIX="site/ha",
        HASYNC_HTTP_HOST="0.0.0.0",
        HASYNC_HTTP_PORT="0",
        HASYNC_LOG_FORMAT="json",
        HASYNC_LOG_LEVEL="WARNING",
        HASYNC_EVENTS_FILE="/tmp/events.jsonl",
    )
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.credentials) == ("broker.lan", 8884, ("agent", "s3cret"))
    assert (cfg.cluster, cfg.node_id, cfg.priority, cfg.topic_prefix) == ("house", "ha-2", 7, "site/ha")
    assert (cfg.http.host, cfg.http.port, cfg.log.format, cfg.log.level) == ("0.0.0.0", 0, "json", "WARNING")
    assert cfg.events_file == Path("/tmp/events.jsonl")


def test_env_keys_all_name_config_fields() -> None:
    cfg = load()
    for name, path in ENV_KEYS.items():
        assert name.startswith("HASYNC_")
        node: Any = cfg
        for key in path:
            node = getattr(node, key)


def test_empty_and_unknown_environment_variables_are_ignored() -> None:
    assert load(HASYNC_PRIORITY="", HASYNC_CLUSTER="", HASYNC_BOGUS="x", PRIORITY="5") == load()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: 1\ncluster: from-file\nnode_id: file-node\n")
    env = {"HASYNC_PRIORITY": "2", "HASYNC_CLUSTER": "from-env"}
    assert load_config(path, env={}).priority == 1
    cfg = load_config(path, env=env)
    assert (cfg.priority, cfg.cluster, cfg.node_id) == (2, "from-env", "file-node")
    cfg = load_config(path, env=env, overrides={("priority",): 3, ("node_id",): "flag-node"})
    assert (cfg.priority, cfg.cluster, cfg.node_id) == (3, "from-env", "flag-node")


def test_a_flag_left_out_is_none_and_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: 1\n")
    cfg = load_config(path, env={"HASYNC_CLUSTER": "from-env"}, overrides={("priority",): None, ("cluster",): None})
    assert (cfg.priority, cfg.cluster) == (1, "from-env")


def test_env_and_flags_merge_into_a_section_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\n  url: mqtt://file-host\n  keepalive: 30\n  username: file-user\n")
    cfg = load_config(path, env={"HASYNC_BROKER_PASSWORD": "pw"}, overrides={("broker", "url"): "mqtt://flag-host"})
    assert (cfg.broker.host, cfg.broker.keepalive, cfg.broker.credentials) == ("flag-host", 30, ("file-user", "pw"))


def test_env_fills_a_null_section_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broker:\nhttp: null\n")
    cfg = load_config(path, env={"HASYNC_BROKER": "mqtt://b", "HASYNC_HTTP_PORT": "9000"})
    assert (cfg.broker.host, cfg.http.port) == ("b", 9000)


def test_config_is_frozen() -> None:
    cfg = load()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.priority = 5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.broker.url = "mqtt://x"  # type: ignore[misc]


# ---- broker URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("mqtt://broker/", "broker", 1883, False),
        ("mqtt://broker:1884", "broker", 1884, False),
        ("mqtts://broker.lan:443", "broker.lan", 443, True),
        ("mqtt://10.0.0.5:65535", "10.0.0.5", 65535, False),
        ("mqtt://[::1]:1884", "::1", 1884, False),
        ("mqtts://[fd00::5]", "fd00::5", 8883, True),
        ("mqtt://u:p@broker", "broker", 1883, False),
        ("MQTTS://Broker.LAN", "broker.lan", 8883, True),  # schemes and host names ignore case
    ],
)
def test_broker_url_parsing(url: str, host: str, port: int, tls: bool) -> None:
    broker = load({("broker", "url"): url}).broker
    assert (broker.host, broker.port, broker.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "username", "password", "credentials"),
    [
        ("mqtt://broker", None, None, (None, None)),
        ("mqtt://agent:pw@broker", None, None, ("agent", "pw")),
        ("mqtt://agent@broker", None, None, ("agent", None)),
        ("mqtt://agent:pw@broker", "other", None, ("other", "pw")),
        ("mqtt://agent:pw@broker", None, "new-pw", ("agent", "new-pw")),
        ("mqtt://agent:pw@broker", "other", "new-pw", ("other", "new-pw")),
        ("mqtt://broker", "agent", "pw", ("agent", "pw")),
        ("mqtt://us%40er:p%3As%2Fs%25@broker", None, None, ("us@er", "p:s/s%")),
        ("mqtt://user:p%40ss@broker:1884", None, None, ("user", "p@ss")),
    ],
)
def test_credentials_from_url_and_their_override(
    url: str, username: str | None, password: str | None, credentials: tuple[str | None, str | None]
) -> None:
    assert BrokerConfig(url=url, username=username, password=password).credentials == credentials


def test_credentials_override_through_env() -> None:
    broker = load(HASYNC_BROKER="mqtt://agent:pw@broker", HASYNC_BROKER_PASSWORD="from-env").broker
    assert broker.credentials == ("agent", "from-env")


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("mqtt://broker", "mqtt://broker:1883"),
        ("mqtts://agent:s3cret@broker.lan", "mqtts://broker.lan:8883"),
        ("mqtt://agent:s3cret@broker.lan:1884/", "mqtt://broker.lan:1884"),
        ("mqtt://us%40er:p%3Ass@broker", "mqtt://broker:1883"),
    ],
)
def test_redacted_url_hides_credentials(url: str, redacted: str) -> None:
    broker = BrokerConfig(url=url, password="other-secret")
    assert broker.redacted_url() == redacted
    for secret in ("agent", "s3cret", "us%40er", "p%3Ass", "other-secret", "@"):
        assert secret not in broker.redacted_url()


def test_redacted_url_keeps_ipv6_brackets() -> None:
    assert BrokerConfig(url="mqtt://user:pw@[::1]:1884").redacted_url() == "mqtt://[::1]:1884"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://broker", "scheme must be mqtt:// or mqtts://, not 'http'"),
        ("tcp://broker:1883", "scheme must be mqtt:// or mqtts://, not 'tcp'"),
        ("broker:1883", "scheme must be mqtt:// or mqtts://, not 'broker'"),
        ("//broker:1883", "scheme must be mqtt:// or mqtts://, not 'missing'"),
        ("broker", "scheme must be mqtt:// or mqtts://, not 'missing'"),
        ("mqtt://", "the URL names no host"),
        ("mqtt://:1883", "the URL names no host"),
        ("mqtt://user:pw@", "the URL names no host"),
        ("mqtt://broker:99999", "bad port"),
        ("mqtt://broker:-1", "bad port"),
        ("mqtt://broker:abc", "bad port"),
        ("mqtt://broker/topic", "the URL takes no path"),
        ("mqtt://broker:1883/a/b", "the URL takes no path"),
    ],
)
def test_bad_broker_urls_are_rejected_naming_broker_url(url: str, message: str) -> None:
    error = config_error(broker__url=url)
    assert "broker.url: " + message in error
    assert "Value error" not in error


def test_bad_broker_url_from_env_names_the_key() -> None:
    assert "broker.url: scheme must be mqtt:// or mqtts://" in config_error(env={"HASYNC_BROKER": "ws://broker"})


def test_broker_port_0_is_rejected() -> None:
    assert "broker.url" in config_error(broker__url="mqtt://broker:0")


# ---- broker TLS and other settings --------------------------------------------------------------


def test_tls_files_that_exist_are_accepted(tmp_path: Path) -> None:
    files = {name: write(tmp_path, "pem", f"{name}.pem") for name in ("ca", "cert", "key")}
    broker = BrokerConfig(url="mqtts://b", ca_file=files["ca"], cert_file=files["cert"], key_file=files["key"])
    assert (broker.ca_file, broker.cert_file, broker.key_file) == (files["ca"], files["cert"], files["key"])


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_files_must_exist(tmp_path: Path, key: str) -> None:
    missing = tmp_path / "missing.pem"
    overrides: dict[str, Any] = {"broker__url": "mqtts://b", f"broker__{key}": str(missing)}
    if key != "ca_file":  # complete the pair, so that only the missing file is wrong
        overrides["broker__key_file" if key == "cert_file" else "broker__cert_file"] = str(write(tmp_path, "pem"))
    assert f"broker: {key}: {missing} is not a readable file" in config_error(**overrides)


def test_a_directory_is_not_a_tls_file(tmp_path: Path) -> None:
    assert f"broker: ca_file: {tmp_path} is not a readable file" in config_error(broker__ca_file=str(tmp_path))


@pytest.mark.parametrize("present", ["cert_file", "key_file"])
def test_cert_file_and_key_file_go_together(tmp_path: Path, present: str) -> None:
    path = write(tmp_path, "pem", "client.pem")
    error = config_error(**{f"broker__{present}": str(path)})
    assert "broker: cert_file and key_file go together" in error


def test_reconnect_min_must_not_exceed_reconnect_max() -> None:
    error = config_error(broker__reconnect_min=5, broker__reconnect_max=1)
    assert "broker: reconnect_min must not exceed reconnect_max" in error


@pytest.mark.parametrize(
    ("key", "value"),
    [("keepalive", 1), ("keepalive", 601), ("connect_timeout", 0), ("reconnect_min", 0), ("reconnect_max", 601)],
)
def test_broker_numbers_out_of_range_name_the_key(key: str, value: float) -> None:
    assert f"broker.{key}: Input should be" in config_error(**{f"broker__{key}": value})


# ---- election -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("election", "fields"),
    [
        ({"renew_interval": 2.0, "renew_deadline": 2.0}, ("renew_interval (2.0)", "renew_deadline (2.0)")),
        ({"renew_interval": 3.0, "renew_deadline": 2.0, "lease_duration": 10.0}, ("renew_interval", "renew_deadline")),
        ({"lease_duration": 2.3, "renew_deadline": 2.0}, ("lease_duration (2.3)", "1.2 x renew_deadline (2.0)")),
        ({"lease_duration": 2.0, "renew_deadline": 2.0}, ("lease_duration", "renew_deadline")),
        ({"lease_duration": 3.0, "heartbeat_interval": 1.6}, ("heartbeat_interval (1.6)", "lease_duration (3.0)")),
    ],
)
def test_election_relations_are_rejected_naming_the_fields(
    tmp_path: Path, election: dict[str, float], fields: tuple[str, ...]
) -> None:
    lines = "".join(f"  {key}: {value}\n" for key, value in election.items())
    error = file_error(tmp_path, "election:\n" + lines)
    assert "\n  election: " in error
    for field in fields:
        assert field in error


@pytest.mark.parametrize(
    "election",
    [
        {"lease_duration": 2.4, "renew_deadline": 2.0},  # exactly 1.2 x
        {"lease_duration": 3.0, "heartbeat_interval": 1.5},  # exactly half
        {"renew_interval": 1.999, "renew_deadline": 2.0},
        {"lease_duration": 600, "renew_deadline": 500, "renew_interval": 60, "heartbeat_interval": 60},
    ],
)
def test_election_relations_at_their_limits_are_accepted(election: dict[str, float]) -> None:
    ElectionConfig(**election).timing().check()


@pytest.mark.parametrize(
    ("key", "value"),
    [("lease_duration", 0), ("lease_duration", 601), ("renew_interval", -1), ("renew_interval", 61),
     ("heartbeat_interval", 0), ("claim_stagger", -0.1), ("preempt_delay", -1), ("lease_duration", "nan")],
)
def test_election_numbers_out_of_range_name_the_key(key: str, value: object) -> None:
    assert f"election.{key}: Input should be" in config_error(**{f"election__{key}": value})


def test_timing_carries_every_election_setting() -> None:
    election = ElectionConfig(
        lease_duration=6, renew_deadline=4, renew_interval=1, heartbeat_interval=2, claim_stagger=0.3,
        preempt_delay=20, will_fast_path=False,
    )
    timing = election.timing()
    assert isinstance(timing, Timing)
    assert timing == Timing(
        lease_duration=6, renew_deadline=4, renew_interval=1, heartbeat_interval=2, claim_stagger=0.3,
        preempt_delay=20, will_fast_path=False,
    )
    timing.check()
    ElectionConfig().timing().check()


# Subnormals are left out: test_election_rejects_subnormal_equal_durations shows the one gap they open.
WILD = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, 1000.0])


def _seconds(high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=0, max_value=high, exclude_min=True, allow_subnormal=False)


def _near(value: float) -> st.SearchStrategy[float]:
    """``value`` or a float neighbour: the relations are most fragile exactly at their limits."""
    return st.sampled_from([value, math.nextafter(value, 0), math.nextafter(value, math.inf)])


@st.composite
def election_settings(draw: st.DrawFn) -> dict[str, float]:
    """Mostly at the limits or inside the accepted region; one value in ten is anything at all."""

    def pick(strategy: st.SearchStrategy[float]) -> float:
        return draw(WILD if draw(st.integers(0, 9)) == 9 else strategy)

    deadline = pick(st.floats(0.01, 10) | st.floats(1e-300, 600))
    base = deadline if 0 < deadline <= 600 else 2.0  # what the others are drawn around
    lease = pick(_near(base * 1.2) | _near(base) | st.floats(base, 600))
    interval = pick(_near(min(base, 60)) | _seconds(min(base, 60)))
    half = min(lease / 2, 60) if 0 < lease <= 600 else 1.0
    heartbeat = pick(_near(half) | _seconds(half))
    return {
        "renew_deadline": deadline,
        "lease_duration": lease,
        "renew_interval": interval,
        "heartbeat_interval": heartbeat,
        "claim_stagger": draw(st.sampled_from([0.0, -0.0, 0.15, 10.0])),
        "preempt_delay": draw(st.sampled_from([0.0, 5.0, 3600.0])),
    }


@given(election_settings())
def test_every_accepted_election_config_passes_timing_check(settings: dict[str, float]) -> None:
    try:
        election = ElectionConfig(**settings)
    except ValidationError:
        return
    election.timing().check()


def test_election_rejects_subnormal_equal_durations() -> None:
    settings = {"renew_interval": 5e-324, "renew_deadline": 1e-323, "lease_duration": 1e-323,
                "heartbeat_interval": 5e-324}
    with pytest.raises(ValidationError):
        ElectionConfig(**settings)


# ---- node id, cluster, topic prefix -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("node_id", "a b", "node_id: node id 'a b' must be 1-64 characters"),
        ("node_id", "", "node_id: node id '' must be 1-64 characters"),
        ("node_id", "x" * 65, "node_id: node id"),
        ("node_id", "ha/1", "node_id: node id 'ha/1'"),
        ("node_id", "+", "node_id: node id '+'"),
        ("cluster", "a/b", "cluster: cluster name 'a/b' must be 1-64 characters"),
        ("cluster", "#", "cluster: cluster name '#'"),
        ("topic_prefix", "a/b/c/d/e", "topic_prefix: topic prefix 'a/b/c/d/e' must be 1-4 '/'-separated segments"),
        ("topic_prefix", "/hasync", "topic_prefix: topic prefix '/hasync'"),
        ("topic_prefix", "hasync/", "topic_prefix: topic prefix 'hasync/'"),
        ("topic_prefix", "a//b", "topic_prefix: topic prefix 'a//b'"),
        ("topic_prefix", "hasync/+", "topic_prefix: topic prefix 'hasync/+'"),
    ],
)
def test_invalid_names_are_rejected_naming_the_key(key: str, value: str, message: str) -> None:
    assert message in config_error(**{key: value})


def test_an_integer_node_id_in_yaml_is_rejected(tmp_path: Path) -> None:
    assert "node_id: Input should be a valid string" in file_error(tmp_path, "node_id: 42\n")


def test_a_node_id_with_a_trailing_newline_is_rejected() -> None:
    assert "node_id" in config_error(node_id="ha-1\n")


# ---- health checks ------------------------------------------------------------------------------


def test_health_checks_are_discriminated_by_type(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
health_checks:
  - type: command
    name: ha-api
    command: curl -fs http://127.0.0.1:8123/
    interval: 5
    timeout: 2
  - type: http
    name: web.ui
    url: https://127.0.0.1:8123/
    verify_tls: false
"""), env={})
    command, http = cfg.health_checks
    assert isinstance(command, CommandCheck) and command.command.startswith("curl")
    assert (command.interval, command.timeout, command.rise, command.fall) == (5.0, 2.0, 2, 2)
    assert isinstance(http, HttpCheck) and http.verify_tls is False and http.expect_status is None


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"name": "a", "command": "true"}, "health_checks.0: Unable to extract tag using discriminator 'type'"),
        ({"type": "icmp", "name": "a"}, "health_checks.0: Input tag 'icmp' found using 'type' does not match"),
        ({"type": "tcp", "name": "a", "host": "h"}, "health_checks.0.tcp.port: Field required"),
        ({"type": "command", "name": "a", "command": " "}, "health_checks.0.command.command: command must not be"),
        ({"type": "command", "name": "a"}, "health_checks.0.command.command: Field required"),
        ({"type": "command", "name": "a", "command": "true", "url": "http://h"},
         "health_checks.0.command.url: Extra inputs are not permitted"),
        ({"type": "command", "name": "a b", "command": "true"}, "health_checks.0.command.name: check name 'a b'"),
        ({"type": "command", "name": "a", "command": "true", "interval": 0},
         "health_checks.0.command.interval: interval must be a finite number of seconds > 0"),
        ({"type": "command", "name": "a", "command": "true", "timeout": -1},
         "health_checks.0.command.timeout: timeout must be a finite number of seconds > 0"),
        ({"type": "command", "name": "a", "command": "true", "rise": 0},
         "health_checks.0.command.rise: rise must be >= 1"),
        ({"type": "command", "name": "a", "command": "true", "interval": 1, "timeout": 3},
         "health_checks.0.command: check 'a': timeout (3s) must not exceed interval (1s)"),
        ({"type": "http", "name": "a", "url": "ftp://h/"},
         "health_checks.0.http.url: url must be an http:// or https:// URL with a host, got 'ftp://h/'"),
        ({"type": "http", "name": "a", "url": "http:///x"}, "health_checks.0.http.url: url must be"),
        ({"type": "http", "name": "a", "url": "http://h", "expect_status": []},
         "health_checks.0.http.expect_status: expect_status must list at least one status"),
        ({"type": "http", "name": "a", "url": "http://h", "expect_status": [200, 99, 600]},
         "health_checks.0.http.expect_status: expect_status must hold HTTP statuses 100-599, got [99, 600]"),
        ({"type": "http", "name": "a", "url": "http://h", "command": "true"},
         "health_checks.0.http.command: Extra inputs are not permitted"),
    ],
)
def test_health_check_validation_messages(check: dict[str, Any], message: str) -> None:
    error = config_error(health_checks=[check])
    assert message in error


def test_health_check_errors_name_the_index() -> None:
    ok = {"type": "command", "name": "a", "command": "true"}
    error = config_error(health_checks=[ok, {"type": "command", "name": "b", "command": ""}])
    assert "health_checks.1.command.command" in error and "health_checks.0" not in error


def test_health_check_names_must_be_unique() -> None:
    checks = [
        {"type": "command", "name": "ha", "command": "true"},
        {"type": "http", "name": "ha", "url": "http://h"},
        {"type": "command", "name": "disk", "command": "true"},
        {"type": "command", "name": "disk", "command": "true"},
        {"type": "command", "name": "net", "command": "true"},
    ]
    assert "health check names must be unique: disk, ha" in config_error(health_checks=checks)


def test_a_health_check_name_with_a_trailing_newline_is_rejected() -> None:
    error = config_error(health_checks=[{"type": "command", "name": "ha\n", "command": "true"}])
    assert "health_checks.0.command.name" in error


# ---- hooks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, -1, ".inf", ".nan"])
def test_hooks_timeout_must_be_positive(tmp_path: Path, timeout: object) -> None:
    error = file_error(tmp_path, f"hooks:\n  timeout: {timeout}\n")
    assert "hooks.timeout: hook timeout must be a finite number of seconds > 0" in error


def test_empty_hook_command_is_rejected() -> None:
    assert "hooks.demote: the demote hook is empty" in config_error(hooks__demote="  ")


# ---- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("prioirty: 5\n", "prioirty"),
        ("broker:\n  usename: x\n", "broker.usename"),
        ("election:\n  lease: 3\n", "election.lease"),
        ("hooks:\n  notify: x\n", "hooks.notify"),
        ("http:\n  tls: true\n", "http.tls"),
        ("log:\n  file: /tmp/x\n", "log.file"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    assert f"  {key}: Extra inputs are not permitted" in file_error(tmp_path, text)


def test_all_errors_are_listed_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: -5\ncluster: a/b\nlog:\n  level: TRACE\n")
    error = config_error(path)
    head, *lines = error.splitlines()
    assert head == f"invalid configuration in {path}:"
    assert [line.split(":")[0].strip() for line in lines] == ["cluster", "priority", "log.level"]


def test_errors_without_a_file_do_not_name_one() -> None:
    assert config_error(priority=-5).startswith("invalid configuration:\n  priority: ")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"HASYNC_PRIORITY": "high"}, "priority"),
        ({"HASYNC_PRIORITY": "1001"}, "priority"),
        ({"HASYNC_HTTP_PORT": "65536"}, "http.port"),
        ({"HASYNC_LOG_LEVEL": "TRACE"}, "log.level"),
        ({"HASYNC_LOG_FORMAT": "xml"}, "log.format"),
        ({"HASYNC_NODE_ID": "my node"}, "node_id"),
    ],
)
def test_bad_environment_values_name_the_key(env: dict[str, str], key: str) -> None:
    assert f"\n  {key}: " in config_error(env=env)


# ---- the file itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n", "true\n"])
def test_a_file_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"config file {path}: the top level must be a mapping of keys"


@pytest.mark.parametrize("text", ["priority: [1, 2\n", "a: b: c\n", "key: 'unterminated\n", "\tpriority: 1\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path).startswith(f"config file {path} is not valid YAML: ")


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert config_error(path) == f"cannot read config file {path}: No such file or directory"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert config_error(tmp_path).startswith(f"cannot read config file {tmp_path}: ")


def test_a_path_given_as_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: 5\n")
    assert load_config(str(path), env={}).priority == 5


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: !!python/object/apply:os.getpid []\n")
    assert config_error(path).startswith(f"config file {path} is not valid YAML: ")


# ---- CLI ----------------------------------------------------------------------------------------

# The runner puts these into os.environ for the call only; None removes a variable the developer has set.
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(ENV_KEYS)


def test_cli_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: -5\n", "bad.yaml")
    result = CliRunner().invoke(main, ["agent", "--config", str(path)], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"hasync: invalid configuration in {path}:")
    assert "  priority: Input should be greater than or equal to 0" in result.stderr


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = CliRunner().invoke(main, ["agent", "-c", str(path)], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert result.stderr == f"hasync: cannot read config file {path}: No such file or directory\n"


def test_cli_flags_are_validated_too(tmp_path: Path) -> None:
    path = write(tmp_path, "priority: 5\n")
    result = CliRunner().invoke(main, ["agent", "-c", str(path), "--priority=-5"], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert "  priority: " in result.stderr
    result = CliRunner().invoke(main, ["agent", "--broker", "http://broker"], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert "  broker.url: scheme must be mqtt:// or mqtts://" in result.stderr


def test_cli_reads_the_environment_it_is_given() -> None:
    result = CliRunner().invoke(main, ["status"], env=CLEAN_ENV | {"HASYNC_CLUSTER": "a/b"})
    assert result.exit_code == 2
    assert "  cluster: cluster name 'a/b'" in result.stderr


# ---- signing --------------------------------------------------------------------------------------

PUBLIC = "A" * 43  # the shape of a public key as hasync keygen prints it


def test_signing_needs_a_key_file_and_this_node_among_the_public_keys(tmp_path: Path) -> None:
    key = write(tmp_path, "-----BEGIN PRIVATE KEY-----\n", name="a.key")
    ok = load({("node_id",): "a", ("signing",): {"private_key": str(key), "public_keys": {"a": PUBLIC}}})
    assert ok.signing is not None and ok.signing.required and ok.signing.unsigned_commands
    assert "signing.public_keys must list this node (a)" in config_error(
        node_id="a", signing={"private_key": str(key), "public_keys": {"b": PUBLIC}})
    assert "is not a readable file (create it with hasync keygen)" in config_error(
        node_id="a", signing={"private_key": str(tmp_path / "none.key"), "public_keys": {"a": PUBLIC}})
    assert "public_keys.a: not an Ed25519 public key" in config_error(
        node_id="a", signing={"private_key": str(key), "public_keys": {"a": "short"}})
    assert "node id 'b c'" in config_error(
        node_id="a", signing={"private_key": str(key), "public_keys": {"a": PUBLIC, "b c": PUBLIC}})


def test_damping_settings_reach_the_election_and_are_checked() -> None:
    election = ElectionConfig(flap_damping=False, damping_hold=5, damping_max=50, damping_half_life=60,
                              release_fast_path=False)
    timing = election.timing()
    assert (timing.flap_damping, timing.damping_hold, timing.damping_max, timing.damping_half_life,
            timing.release_fast_path) == (False, 5, 50, 60, False)
    assert "damping_hold (100.0) must not exceed damping_max (50.0)" in config_error(
        election__damping_hold=100, election__damping_max=50)


def test_the_example_configurations_are_valid(tmp_path: Path) -> None:
    """examples/ is documentation users copy: it must load (its file paths pointed at files that exist)."""
    root = Path(__file__).resolve().parent.parent / "examples"
    tree = yaml.safe_load((root / "hasync.yaml").read_text())
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    tree["broker"]["ca_file"] = str(tmp_path / "ca.crt")
    cfg = load_config(write(tmp_path, yaml.safe_dump(tree)), env={})
    assert {c.type for c in cfg.health_checks} >= {"http", "command", "interface", "dns"}
    assert any(c.weight for c in cfg.health_checks) and any(c.when == "primary" for c in cfg.health_checks)
    assert cfg.vip and cfg.events_file is not None
    recipe = load_config(root / "dnsmasq" / "hasync.yaml", env={})
    assert recipe.vip[0].on_broker_loss == "kept" and recipe.hooks.on_broker_loss == "kept"
    assert [c.when for c in recipe.health_checks if c.type == "dns"] == ["primary"]
    hub = load_config(root / "federation" / "hub.yaml", env={})
    assert hub.federation is not None and hub.federation.include.areas == ["Kitchen", "Hall", "Garden"]
    assert hub.federation.removal_grace == 900 and hub.federation.discovery_prefix is None


def test_federation_needs_home_assistant_and_rejects_unknown_keys() -> None:
    assert "federation exports this node's Home Assistant: set homeassistant.url and token" in config_error(
        federation={"include": {"domains": ["light"]}})
    assert "federation.include.rooms" in config_error(
        federation={"include": {"rooms": ["x"]}}, homeassistant={"url": "http://h:8123", "token": "t"})
    ha = {"url": "http://h:8123", "token": "t"}
    assert "federation.removal_grace" in config_error(federation={"removal_grace": -1}, homeassistant=ha)
    assert "federation.discovery_prefix" in config_error(federation={"discovery_prefix": "a/#"}, homeassistant=ha)


# ---- timing profiles ----------------------------------------------------------------------------------

NO_DISCOVERY = {"homeassistant": {"discovery": False}}


def test_the_fast_profile_presets_the_election_and_the_keepalive(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "election: {profile: fast}\nhomeassistant: {discovery: false}\n"), env={})
    e = cfg.election
    assert (e.profile, e.lease_duration, e.renew_deadline, e.renew_interval, e.heartbeat_interval,
            e.claim_stagger) == ("fast", 0.85, 0.7, 0.1, 0.3, 0.05)
    assert cfg.broker.keepalive == 2
    assert e.preempt_delay == ElectionConfig().preempt_delay  # what the profile leaves alone stays the default
    cfg.election.timing().check()
    assert cfg.election.timing().lease_duration == 0.85


def test_the_default_profile_is_the_defaults() -> None:
    assert ElectionConfig(profile="default") == ElectionConfig()
    assert AgentConfig.model_validate({"election": {"profile": "default"}}).broker.keepalive == BrokerConfig().keepalive


def test_explicit_keys_win_over_the_profile() -> None:
    cfg = AgentConfig.model_validate({"election": {"profile": "fast", "lease_duration": 1.2, "renew_interval": 0.2},
                                      "broker": {"keepalive": 7}, **NO_DISCOVERY})
    assert (cfg.election.lease_duration, cfg.election.renew_interval, cfg.election.renew_deadline) == (1.2, 0.2, 0.7)
    assert cfg.broker.keepalive == 7


def test_an_override_that_breaks_the_profiles_safety_rule_is_one_clear_line() -> None:
    message = config_error(election__profile="fast", election__renew_deadline=0.8, homeassistant__discovery=False)
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message
    assert "lease_duration (0.85) must be at least 1.2 x renew_deadline (0.8)" in lines[0]


def test_the_fast_profile_with_home_assistant_discovery_says_what_to_do() -> None:
    message = config_error(election__profile="fast")
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message
    assert "election.profile fast" in lines[0] and "homeassistant.discovery: false" in lines[0]


def test_an_unknown_profile_names_the_known_ones() -> None:
    assert "election.profile: Input should be 'default' or 'fast'" in config_error(election__profile="fastest")
