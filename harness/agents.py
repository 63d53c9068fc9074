"""hasync agents as real child processes, for integration tests.

Each agent gets a generated YAML config, its own HTTP port and an events file (role changes with
monotonic timestamps). ``Cluster`` starts several and checks the election's invariants on their logs.
Every wait is bounded and polls for the event it waits for.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from hasync.audit import decreasing_terms, overlaps, read_events, tenures, terms_with_two_winners
from hasync.config import BrokerConfig
from hasync.messages import LeaseRecord, MessageError, parse
from hasync.topics import Topics

from .wait import free_port, wait_until

FAST_ELECTION = {
    "lease_duration": 1.5,
    "renew_deadline": 1.0,
    "renew_interval": 0.25,
    "heartbeat_interval": 0.5,
    "claim_stagger": 0.1,
    "preempt_delay": 1.0,
}
# A fenced floating IP's lifetime (whole seconds, ended by the kernel up to 1.25 s late) needs a longer lease
# (hasync.config: AgentConfig._fenced_lifetime): agents with one get these unless a test sets its own.
FAST_FENCED_ELECTION = {**FAST_ELECTION, "lease_duration": 2.75, "renew_deadline": 1.5}


class _NoDelayConnection(http.client.HTTPConnection):
    """Nagle's algorithm off. http.client writes a request's head and its body separately; on a kept-alive
    connection the body would then wait for the server's delayed acknowledgement of the head (up to 40 ms)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MemoryApi:
    """A client of an agent's memory-backend API (``hasync.sync.memory``), on one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = _NoDelayConnection("127.0.0.1", port, timeout=30)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> MemoryApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Status and body, whatever they are (to test what the API refuses)."""
        for attempt in range(2):
            try:
                self.conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The agent closed the kept-alive connection while it was idle (hasync.http's REQUEST_TIMEOUT)
                # before reading the request: sent again on a new connection, once, as HTTP clients do.
                self.conn.close()
                if attempt:
                    raise
            except (OSError, http.client.HTTPException):
                self.conn.close()  # reconnects on the next request
                raise
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.raw(method, path, None if body is None else json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {payload[:200]!r}")
        return json.loads(payload) if payload else None

    def put(self, values: dict[str, str]) -> None:
        """Change entities as a user would in HA: ``{entity_id: state}``."""
        self.request("PUT", "/sync/entities", {e: {"state": v} for e, v in values.items()})

    def entities(self) -> dict[str, str]:
        """``{entity_id: state}`` of every entity the agent holds."""
        result: dict[str, dict[str, Any]] = self.request("GET", "/sync/entities")
        return {e: v["state"] for e, v in result.items()}

    def applied(self, after: int = 0) -> list[dict[str, Any]]:
        """One page of the apply log after ``seq``: each entry's seq, entity_id, state and monotonic time."""
        result: list[dict[str, Any]] = self.request("GET", f"/sync/applied?after={after}")
        return result

    def all_applied(self) -> list[dict[str, Any]]:
        """Every entry of the apply log, page by page."""
        entries: list[dict[str, Any]] = []
        while page := self.applied(entries[-1]["seq"] if entries else 0):
            entries.extend(page)
        return entries

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result


class AgentProcess:
    def __init__(self, workdir: Path, node: str, broker_url: str, prefix: str, *,
                 command_prefix: Sequence[str] = (), new_session: bool = False, **settings: Any) -> None:
        """``command_prefix``: what runs the agent's command (e.g. ``ip netns exec NS``, harness.netns).
        ``new_session``: the agent runs in a session of its own, so the scheduler (autogroup) shares the CPU
        with it as with a separate service, not as one more process of the test's."""
        self.node = node
        self.command_prefix = list(command_prefix)
        self.new_session = new_session
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.events_path = workdir / f"{node}.events"
        self.log_path = workdir / f"{node}.log"
        self.config_path = workdir / f"{node}.yaml"
        self.http_port = free_port()
        config: dict[str, Any] = {
            "node_id": node,
            "cluster": "test",
            "topic_prefix": prefix,
            "broker": {"url": broker_url, "keepalive": 2, "reconnect_min": 0.05, "reconnect_max": 0.5},
            "election": dict(FAST_ELECTION),
            "http": {"port": self.http_port},
            # The fast timings above are too short for HA's whole-second expire_after.
            "homeassistant": {"discovery": False},
            "log": {"level": "DEBUG"},
            "events_file": str(self.events_path),
        }
        if "profile" in settings.get("election", {}):
            del config["election"]  # a timing profile replaces the test timings (the agent resolves it)
        elif "election" not in settings and any(v.get("on_broker_loss", "fenced") == "fenced"
                                              for v in settings.get("vip", [])):
            config["election"] = dict(FAST_FENCED_ELECTION)
        for key, value in settings.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.config_path.write_text(yaml.safe_dump(config))
        self.http_host = config["http"].get("host", "127.0.0.1")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "hasync", "agent", "--config", str(self.config_path)],
            stdout=log, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=self.new_session,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time of the kill."""
        t = time.monotonic()
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(10)
        return t

    def terminate(self, timeout: float = 15) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.node} did not exit within {timeout} s of SIGTERM; its stacks:\n{self.stacks()}")
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def stacks(self) -> str:
        """Python stacks of the running agent, if py-spy is installed (for diagnosing hangs)."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            return "(py-spy not installed)"
        result = subprocess.run([str(spy), "dump", "--locals", "--pid", str(self.pid)], capture_output=True,
                                text=True, timeout=30, check=False)
        return result.stdout + result.stderr

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.events_path)

    def promotions(self, after: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "promote" and e["t"] > after]

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.http_host}:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""  # not listening (yet, or any more)

    def memory(self) -> MemoryApi:
        """A client of its memory-backend API (close it, or use it as a context manager)."""
        return MemoryApi(self.http_port)

    def status(self) -> dict[str, Any]:
        """The agent's /healthz document; empty while it is not serving HTTP."""
        code, body = self.http("/healthz")
        return json.loads(body) if code else {}

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples matching the labels (0 if absent)."""
        _, text = self.http("/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    def __init__(self, workdir: Path, broker_url: str, prefix: str) -> None:
        self.workdir = workdir
        self.broker_url = broker_url
        self.prefix = prefix
        self.agents: dict[str, AgentProcess] = {}
        self.deaths: dict[str, float] = {}  # each node's last kill -9
        self.kills: dict[str, list[float]] = {}  # all of them (a node killed, started again, killed again)

    def add(self, node: str, **settings: Any) -> AgentProcess:
        agent = AgentProcess(self.workdir, node, self.broker_url, self.prefix, **settings)
        self.agents[node] = agent
        return agent.start()

    def kill(self, node: str) -> float:
        """kill -9 a node's agent; its tenure, if any, ends at that instant."""
        t = self.agents[node].kill()
        self.deaths[node] = t
        self.kills.setdefault(node, []).append(t)
        return t

    def all_events(self) -> list[dict[str, Any]]:
        return [e for a in self.agents.values() for e in a.events()]

    def leaders_since(self, after: float) -> list[dict[str, Any]]:
        return sorted((e for a in self.agents.values() for e in a.promotions(after)), key=lambda e: e["t"])

    def current_leader(self) -> str | None:
        """The node whose latest promotion is not followed by a demotion, if exactly one."""
        now = time.monotonic()
        acting = [t.node for t in tenures(self.all_events(), now, self.kills) if t.end >= now]
        return acting[0] if len(acting) == 1 else None

    def wait_for_leader(self, timeout: float = 10, after: float = 0.0, exclude: str | None = None) -> str:
        def found() -> str | None:
            leaders = [e for e in self.leaders_since(after) if e["node"] != exclude]
            return leaders[0]["node"] if leaders else None

        return wait_until(found, timeout, f"a new primary (after t={after:.2f})")

    def check_invariants(self) -> None:
        # An agent just woken from SIGSTOP may not have logged its (past) demotion yet; two answers
        # from its event loop mean its timers have run since it woke.
        for agent in self.agents.values():
            if agent.alive:
                agent.status()
                agent.status()
        events = self.all_events()
        now = time.monotonic()
        both = overlaps(tenures(events, now, self.kills))
        assert not both, f"two primaries at once: {both}"
        assert not terms_with_two_winners(events), terms_with_two_winners(events)
        assert not decreasing_terms(events), decreasing_terms(events)

    def stop_all(self) -> None:
        """SIGTERM every agent; each that does not exit in time is killed, then the first failure raised."""
        errors: list[BaseException] = []
        for agent in self.agents.values():
            if agent.alive:
                try:
                    agent.terminate()
                except subprocess.TimeoutExpired as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    def logs(self) -> str:
        return "\n".join(f"==== {n}\n{a.log()[-6000:]}" for n, a in self.agents.items())


@contextlib.contextmanager
def checked_cluster(workdir: Path, broker_url: str, prefix: str) -> Iterator[Cluster]:
    """A cluster whose invariants are checked when the block ends, with its logs printed on failure."""
    cluster = Cluster(workdir, broker_url, prefix)
    try:
        yield cluster
        cluster.check_invariants()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


class TopicRecorder:
    """Records every message on ``topic_filter`` with its local receive time (monotonic), from a paho client
    on its own thread: the tests using it are synchronous."""

    def __init__(self, broker_url: str, topic_filter: str) -> None:
        cfg = BrokerConfig(url=broker_url)
        self.messages: list[tuple[float, str, bytes]] = []
        self._subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"recorder-{time.monotonic_ns()}")
        client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = lambda _c, _u, m: self.messages.append((time.monotonic(), m.topic, bytes(m.payload)))
        user, password = cfg.credentials
        if user is not None:
            client.username_pw_set(user, password)
        client.connect(cfg.host, cfg.port)
        client.loop_start()
        self._client = client
        wait_until(self._subscribed.is_set, 10, f"the recorder to subscribe to {topic_filter}")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseRecorder(TopicRecorder):
    """Every valid lease record on the broker, with its receive time."""

    def __init__(self, broker_url: str, prefix: str, cluster: str = "test") -> None:
        super().__init__(broker_url, Topics(prefix, cluster).lease)

    @property
    def records(self) -> list[tuple[float, LeaseRecord]]:
        records = []
        for t, _, payload in list(self.messages):
            with contextlib.suppress(MessageError):
                records.append((t, parse(LeaseRecord, payload)))
        return records
