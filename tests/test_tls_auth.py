"""Agents on a Mosquitto that demands TLS with client certificates and a password; and JSON logs.

A throwaway PKI is made with the ``openssl`` command line: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, and a second, unrelated CA that must not be trusted. The broker is the
generated config of ``brokers.MosquittoProcess``: its TLS options follow the generated ``listener`` line,
so they apply to that listener, and the later ``allow_anonymous false`` overrides the generated ``true``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.agents import AgentProcess, Cluster, wait_until
from harness.brokers import MosquittoProcess, mosquitto_binary
from hasync.config import BrokerConfig
from hasync.status import snapshot
from hasync.topics import Topics
from hasync.transport import AuthFailure, ConnectionLost

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

USER = "hasync"
PASSWORD = "s3cret-pass"
BAD_PASSWORD = "not-the-pass-7f3a"
TOOL_TIMEOUT = 30.0  # seconds for one openssl or mosquitto_passwd run; each takes milliseconds normally
# Retry quickly so that a few attempts fit in a short test; an auth failure waits reconnect_max each time.
FAST_RETRY = {"reconnect_min": 0.05, "reconnect_max": 0.3}


def _require_tool(name: str, fallback: str, package: str) -> str:
    """The tool's path; a missing one skips the test, or fails it under CI (as conftest does for mosquitto)."""
    found = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if found is not None:
        return found
    if "CI" in os.environ:
        pytest.fail(f"{name} is not installed and CI is set, so this fails: apt-get install {package}")
    pytest.skip(f"{name} is not installed (apt-get install {package}); under CI=true this fails instead")


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA: trusting it instead of ``ca`` must fail verification


class _OpenSsl:
    """Just enough of a CA for tests: P-256 keys, two-day certificates, strict-verifier-friendly extensions."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory

    def _new_key(self) -> list[str]:
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ca(self, name: str) -> tuple[Path, Path]:
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        _run([self.binary, "req", "-x509", *self._new_key(), "-keyout", str(key), "-out", str(cert),
              "-days", "2", "-subj", f"/CN=hasync test {name}",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign",
              "-addext", "subjectKeyIdentifier=hash"], self.directory)
        return cert, key

    def issue(self, name: str, ca: tuple[Path, Path], extensions: list[str]) -> tuple[Path, Path]:
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        csr, ext = self.directory / f"{name}.csr", self.directory / f"{name}.ext"
        ext.write_text("\n".join([
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
            *extensions,
        ]) + "\n")
        _run([self.binary, "req", "-new", *self._new_key(), "-keyout", str(key), "-out", str(csr),
              "-subj", f"/CN={name}"], self.directory)
        _run([self.binary, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
              "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)], self.directory)
        return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tool = _OpenSsl(_require_tool("openssl", "/usr/bin/openssl", "openssl"), tmp_path_factory.mktemp("pki"))
    ca = tool.ca("ca")
    server = tool.issue("server", ca, ["subjectAltName=IP:127.0.0.1,DNS:localhost", "extendedKeyUsage=serverAuth"])
    client = tool.issue("client", ca, ["extendedKeyUsage=clientAuth"])
    other_ca, _ = tool.ca("other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca)


@pytest.fixture
def tls_mosquitto(tmp_path: Path, pki: Pki) -> Iterator[MosquittoProcess]:
    """Mosquitto with one listener on 127.0.0.1 that wants TLS, a client certificate, and user/password."""
    binary = mosquitto_binary() or _require_tool("mosquitto", "/usr/sbin/mosquitto", "mosquitto")
    passwd = _require_tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd", "mosquitto")
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    password_file = workdir / "passwords"
    _run([passwd, "-b", "-c", str(password_file), USER, PASSWORD], workdir)
    extra = [
        "allow_anonymous false",
        f"password_file {password_file}",
        # These follow the generated "listener PORT 127.0.0.1" line, so they make that listener TLS.
        f"cafile {pki.ca}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
        "require_certificate true",
        "use_identity_as_username false",
    ]
    with MosquittoProcess(workdir, binary=binary, extra_config=extra) as broker:
        yield broker


def tls_url(broker: MosquittoProcess) -> str:
    return f"mqtts://{broker.host}:{broker.port}"


def tls_settings(pki: Pki, *, ca: Path | None = None, password: str = PASSWORD) -> dict[str, Any]:
    """The ``broker`` section of an agent's config (merged into AgentProcess's defaults)."""
    return {
        "ca_file": str(ca or pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
        "username": USER,
        "password": password,
    }


@pytest.fixture
def started() -> Iterator[list[AgentProcess]]:
    """Agents a test started; SIGTERMed at teardown if still running (killed, and an error, if they hang)."""
    agents: list[AgentProcess] = []
    yield agents
    hung = [agent.node for agent in agents if agent.alive and _terminate_hung(agent)]
    assert not hung, f"did not exit within the timeout of SIGTERM (killed): {hung}"


def _terminate_hung(agent: AgentProcess) -> bool:
    try:
        agent.terminate()
    except subprocess.TimeoutExpired:
        return True  # terminate() printed its stacks and killed it
    return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *agents: AgentProcess) -> Any:
    """wait_until, with the agents' logs in the failure message."""
    try:
        return wait_until(predicate, timeout, what)
    except AssertionError as exc:
        logs = "\n".join(f"==== {a.node}\n{a.log()[-6000:]}" for a in agents)
        raise AssertionError(f"{exc}\n{logs}") from None


def log_lines(agent: AgentProcess, needle: str, level: str) -> list[str]:
    """Lines of the agent's text log at ``level`` that contain ``needle``.

    The text format is ``<date> <time> <LEVEL padded> <logger>: <message>``.
    """
    found = []
    for line in agent.log().splitlines():
        fields = line.split(maxsplit=3)
        if len(fields) == 4 and fields[2] == level and needle in fields[3]:
            found.append(line)
    return found


def assert_disconnected(agent: AgentProcess) -> None:
    code, body = agent.http("/healthz")
    assert code == 503, (code, body)
    status = json.loads(body)
    assert status["connected"] is False, status
    assert status["primary"] is False, status
    assert agent.metric("hasync_mqtt_connected") == 0


# ---- a: a working TLS + password cluster ----------------------------------------------------------


def test_two_agents_over_mutual_tls_with_password_elect_one_primary(
    tls_mosquitto: MosquittoProcess, pki: Pki, tmp_path: Path, topic_prefix: str
) -> None:
    url = tls_url(tls_mosquitto)
    cluster = Cluster(tmp_path / "agents", url, topic_prefix)
    try:
        cluster.add("n1", priority=100, broker=tls_settings(pki))
        cluster.add("n2", priority=90, broker=tls_settings(pki))
        agents = list(cluster.agents.values())
        cluster.wait_for_leader(timeout=10)
        # With preemption the better node ends up leading even if n2 won the start-up race.
        wait_until(lambda: cluster.current_leader() == "n1", 10, "n1 to lead")
        wait_until(lambda: all(a.status().get("role") in ("primary", "standby") for a in agents), 10,
                   "both agents to settle")
        for agent in agents:
            assert log_lines(agent, f"connected to {url} as {agent.node}", "INFO"), agent.log()[-3000:]
            assert agent.status()["connected"] is True

        # `hasync status --broker` takes no TLS files, so read the cluster the way it does, with the library.
        observer = BrokerConfig(url=url, username=USER, password=PASSWORD, ca_file=pki.ca,
                                cert_file=pki.client_cert, key_file=pki.client_key)
        view = asyncio.run(snapshot(observer, Topics(topic_prefix, "test"), 1.2))
        now = time.monotonic()
        assert set(view.nodes) == {"n1", "n2"}, view.to_json(now)
        assert view.primaries(now) == ["n1"], view.to_json(now)
        cluster.check_invariants()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()
    assert [a.process.returncode for a in cluster.agents.values() if a.process] == [0, 0]


def test_broker_refuses_observers_without_password_or_client_certificate(
    tls_mosquitto: MosquittoProcess, pki: Pki, topic_prefix: str
) -> None:
    """The broker really enforces what the other tests rely on (so their failures are the ones we caused)."""
    url = tls_url(tls_mosquitto)
    topics = Topics(topic_prefix, "test")
    anonymous = BrokerConfig(url=url, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key,
                             connect_timeout=3)
    with pytest.raises(AuthFailure):
        asyncio.run(snapshot(anonymous, topics, 0.1))
    # Without a client certificate, TLS 1.3 completes the client's side of the handshake before the broker
    # checks for a certificate; its alert arrives on the first read, and the client (aiomqtt over paho) only
    # reports "Operation timed out" when connect_timeout runs out. Hence the short timeout.
    no_certificate = BrokerConfig(url=url, username=USER, password=PASSWORD, ca_file=pki.ca, connect_timeout=1)
    with pytest.raises(ConnectionLost):
        asyncio.run(snapshot(no_certificate, topics, 0.1))


# ---- b: wrong password ------------------------------------------------------------------------------

REFUSED = "refused our credentials"


def bad_password_agent(tmp_path: Path, topic_prefix: str, tls_mosquitto: MosquittoProcess, pki: Pki) -> AgentProcess:
    return AgentProcess(tmp_path / "agents", "badpw", tls_url(tls_mosquitto), topic_prefix,
                        broker={**tls_settings(pki, password=BAD_PASSWORD), **FAST_RETRY}).start()


def test_wrong_password_is_reported_and_retried_without_ever_leading(
    tls_mosquitto: MosquittoProcess, pki: Pki, tmp_path: Path, topic_prefix: str, started: list[AgentProcess]
) -> None:
    agent = bad_password_agent(tmp_path, topic_prefix, tls_mosquitto, pki)
    started.append(agent)
    # Several refused attempts: the first ones at ERROR, the rest at DEBUG (the agent logs at DEBUG).
    wait_for(lambda: len(log_lines(agent, REFUSED, "DEBUG")) >= 3, 10, "3 refused attempts logged at DEBUG", agent)
    errors = log_lines(agent, REFUSED, "ERROR")
    assert errors, agent.log()
    assert f"broker {tls_url(tls_mosquitto)} {REFUSED}" in errors[0], errors[0]
    assert "Not authorized" in errors[0], errors[0]  # Mosquitto answers a bad password with CONNACK 5
    assert BAD_PASSWORD not in agent.log()
    assert agent.alive
    assert agent.metric("hasync_mqtt_connect_failures_total", kind="auth") >= 4
    assert_disconnected(agent)
    assert agent.promotions() == []
    assert "Traceback" not in agent.log()
    assert agent.terminate() == 0
    assert agent.promotions() == []


def test_wrong_password_is_logged_at_error_exactly_once(
    tls_mosquitto: MosquittoProcess, pki: Pki, tmp_path: Path, topic_prefix: str, started: list[AgentProcess]
) -> None:
    agent = bad_password_agent(tmp_path, topic_prefix, tls_mosquitto, pki)
    started.append(agent)
    wait_for(lambda: len(log_lines(agent, REFUSED, "DEBUG")) >= 3, 10, "3 refused attempts logged at DEBUG", agent)
    errors = log_lines(agent, REFUSED, "ERROR")
    assert agent.terminate() == 0
    assert len(errors) == 1, "\n".join(errors)


# ---- c: a CA that did not sign the broker's certificate --------------------------------------------

VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"


def test_untrusted_broker_certificate_is_reported_and_retried(
    tls_mosquitto: MosquittoProcess, pki: Pki, tmp_path: Path, topic_prefix: str, started: list[AgentProcess]
) -> None:
    agent = AgentProcess(tmp_path / "agents", "wrongca", tls_url(tls_mosquitto), topic_prefix,
                         broker={**tls_settings(pki, ca=pki.other_ca), **FAST_RETRY}).start()
    started.append(agent)
    wait_for(lambda: len(log_lines(agent, VERIFY_FAILED, "DEBUG")) >= 3, 10,
             "3 failed TLS handshakes logged at DEBUG", agent)
    warnings = log_lines(agent, VERIFY_FAILED, "WARNING")
    assert warnings, agent.log()
    assert f"cannot connect to {tls_url(tls_mosquitto)}: " in warnings[0], warnings[0]
    assert "certificate verify failed" in warnings[0], warnings[0]
    assert not log_lines(agent, VERIFY_FAILED, "ERROR")
    assert agent.alive
    assert agent.metric("hasync_mqtt_connect_failures_total", kind="connection") >= 4
    assert_disconnected(agent)
    assert agent.promotions() == []
    assert agent.terminate() == 0


# ---- d: JSON logs -----------------------------------------------------------------------------------


def test_json_log_format_writes_one_object_per_line(
    mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str, started: list[AgentProcess]
) -> None:
    agent = AgentProcess(tmp_path / "agents", "solo", mosquitto.url, topic_prefix, log={"format": "json"}).start()
    started.append(agent)
    wait_for(agent.promotions, 10, "the only agent to become primary", agent)
    wait_for(lambda: "PRIMARY" in agent.log(), 5, "the PRIMARY log line", agent)
    assert agent.terminate() == 0

    records = []
    for number, line in enumerate(agent.log().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"log line {number} is not JSON ({exc}): {line!r}") from None
        assert isinstance(record, dict), f"log line {number} is not an object: {line!r}"
        assert {"ts", "level", "logger", "msg"} <= record.keys(), f"log line {number}: {line!r}"
        records.append(record)
    assert any("PRIMARY" in r["msg"] for r in records), records
    assert {r["level"] for r in records} >= {"DEBUG", "INFO", "WARNING"}, {r["level"] for r in records}
