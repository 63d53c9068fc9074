"""``hasync demo``: an embedded broker, a few agents as real processes, a crash and a handover.

Timings come from the agents' own event logs (monotonic clock, shared by processes on one machine):
failover is measured from the kill to the new primary's promotion, i.e. its claim seen echoed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .audit import overlaps, read_events, tenures
from .broker import EmbeddedBroker
from .config import BrokerConfig
from .status import ClusterView, send_step_down, watch
from .topics import Topics

CLUSTER = "demo"


@dataclass
class DemoNode:
    name: str
    priority: int
    events: Path
    log: Path
    http_port: int = 0
    process: asyncio.subprocess.Process | None = None

    def read_events(self) -> list[dict[str, Any]]:
        return read_events(self.events)


@dataclass
class Demo:
    console: Console
    live: bool
    deadline: float
    http: aiohttp.ClientSession
    nodes: list[DemoNode] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.console.print(f"[bold cyan]demo[/] {text}")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _table(view: ClusterView) -> Table:
    table = Table(title="hasync demo cluster (live)")
    for col in ("node", "role", "term", "priority", "healthy"):
        table.add_column(col)
    for row in view.rows(time.monotonic()):
        style = "bold green" if row["role"] == "primary" else ("red" if row["role"] == "offline" else "")
        table.add_row(row["node"], row["role"], str(row["term"]), str(row["priority"]),
                      "yes" if row["healthy"] else "no", style=style)
    return table


async def _wait_for(predicate: Any, timeout: float, step: float = 0.02) -> bool:
    async with asyncio.timeout(max(timeout, 0.0)):
        while not predicate():
            await asyncio.sleep(step)
    return True


def _promotions(nodes: list[DemoNode], after: float) -> list[dict[str, Any]]:
    events = [e for n in nodes for e in n.read_events() if e["event"] == "promote" and e["t"] > after]
    return sorted(events, key=lambda e: e["t"])


async def _next_promotion(demo: Demo, after: float, timeout: float, failure: str) -> dict[str, Any] | None:
    """The first promotion after ``after`` (monotonic), or None (said as ``failure``) if none in time."""
    try:
        await _wait_for(lambda: _promotions(demo.nodes, after), min(timeout, demo.remaining()))
    except TimeoutError:
        demo.say(f"[red]{failure}[/]")
        return None
    return _promotions(demo.nodes, after)[0]


def _overlaps(nodes: list[DemoNode], end: float, deaths: dict[str, float]) -> list[str]:
    events = [e for n in nodes for e in read_events(n.events)]
    pairs = overlaps(tenures(events, end, deaths))
    return [f"{a.node} (term {a.term}) and {b.node} (term {b.term})" for a, b in pairs]


async def run_demo(nodes: int = 3, duration: float | None = None) -> int:
    console = Console()
    interactive = duration is None and sys.stdout.isatty()
    with tempfile.TemporaryDirectory(prefix="hasync-demo-") as tmp:
        # One HTTP session for every call to the agents' sync API (set and read entities), a connection per
        # call: the demo pauses longer than an agent keeps an idle connection open (hasync.http).
        connector = aiohttp.TCPConnector(force_close=True)
        async with (EmbeddedBroker(host="127.0.0.1", port=0) as broker,
                    aiohttp.ClientSession(connector=connector) as http):
            demo = Demo(console, live=interactive, deadline=time.monotonic() + (duration or 120.0), http=http)
            url = f"mqtt://127.0.0.1:{broker.port}"
            demo.say(f"embedded amqtt broker on {url}")
            demo.nodes = [
                DemoNode(f"node-{i + 1}", 100 - 10 * i, Path(tmp) / f"node-{i + 1}.events",
                         Path(tmp) / f"node-{i + 1}.log")
                for i in range(nodes)
            ]
            try:
                return await _scenario(demo, url)
            finally:
                await _stop_all(demo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _start(node: DemoNode, url: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    node.http_port = _free_port()
    # Entity sync with the memory backend: each agent holds the "helpers" a user sets through its HTTP API.
    config = node.events.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({"sync": {"backend": "memory"}, "homeassistant": {"discovery": False}}))
    with node.log.open("w") as log:
        node.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hasync", "agent", "--config", str(config), "--broker", url, "--cluster", CLUSTER,
            "--node-id", node.name, "--priority", str(node.priority), "--http-port", str(node.http_port),
            "--events-file", str(node.events), "--log-level", "INFO",
            stdout=log, stderr=log, env=env,
        )


async def _set_entity(http: aiohttp.ClientSession, node: DemoNode, entity_id: str, state: str) -> None:
    async with http.put(
        f"http://127.0.0.1:{node.http_port}/sync/entities", data=json.dumps({entity_id: {"state": state}})
    ) as response:
        response.raise_for_status()


async def _entity(http: aiohttp.ClientSession, node: DemoNode, entity_id: str) -> str | None:
    try:
        async with http.get(
            f"http://127.0.0.1:{node.http_port}/sync/entities"
        ) as response:
            value = (await response.json()).get(entity_id)
    except aiohttp.ClientError:
        return None
    return value.get("state") if isinstance(value, dict) else None


async def _sync(demo: Demo, source: DemoNode, entity_id: str, state: str) -> bool:
    """Set an entity on ``source`` as a user would; say how long until every other live node holds it."""
    others = [n for n in demo.nodes if n is not source and n.process and n.process.returncode is None]
    started = time.monotonic()
    await _set_entity(demo.http, source, entity_id, state)
    try:
        async with asyncio.timeout(min(10, demo.remaining())):
            while True:
                values = await asyncio.gather(*(_entity(demo.http, n, entity_id) for n in others))
                if all(v == state for v in values):
                    break
                await asyncio.sleep(0.005)
    except TimeoutError:
        demo.say(f"[red]{entity_id} = {state} did not reach every node in time[/]")
        return False
    took = (time.monotonic() - started) * 1000
    demo.say(f"[green]state sync:[/] {entity_id} = {state} set on {source.name}, on "
             f"{', '.join(n.name for n in others)} within {took:.0f} ms (polled over HTTP)")
    demo.results.append((f"state sync from {source.name}", f"{entity_id} = {state} everywhere in {took:.0f} ms"))
    return True


async def _stop_all(demo: Demo) -> None:
    for node in demo.nodes:
        if node.process and node.process.returncode is None:
            node.process.send_signal(signal.SIGTERM)
    for node in demo.nodes:
        if node.process and node.process.returncode is None:
            try:
                async with asyncio.timeout(10):
                    await node.process.wait()
            except TimeoutError:
                node.process.kill()
                await node.process.wait()


async def _scenario(demo: Demo, url: str) -> int:
    topics = Topics("hasync", CLUSTER)
    view = ClusterView(topics)
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(BrokerConfig(url=url), topics, view, stop), name="demo.watch")
    live = Live(_table(view), console=demo.console, refresh_per_second=8) if demo.live else None
    ok = True
    try:
        if live:
            live.start()
        for node in demo.nodes:
            await _start(node, url)
        demo.say(f"started {len(demo.nodes)} agents (priorities "
                 f"{', '.join(str(n.priority) for n in demo.nodes)}); each observes a full lease first")

        async def refresh() -> None:
            while True:
                if live:
                    live.update(_table(view))
                await asyncio.sleep(0.125)

        refresher = asyncio.create_task(refresh(), name="demo.refresh")
        t0 = time.monotonic()
        first = await _next_promotion(demo, 0, 20, "no primary was elected in time")
        if first is None:
            return 1
        leader = next(n for n in demo.nodes if n.name == first["node"])
        demo.say(f"[green]{leader.name} is primary[/] (term {first['term']}), "
                 f"{first['t'] - t0:.2f} s after start")
        demo.results.append(("first election", f"{leader.name}, {first['t'] - t0:.2f} s after start"))

        # Give the others a moment to see the leader; a user switches a helper on the primary; crash it.
        await _wait_for(lambda: len([r for r in view.rows(time.monotonic()) if r["role"] == "standby"])
                        >= len(demo.nodes) - 1, min(10, demo.remaining()))
        if not await _sync(demo, leader, "input_boolean.porch_light", "on"):
            return 1
        demo.say(f"[red]kill -9 {leader.name}[/] (pid {leader.process.pid if leader.process else '?'})")
        t_kill = time.monotonic()
        assert leader.process is not None
        leader.process.kill()
        await leader.process.wait()
        promo = await _next_promotion(demo, t_kill, 15, "no failover in time")
        if promo is None:
            return 1
        failover = promo["t"] - t_kill
        demo.say(f"[green]failover: {promo['node']} is primary[/] (term {promo['term']}) "
                 f"{failover * 1000:.0f} ms after the kill")
        demo.results.append(("crash failover (kill -9)", f"{failover * 1000:.0f} ms -> {promo['node']}"))
        successor = next(n for n in demo.nodes if n.name == promo["node"])
        held = await _entity(demo.http, successor, "input_boolean.porch_light")
        demo.say(f"the new primary {successor.name} holds input_boolean.porch_light = {held}")
        demo.results.append(("state after the failover", f"{successor.name}: input_boolean.porch_light = {held}"))
        if held != "on":
            return 1

        new_leader = promo["node"]
        await asyncio.sleep(0.5)  # let the dashboard show the new state before the handover
        demo.say(f"graceful handover: asking {new_leader} to step down (as before an update)")
        t_step = time.monotonic()
        await send_step_down(BrokerConfig(url=url), topics, new_leader, None)
        promo2 = await _next_promotion(demo, t_step, 10, "no handover in time")
        if promo2 is None:
            return 1
        handover = promo2["t"] - t_step
        demo.say(f"[green]handover: {promo2['node']} is primary[/] (term {promo2['term']}) "
                 f"{handover * 1000:.0f} ms after the request")
        demo.results.append(("graceful handover", f"{handover * 1000:.0f} ms -> {promo2['node']}"))
        standby = next((n for n in demo.nodes if n.name != promo2["node"] and n is not leader), None)
        if standby is not None and not await _sync(demo, standby, "input_number.thermostat", "21.5"):
            return 1
        await asyncio.sleep(0.5)
        refresher.cancel()

        both = _overlaps(demo.nodes, time.monotonic(), {leader.name: t_kill})
        demo.results.append(("two primaries at once", "never" if not both else "; ".join(both)))
        ok = not both
    finally:
        if live:
            live.stop()
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watcher, 3)
    summary = Table(title="hasync demo summary")
    summary.add_column("step")
    summary.add_column("result")
    for step, result in demo.results:
        summary.add_row(step, result)
    demo.console.print(summary)
    if not ok:
        demo.say("[red]FAILED[/]: agent logs are in the demo's temporary folder (removed on exit)")
    return 0 if ok else 1
