"""State sync through real Home Assistant: a helper changed in HA A, until HA B holds the same value.

Two Home Assistant instances (``harness/ha.py``) on one Mosquitto, an agent beside each with the HA link and
default sync (the helper domains). Each run sets ``input_number.test_level`` in HA A to a new value with a
service call, as a user would, and waits for HA B to show it. The latency is HA B's ``last_changed`` minus
HA A's (both HA's own timestamps, on this machine's one wall clock): A's state change, A's websocket event to
its agent, the record through the broker, B's agent, ``scene.apply`` in B, B's state change.
"""

from __future__ import annotations

import functools
import time
import traceback
from datetime import datetime
from typing import Any

from harness.agents import AgentProcess, Cluster
from harness.brokers import MosquittoProcess
from harness.ha import HomeAssistant, ha_installed, start_home_assistants, stop_home_assistants
from harness.wait import wait_until

from .registry import Context, scenario
from .report import Result, Row

ENTITY = "input_number.test_level"


def _changed(state: dict[str, Any]) -> float:
    return datetime.fromisoformat(state["last_changed"]).timestamp()


def _ready(agent: AgentProcess) -> bool:
    status = agent.status()
    return bool((status.get("sync") or {}).get("synced") and (status.get("home_assistant") or {}).get("healthy"))


def _holds(ha: Any, value: str) -> dict[str, Any] | None:
    state: dict[str, Any] | None = ha.get_state(ENTITY)
    return state if state is not None and state["state"] == value else None


@scenario("sync-ha", "state sync through real Home Assistant, Mosquitto", modes=("full",))
def sync_ha(ctx: Context) -> Result:
    name = "sync-ha"
    runs = ctx.runs(5, 30)
    result = Result(name, "state sync through real Home Assistant, Mosquitto", (__doc__ or "").split("\n\n")[1]
                    .replace("\n", " ") + f" {runs} runs.")
    if not ha_installed():
        result.rows.append(Row("HA A change → same value in HA B", "ms",
                               pending="TODO: not run, Home Assistant not installed (scripts/setup-ha.sh)"))
        return result
    workdir = ctx.workdir / name
    broker = MosquittoProcess(workdir / "broker")
    has: dict[str, HomeAssistant] = {}
    samples: list[float] = []
    started = time.monotonic()
    broker.start()
    try:
        has = start_home_assistants(workdir, ["ha_a", "ha_b"], broker.port)
        cluster = Cluster(workdir / "agents", broker.url, f"bench{time.monotonic_ns()}")
        try:
            for priority, (node, ha) in zip((200, 100), has.items(), strict=True):
                cluster.add(node, priority=priority, log={"level": "INFO"},
                            homeassistant={"discovery": False, "url": ha.url, "token": ha.token})
            for node, agent in cluster.agents.items():
                wait_until(functools.partial(_ready, agent), 60, f"{node}'s sync and HA link")
            a, b = has["ha_a"], has["ha_b"]
            for i in range(runs):
                value = f"{(i % 90) + 1}.0"
                [changed] = [s for s in a.call_service("input_number", "set_value",
                                                       {"entity_id": ENTITY, "value": float(value)})
                             if s["entity_id"] == ENTITY]
                mirrored = wait_until(functools.partial(_holds, b, value), 10, f"{ENTITY} = {value} in HA B", step=0.01)
                samples.append((_changed(mirrored) - _changed(changed)) * 1000)
            ctx.log(f"{name}: {runs} runs, median {sorted(samples)[len(samples) // 2]:.1f} ms")
        finally:
            cluster.stop_all()
    except Exception as exc:
        result.failures.append(f"aborted after {len(samples)} runs: {exc!r}")
        ctx.log(f"{name} FAILED: {traceback.format_exc()}")
    finally:
        stop_home_assistants(has)
        broker.stop()
    result.seconds = time.monotonic() - started
    result.rows.append(Row("HA A change → same value in HA B (HA's last_changed)", "ms", samples))
    return result
