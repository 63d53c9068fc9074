"""An embedded amqtt broker, for development, tests and demos: the one module that imports amqtt.

``async with EmbeddedBroker(port=0) as broker:`` starts amqtt 0.12 in the running loop and
``broker.port`` is the port it bound. ``serve()`` backs the ``hasync broker`` command and
``python -m hasync.broker --host H --port P`` runs one as a process, printing ``READY <port>``.

What amqtt 0.12.1 does, checked against it (tests/test_brokers.py):

* it speaks MQTT 3.1.1 only and keeps retained messages in memory: they are gone after a restart;
* messages forwarded to connected subscribers always carry ``retain=False``, even when the publisher
  set the flag; only the copies sent to a new subscription carry ``retain=True``;
* it delivers at the *subscription's* QoS, even when that is higher than the publish's;
* it publishes a client's Last Will when the client's socket closes without a DISCONNECT (a killed
  process), but it does not enforce keepalive: the will of a hung or cut-off client never fires.
  Never let safety depend on an amqtt will; production runs Mosquitto (see broker/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

from amqtt.broker import Broker
from amqtt.errors import BrokerError, PluginError, PluginLoadError

logger = logging.getLogger("hasync.broker")  # not __name__: the module also runs as __main__

_LISTENER = "default"
_ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"
_PASSWORD_FILE_PLUGIN = "amqtt.plugins.authentication.FileAuthPlugin"
# amqtt logs every connection at INFO and `transitions` (its state machine library) every state
# callback at INFO: a few lines per client, so they are kept at WARNING unless a level was set.
_CHATTY_LOGGERS = ("amqtt", "transitions")


class EmbeddedBrokerError(Exception):
    """The embedded broker could not start or was used out of order."""


def amqtt_config(
    host: str,
    port: int,
    *,
    allow_anonymous: bool = True,
    password_file: str | None = None,
) -> dict[str, Any]:
    """amqtt 0.12's broker configuration: one TCP listener, authentication, nothing else.

    Plugins are listed explicitly, which leaves out amqtt's defaults: the ``$SYS`` plugin (publishes
    every 20 s), the event and packet loggers, and persistence, so retained messages live in memory.
    ``password_file`` holds ``user:hash`` lines with argon2 hashes (Mosquitto's files do not work).
    """
    if not allow_anonymous and password_file is None:
        # amqtt's anonymous plugin with allow_anonymous false admits any client that sends a
        # username, whatever its password: only a password file makes this setting mean something.
        raise ValueError("allow_anonymous=False needs a password_file")
    plugins: dict[str, dict[str, Any]] = {_ANONYMOUS_PLUGIN: {"allow_anonymous": allow_anonymous}}
    if password_file is not None:
        plugins[_PASSWORD_FILE_PLUGIN] = {"password_file": password_file}
    return {
        "listeners": {_LISTENER: {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": plugins,
    }


def _quiet_chatty_loggers() -> None:
    for name in _CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    chatty = logging.getLogger(name)
    level = chatty.level
    chatty.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        chatty.setLevel(level)


def _reason(exc: BaseException) -> str:
    """The operating system's words for the root cause (a busy port), else the exception's."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return str(exc)


class EmbeddedBroker:
    """amqtt's broker, running in the current event loop for the duration of ``async with``.

    ``port=0`` binds a free port; read it from ``port`` once entered. An instance runs once.
    amqtt's INFO chatter is silenced unless its loggers were given a level or ``quiet_logs=False``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_anonymous: bool = True,
        password_file: str | None = None,
        quiet_logs: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._config = amqtt_config(host, port, allow_anonymous=allow_anonymous, password_file=password_file)
        self._quiet_logs = quiet_logs
        self._broker: Broker | None = None
        self._port: int | None = None
        self._used = False

    @property
    def port(self) -> int:
        """The port the broker listens on."""
        if self._port is None:
            raise EmbeddedBrokerError("The broker's port is known only while it runs, inside 'async with'.")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        if self._used:
            raise EmbeddedBrokerError("Cannot restart an EmbeddedBroker; create a new instance.")
        self._used = True
        if self._quiet_logs:
            _quiet_chatty_loggers()
        try:
            broker = Broker(self._config)
            with _quiet("amqtt.broker"):  # it logs its own traceback; ours is one line
                await broker.start()
        except (BrokerError, PluginError, PluginLoadError, OSError) as exc:
            raise EmbeddedBrokerError(
                f"cannot start the embedded amqtt broker on {self.host}:{self._requested_port}: {_reason(exc)}"
            ) from exc
        self._broker = broker
        try:
            self._port = self._bound_port(broker)
        except BaseException:
            await broker.shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        broker, self._broker = self._broker, None
        self._port = None
        if broker is not None:
            await broker.shutdown()

    def _bound_port(self, broker: Broker) -> int:
        if self._requested_port != 0:
            return self._requested_port
        # amqtt binds port 0 fine but does not report the port it got; its listener's asyncio.Server
        # (a private attribute of the pinned amqtt 0.12.1) does. This avoids the race of picking a
        # free port first and binding it later.
        sockets = broker._servers[_LISTENER].instance.sockets
        ports = {sock.getsockname()[1] for sock in sockets}
        if len(ports) != 1:
            raise EmbeddedBrokerError(
                f"{self.host!r} resolved to several addresses, each bound a different port {sorted(ports)};"
                " give a literal address or a fixed port"
            )
        port: int = ports.pop()
        return port


async def serve(
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    *,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Run an embedded broker until ``stop`` is set or the task is cancelled.

    ``on_ready`` is called with the bound port once the broker listens.
    """
    async with EmbeddedBroker(host, port) as broker:
        logger.info("embedded amqtt broker listening on %s:%d", host, broker.port)
        if on_ready is not None:
            on_ready(broker.port)
        if stop is None:
            await asyncio.get_running_loop().create_future()
        else:
            await stop.wait()


async def _run_until_signalled(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def announce(bound: int) -> None:
        print(f"READY {bound}", flush=True)

    await serve(host, port, stop, on_ready=announce)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hasync.broker``: run until SIGTERM or SIGINT, then exit 0."""
    parser = argparse.ArgumentParser(prog="python -m hasync.broker", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883, help="0 binds a free port (printed in READY)")
    parser.add_argument("--verbose", action="store_true", help="let amqtt log at DEBUG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("amqtt").setLevel(logging.DEBUG)
    try:
        asyncio.run(_run_until_signalled(args.host, args.port))
    except EmbeddedBrokerError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
