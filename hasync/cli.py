"""The ``hasync`` command line: a thin layer that parses into the config and calls the library."""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal, NoReturn

import click

from . import signing
from .config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from .logs import setup_logging
from .topics import Topics
from .transport import MqttFailure

logger = logging.getLogger("hasync")


def _load(config: Path | None, overrides: dict[tuple[str, ...], Any]) -> AgentConfig:
    """The config file given, else /etc/hasync/hasync.yaml if it exists; then environment and flags."""
    if config is None and DEFAULT_CONFIG_PATH.is_file():
        config = DEFAULT_CONFIG_PATH
    try:
        return load_config(config, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"hasync: {exc}", err=True)
        sys.exit(2)


def _load_addon() -> AgentConfig:
    from . import supervisor

    try:
        options = supervisor.read_options(Path(os.environ.get("HASYNC_ADDON_OPTIONS", supervisor.OPTIONS)))
        hooks = Path(os.environ.get("HASYNC_ADDON_HOOKS", supervisor.HOOK_DIR))
        return asyncio.run(supervisor.configure(options, os.environ, hook_dir=hooks))
    except ConfigError as exc:
        _fail(str(exc), 2)
    except supervisor.SupervisorError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"hasync: {message}", err=True)
    sys.exit(code)


_common = [
    click.option("--config", "-c", "config", type=click.Path(path_type=Path),
                 help=f"YAML config file [default: {DEFAULT_CONFIG_PATH} if it exists]."),
    click.option("--broker", help="Broker URL, mqtt://host:port or mqtts://host:port [HASYNC_BROKER]."),
    click.option("--cluster", help="Cluster name [HASYNC_CLUSTER]."),
    click.option("--topic-prefix", help="Topic prefix (default hasync) [HASYNC_TOPIC_PREFIX]."),
]


def common(func: Any) -> Any:
    for option in reversed(_common):
        func = option(func)
    return func


@click.group()
@click.version_option(package_name="hasync")
def main() -> None:
    """High availability for Home Assistant: one agent per node, leader election over MQTT."""


@main.command()
@common
@click.option("--node-id", help="This node's id [HASYNC_NODE_ID]; default: the host name.")
@click.option("--priority", type=int, help="Election priority, higher wins [HASYNC_PRIORITY].")
@click.option("--http-port", type=int, help="Port of /healthz, /role, /metrics; 0 picks one [HASYNC_HTTP_PORT].")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="[HASYNC_LOG_FORMAT]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), help="[HASYNC_LOG_LEVEL]")
@click.option("--events-file", type=click.Path(path_type=Path), help="Append role changes as JSON lines.")
@click.option("--addon", is_flag=True,
              help="Run as a Home Assistant add-on: options from /data/options.json, HA and the broker from the "
                   "Supervisor (other options are ignored).")
def agent(
    config: Path | None, broker: str | None, cluster: str | None, topic_prefix: str | None,
    node_id: str | None, priority: int | None, http_port: int | None, log_format: str | None,
    log_level: str | None, events_file: Path | None, addon: bool,
) -> None:
    """Run the agent on this node."""
    if addon:
        cfg = _load_addon()
    else:
        cfg = _load(config, {
            ("broker", "url"): broker, ("cluster",): cluster, ("topic_prefix",): topic_prefix,
            ("node_id",): node_id, ("priority",): priority, ("http", "port"): http_port,
            ("log", "format"): log_format, ("log", "level"): log_level, ("events_file",): events_file,
        })
    setup_logging(cfg.log.format, cfg.log.level)
    from .agent import Agent, AgentError

    async def run() -> None:
        node = Agent(cfg)
        tune_gc()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
        logger.info("hasync agent %s starting: cluster %s, priority %d, broker %s",
                    cfg.node_id, cfg.cluster, cfg.priority, cfg.broker.redacted_url())
        async with node:
            # What start-up made (modules, the config, the connections) lives as long as the process: out of
            # the collector's sight, its full collections need not walk it again and again. Each one is a pause
            # of the whole agent, which a primary in the fast timing profile cannot afford to let grow.
            gc.freeze()
            await node.wait()
        logger.info("hasync agent %s stopped", cfg.node_id)

    try:
        asyncio.run(run())
    except AgentError as exc:
        _fail(f"cannot start the agent: {exc}")


# Young collections after 20,000 new container objects instead of 700, and a full one after 10 times 20 of them
# (CPython's default: 10 times 10). The agent's garbage is almost all freed by reference counting; what the
# cyclic collector costs is passes over the objects that live. Measured on two agents syncing 40,000 updates
# (10 s at 1,000/s, then 30,000 new entities flat out): with the defaults the collector took 9 % of the
# publishing agent's CPU and 13 % of the applying one's, in six full passes of 65 ms each (a pause in every
# message's path); with these thresholds and start-up's objects frozen, 3 % and 6 %, one full pass of 25 ms.
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc() -> None:
    """Set the agent's collector thresholds, and leave what start-up made (modules, models) out of every
    later pass (``gc.freeze``): it lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@main.command()
@click.option("--config", "-c", "config", type=click.Path(path_type=Path),
              help=f"YAML config file [default: {DEFAULT_CONFIG_PATH} if it exists].")
@click.option("--http-port", type=int, help="The agent's HTTP port [HASYNC_HTTP_PORT].")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for an answer.")
def healthcheck(config: Path | None, http_port: int | None, timeout: float) -> None:
    """Ask this node's agent for /healthz: exit 0 when healthy (a container's HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    cfg = _load(config, {("http", "port"): http_port})
    if not cfg.http.enabled or cfg.http.port == 0:
        _fail("the agent's HTTP endpoints are off or on a random port (http.port 0): nothing to ask")
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::", "") else cfg.http.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        _fail(f"unhealthy: {url} answered {exc.code}")
    except (OSError, ValueError) as exc:
        _fail(f"no answer from {url}: {getattr(exc, 'reason', exc)}")
    click.echo(f"healthy: {body.get('node', cfg.node_id)} is {body.get('role', 'up')}"
               if isinstance(body, dict) else "healthy")


@main.command()
@common
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--wait", type=float, default=1.5, show_default=True, help="Seconds to collect state.")
def status(
    config: Path | None, broker: str | None, cluster: str | None, topic_prefix: str | None,
    as_json: bool, wait: float,
) -> None:
    """Show the cluster's nodes, roles and leader as seen on the broker."""
    cfg = _load(config, {("broker", "url"): broker, ("cluster",): cluster, ("topic_prefix",): topic_prefix})
    from .status import snapshot

    topics = Topics(cfg.topic_prefix, cfg.cluster)
    _, keyring = _keys(cfg)
    try:
        view = asyncio.run(snapshot(cfg.broker, topics, wait, keyring))
    except MqttFailure as exc:
        click.echo(f"hasync: cannot read cluster state from {cfg.broker.redacted_url()}: {exc}", err=True)
        sys.exit(1)
    now = time.monotonic()
    if as_json:
        click.echo(json.dumps(view.to_json(now), indent=2))
        return
    columns = ("node", "role", "term", "priority", "health", "heartbeat age", "sync")
    rows: list[tuple[list[str], str | None]] = []
    for row in view.rows(now):
        failing = [name for name, up in row["checks"].items() if not up]
        health = "ok" if row["healthy"] else ("failing: " + ", ".join(failing) if failing else "not healthy")
        if row["maintenance"]:
            health += " (maintenance)"
        age = "-" if row["heartbeat_age_s"] is None else f"{row['heartbeat_wall_age_s']}s"
        alarm = row["role"] in ("offline", "fault", "unknown")
        colour = "green" if row["role"] == "primary" else ("red" if alarm else None)
        rows.append(([row["node"], row["role"], str(row["term"]), str(row["priority"]), health, age,
                      _sync_cell(row["sync"])], colour))
    _print_table(f"hasync cluster {cfg.cluster!r}", columns, rows)
    primaries = view.primaries(now)
    click.echo(f"primary: {', '.join(primaries) if primaries else 'none'}")
    if view.authenticated:
        click.echo(f"signed: every node's messages verified against the configured keys ({view.rejected} rejected)")
    else:
        click.echo(click.style("unauthenticated", fg="yellow") + ": " + (
            "no signing keys in this configuration" if keyring is None else
            "not every node signs its messages" if keyring.required else "signing.required is off"
        ) + f"; any client that may write {topics.base}/# can speak for any node (README: Signed messages)")
    if not view.nodes:
        click.echo(f"no nodes seen on {cfg.broker.redacted_url()} under {topics.base}/")


def _keys(cfg: AgentConfig) -> tuple[signing.Signer | None, signing.Keyring | None]:
    """This node's signer and the cluster's keyring when the configuration has keys (one line if unusable)."""
    if cfg.signing is None:
        return None, None
    try:
        return signing.load(cfg.node_id, cfg.signing.private_key, cfg.signing.public_keys,
                            required=cfg.signing.required)
    except signing.SigningError as exc:
        _fail(f"signing: {exc}")


def _checked_command(cfg: AgentConfig, node: str, what: Literal["step_down", "resume"], successor: str | None) -> None:
    """Send a command the cluster's state shows to make sense; one line and exit 1 otherwise."""
    from .status import CommandRefused, checked_command

    signer, keyring = _keys(cfg)
    try:
        asyncio.run(checked_command(cfg.broker, Topics(cfg.topic_prefix, cfg.cluster), node, what,
                                    successor=successor, signer=signer, keyring=keyring))
    except CommandRefused as exc:
        _fail(f"not sent: {exc}")
    except (MqttFailure, ValueError) as exc:
        _fail(f"cannot reach {cfg.broker.redacted_url()}: {exc}")


@main.command("step-down")
@common
@click.option("--node", required=True, help="The node to ask (normally the primary).")
@click.option("--to", "successor", help="Preferred successor node.")
def step_down(
    config: Path | None, broker: str | None, cluster: str | None, topic_prefix: str | None,
    node: str, successor: str | None,
) -> None:
    """Ask the primary to hand leadership over gracefully (for updates and maintenance).

    The node then holds back from taking leadership back from worse nodes (preemption) until it restarts
    or is told to with `hasync resume`."""
    _checked_command(_load(config, {("broker", "url"): broker, ("cluster",): cluster,
                                    ("topic_prefix",): topic_prefix}), node, "step_down", successor)
    click.echo(f"asked {node} to step down" + (f" to {successor}" if successor else ""))


@main.command()
@common
@click.option("--node", required=True, help="The node that stepped down.")
def resume(
    config: Path | None, broker: str | None, cluster: str | None, topic_prefix: str | None, node: str,
) -> None:
    """Let a node that stepped down take leadership back from worse nodes again (at once if it has been
    eligible for election.preempt_delay)."""
    _checked_command(_load(config, {("broker", "url"): broker, ("cluster",): cluster,
                                    ("topic_prefix",): topic_prefix}), node, "resume", None)
    click.echo(f"told {node} it may take leadership back")


@main.command()
@common
@click.option("--node", required=True, help="The retired node.")
def decommission(
    config: Path | None, broker: str | None, cluster: str | None, topic_prefix: str | None, node: str,
) -> None:
    """Remove a retired node: its retained status and its Home Assistant device and entities.

    Stop the node's agent first, or it publishes them again."""
    cfg = _load(config, {("broker", "url"): broker, ("cluster",): cluster, ("topic_prefix",): topic_prefix})
    from .status import decommission as clear

    topics = Topics(cfg.topic_prefix, cfg.cluster)
    try:
        count = asyncio.run(clear(cfg.broker, topics, node, cfg.homeassistant.discovery_prefix))
    except (MqttFailure, ValueError) as exc:
        _fail(f"cannot reach {cfg.broker.redacted_url()}: {exc}")
    click.echo(f"removed {node}: cleared {count} retained topics")


def _fence(config: Path | None) -> None:
    cfg = _load(config, {})
    from . import guardian

    failed = False
    if cfg.vip:
        what = [guardian.Target(v.interface, v.ip_interface) for v in cfg.vip]
        try:
            with guardian.open_netlink() as sock:
                outcome = guardian.remove(sock, what)
        except OSError as exc:
            _fail(f"netlink: {exc.strerror or exc}")
        click.echo(guardian.report(outcome) or "none of the floating IPs was on its interface")
        failed = any(code not in (0, errno.EADDRNOTAVAIL) for code in outcome.values())
    if cfg.hooks.fence is not None:
        os.environ.update(HASYNC_NODE=cfg.node_id, HASYNC_CLUSTER=cfg.cluster)
        result = guardian.fence(cfg.hooks.fence, cfg.hooks.timeout, "agent stopped", "0")
        click.echo(f"fence command: {result}")
        failed |= result != "ok"
    if not cfg.vip and cfg.hooks.fence is None:
        click.echo("no floating IP (vip:) and no fence command (hooks.fence) configured: nothing to do")
    if failed:
        sys.exit(1)


@main.command("fence")
@click.option("--config", "-c", "config", type=click.Path(path_type=Path),
              help=f"YAML config file [default: {DEFAULT_CONFIG_PATH} if it exists].")
def fence(config: Path | None) -> None:
    """Take this node's fenced resources down once its agent has stopped: the floating IPs (vip:) off their
    interfaces, then the fence command (hooks.fence) run.

    For the service manager, after the agent's process (and its guardian) are gone whatever ended them (the
    systemd unit's ExecStopPost); never while the agent runs. Exits 1 if an address could not be removed or the
    fence command failed."""
    _fence(config)


@main.command("vip-release", hidden=True)
@click.option("--config", "-c", "config", type=click.Path(path_type=Path))
def vip_release(config: Path | None) -> None:
    """The former name of ``hasync fence`` (units installed before it)."""
    _fence(config)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--show", is_flag=True, help="Print the public key of an existing private key file.")
def keygen(path: Path, show: bool) -> None:
    """Create this node's signing key at PATH (Ed25519, PEM, mode 0600) and print its public key.

    Put the printed line under signing.public_keys in the configuration of every node of the cluster,
    and PATH as this node's signing.private_key."""
    try:
        key = signing.load_private_key(path) if show else signing.generate(path)
    except signing.SigningError as exc:
        _fail(str(exc))
    click.echo(signing.public_key_text(key.public_key()))


def _require_broker() -> None:
    """The embedded broker (and the demo's live table) is an extra: ``pip install 'hasync[broker]'``; the agent
    itself never needs it."""
    if importlib.util.find_spec("amqtt") is None or importlib.util.find_spec("rich") is None:
        _fail("the embedded broker is not installed: pip install 'hasync[broker]' (or use Mosquitto)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1883, show_default=True)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def broker(host: str, port: int, log_level: str) -> None:
    """Run the embedded amqtt broker (development, tests, demos; use Mosquitto in production)."""
    setup_logging("text", log_level)
    _require_broker()
    from .broker import EmbeddedBrokerError, serve

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(host, port, stop)

    try:
        asyncio.run(run())
    except EmbeddedBrokerError as exc:
        _fail(str(exc))


@main.command()
@click.option("--duration", type=float, default=None,
              help="Run non-interactively and exit within this many seconds (CI, first try).")
@click.option("--nodes", type=click.IntRange(2, 5), default=3, show_default=True)
def demo(duration: float | None, nodes: int) -> None:
    """Embedded broker + agents: watch an election, a crash failover and a graceful handover."""
    _require_broker()
    from .demo import run_demo

    sys.exit(asyncio.run(run_demo(nodes=nodes, duration=duration)))


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple[list[str], str | None]]) -> None:
    """A plain aligned table; a row's colour shows on a terminal only (click drops it in a pipe)."""
    widths = [max([len(c)] + [len(cells[i]) for cells, _ in rows]) for i, c in enumerate(columns)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    click.echo(title)
    click.echo(click.style(line(columns), bold=True))
    click.echo("  ".join("-" * width for width in widths))
    for cells, colour in rows:
        click.echo(click.style(line(cells), fg=colour, bold=colour == "green"))


def _sync_cell(sync: dict[str, Any] | None) -> str:
    if sync is None:
        return "off"
    text = f"{sync['entities']} entities"
    if not sync["synced"]:
        text += ", reconciling"
    if sync["pending"] or sync["queued"]:
        text += f", {sync['pending']} pending, {sync['queued']} queued"
    if sync.get("lag_ms") is not None:
        text += f", lag {sync['lag_ms']} ms"
    return text


if __name__ == "__main__":
    main()
