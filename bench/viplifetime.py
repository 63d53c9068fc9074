"""A fenced floating IP's lifetime (hasync.vip, "Lifetimes"): what the kernel does with it, what refreshing
it costs, and how often it lapses on a primary starved of CPU.

* **The kernel**: an address added with a lifetime of one second, at a random phase against the second;
  when ``ip monitor``-style notifications say it went, minus one second. Plainly, and with another address
  of the namespace changed 0.1 s before the end (the kernel then checks again only a second after that
  change): the two cases ``hasync.config.ADDRESS_LIFETIME_LAG`` covers. In a namespace of its own, by a
  child process (``python -m bench.viplifetime probe``) using pyroute2's synchronous API.
* **A refresh**: the CPU time of one ``PyRoute2Netlink.refresh`` (as the agent makes it: a netlink socket, the
  interface looked up, ``RTM_NEWADDR`` with replace), over 200 calls; the agent makes one per fenced address
  per renewal that comes back (defaults: 2 per second).
* **Lapses under load**: two agents (production timings, one fenced address) in namespaces with Mosquitto,
  busy loops beside them (twice as many as cores, eight times in the full mode) for the window; the primary's
  ``hasync_vip_lapses_total``, late refreshes and renew-deadline demotions.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

from harness import netns
from harness.agents import Cluster
from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.wait import free_port, wait_until
from hasync.config import VipAddress
from hasync.vip import Lifetime, PyRoute2Netlink

from .cluster import production_settings
from .registry import Context, scenario
from .report import Result, Row

NAME = "vip-lifetime"
TITLE = "a fenced floating IP's kernel lifetime: the kernel's lateness, a refresh's cost, lapses under CPU load"
PROBE_INTERFACE = "eth0"


# ---- the child: run inside a namespace -----------------------------------------------------------------


def _probe(runs: int) -> dict[str, list[float]]:
    ipr, monitor = IPRoute(), IPRoute()
    monitor.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
    index = ipr.link_lookup(ifname=PROBE_INTERFACE)[0]
    found: dict[str, list[float]] = {}
    for family, address, other, extra in (("IPv4", "192.0.2.10", "192.0.2.11", {}),
                                          ("IPv6", "2001:db8::10", "2001:db8::11", {"flags": 0x02})):
        plen = 32 if family == "IPv4" else 128
        for changed in (False, True):
            key = f"{family}{', another address changed 0.1 s before the end' if changed else ''}"
            for _ in range(runs):
                time.sleep(random.uniform(0, 1))  # a random phase against the kernel's whole seconds
                ipr.addr("replace", index=index, address=address, prefixlen=plen, valid_lft=1, preferred_lft=1,
                         **extra)
                added = time.monotonic()
                if changed:
                    time.sleep(0.9)
                    ipr.addr("replace", index=index, address=other, prefixlen=plen, **extra)
                gone = None
                while gone is None and time.monotonic() < added + 5:
                    for msg in monitor.get():
                        if msg["event"] == "RTM_DELADDR" and msg.get_attr("IFA_ADDRESS") == address:
                            gone = time.monotonic()
                if gone is not None:
                    found.setdefault(key, []).append((gone - added - 1) * 1000)
                if changed:
                    ipr.addr("del", index=index, address=other, prefixlen=plen)
    return found


def _cost(calls: int) -> float:
    async def run() -> float:
        netlink = PyRoute2Netlink()
        vip = VipAddress(address="192.0.2.20/24", interface=PROBE_INTERFACE)
        await netlink.add(vip, Lifetime(time.monotonic() + 100))
        cpu = time.process_time()
        for _ in range(calls):
            await netlink.refresh(vip, Lifetime(time.monotonic() + 100))
        cpu = time.process_time() - cpu
        await netlink.remove(vip)
        return cpu / calls * 1000

    return asyncio.run(run())


# ---- the scenario -------------------------------------------------------------------------------------------


def _child(lan: netns.Lan, *args: str) -> Any:
    out = subprocess.run([*lan.prefix("k"), sys.executable, "-m", "bench.viplifetime", *args], capture_output=True,
                         text=True, timeout=900, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout)


@contextmanager
def _busy(lan: netns.Lan, node: str, count: int) -> Iterator[None]:
    hogs = [subprocess.Popen([*lan.prefix(node), sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _lapses(ctx: Context, window: float, hogs: int) -> dict[str, float]:
    with netns.Lan(["n1", "n2"]) as lan:
        port = free_port()
        vip = f"10.213.{lan.gateway.split('.')[2]}.50/24"
        workdir = ctx.workdir / NAME
        with MosquittoProcess(workdir / "broker", port=port, extra_config=[f"listener {port} {lan.gateway}"]):
            cluster = Cluster(workdir / "agents", f"mqtt://{lan.gateway}:{port}", f"lifetime-{port}")
            try:
                for node, priority in (("n1", 200), ("n2", 100)):
                    cluster.add(node, priority=priority, command_prefix=lan.prefix(node),
                                http={"host": lan.addresses[node]}, vip=[{"address": vip, "interface": "eth0"}],
                                **production_settings())
                leader = cluster.wait_for_leader(60)
                agent = cluster.agents[leader]
                wait_until(lambda: agent.metric("hasync_vip_refreshes_total") > 0, 10, "a refresh")

                def counts() -> dict[str, float]:
                    return {"refreshes": agent.metric("hasync_vip_refreshes_total"),
                            "lapses": agent.metric("hasync_vip_lapses_total"),
                            "late": agent.metric("hasync_vip_errors_total", operation="refresh", error="late"),
                            "deadline": agent.metric("hasync_demotions_total", cause="renew_deadline")}

                before = counts()
                ctx.log(f"{NAME}: {leader} primary; {hogs} busy loops beside it for {window:.0f} s")
                with _busy(lan, leader, hogs):
                    time.sleep(window)  # the measured window (nothing to wait for: counting what happens)
                after = counts()
                cluster.check_invariants()
            finally:
                cluster.stop_all()
    return {k: after[k] - before[k] for k in after}


@scenario(NAME, TITLE)
def vip_lifetime(ctx: Context) -> Result:
    result = Result(NAME, TITLE, __doc__ or "")
    why = netns.available() or (None if mosquitto_binary() else "mosquitto is not installed")
    if why is not None:
        result.rows.append(Row("kernel: lifetime end to removal", "ms", pending=f"TODO: not run, {why}"))
        return result
    runs = ctx.runs(5, 20)
    with netns.Lan(["k"]) as lan:
        for key, late in _child(lan, "probe", str(runs)).items():
            result.rows.append(Row(f"kernel: lifetime end to removal, {key}", "ms", late))
        cost = [_child(lan, "cost", "200") for _ in range(3)]
    result.rows.append(Row("one refresh (socket, interface lookup, RTM_NEWADDR replace), CPU", "ms", cost))
    window = 300.0 if ctx.full else 60.0
    hogs = (8 if ctx.full else 2) * len(os.sched_getaffinity(0))
    counted = _lapses(ctx, window, hogs)
    hours = window / 3600
    result.rows.append(Row(f"primary with {hogs} busy loops beside it: refreshes", "per s",
                           [counted["refreshes"] / window]))
    for key, what in (("lapses", "lifetime ended while primary"), ("late", "refresh too late for a second"),
                      ("deadline", "renew-deadline demotions")):
        result.rows.append(Row(f"primary with {hogs} busy loops beside it: {what}", "per hour", [counted[key] / hours]))
    result.notes.append(f"lapses under load: one window of {window:.0f} s; counts {json.dumps(counted)}")
    return result


if __name__ == "__main__":
    command, count = sys.argv[1], int(sys.argv[2])
    print(json.dumps(_probe(count) if command == "probe" else _cost(count)))
