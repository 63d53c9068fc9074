"""Real MQTT brokers as child processes, for integration tests: Mosquitto and hasync's embedded amqtt.

Both controllers share one interface: ``start()``, ``stop()`` (SIGTERM, then SIGKILL), ``kill()``
(SIGKILL, as in a crash), ``restart()``, ``url``, ``port`` and ``log_path``. A controller keeps its port
across restarts, so clients can reconnect to the same address. The methods block (for well under a
second normally); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Self

from .wait import HOST, free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02


def mosquitto_binary() -> str | None:
    """The mosquitto executable, or None. Debian installs it in /usr/sbin, often not on a user's PATH."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file for ``users`` (name: password), hashed by ``mosquitto_passwd -U``."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=60)
    return path


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child process and wait for it, killing it if it has not exited within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_exited(pid: int) -> None:
    """Return once process ``pid`` has exited (a pidfd becomes readable); TimeoutError after 2 s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        await asyncio.wait_for(exited.wait(), 2)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class BrokerStartError(RuntimeError):
    """A broker process did not come up in time; the message ends with its log."""


class BrokerProcess:
    """What both broker controllers share: the process, its log, and start/stop/kill."""

    name = "broker"

    def __init__(self, workdir: Path, port: int | None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self._port = port
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} has no port before its first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker and return once it accepts connections, retrying while its port is busy."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._process = self._spawn()
            try:
                self._wait_ready(deadline)
            except BrokerStartError:
                self.kill()
                raise
            if self.running:
                return
            # Exited before it was ready: usually the port is still held (a restart racing a
            # socket in TIME_WAIT or a stranger that took a free_port()); try again until the deadline.
            self.kill()
            if time.monotonic() >= deadline:
                raise BrokerStartError(self._failure("exited during start-up"))
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, which makes Mosquitto save its database), killing after a timeout."""
        process = self._process
        if process is None:
            return
        terminate(process, STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """Kill at once (SIGKILL): no clean shutdown, no database save, sockets closed by the kernel."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the broker hangs with every connection open (nothing is delivered or refused)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop gracefully and start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        """Return when the broker is ready or its process has exited; raise at the deadline."""
        raise NotImplementedError

    def _reap(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def _log_file(self) -> IO[bytes]:
        return self.log_path.open("ab")

    def _failure(self, what: str) -> str:
        try:
            log = self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            log = "(no log)"
        return f"{self.name} on port {self._port} {what}; log {self.log_path}:\n{log}"


class MosquittoProcess(BrokerProcess):
    """Mosquitto with a generated config on 127.0.0.1, anonymous access allowed.

    ``persistence=True`` keeps its database in ``workdir`` (saved on a graceful stop, and by
    ``autosave_interval``); ``extra_config`` lines are appended to the config as they are.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
        quiet: bool = False,
    ) -> None:
        """``quiet``: no line per message in its log (an hour at 1,000 messages/s would write a gigabyte)."""
        super().__init__(workdir, port if port is not None else free_port())
        self.quiet = quiet
        found = binary or mosquitto_binary()
        if found is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.binary = found
        self.persistence = persistence
        self.config_path = workdir / "mosquitto.conf"
        self.config_path.write_text(self._config(extra_config))
        self._log_offset = 0

    def _config(self, extra_config: Sequence[str]) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"log_dest file {self.log_path}",
            *(["log_type error", "log_type warning", "log_type notice", "log_type information"] if self.quiet
              else ["log_type all"]),
            # As in broker/mosquitto.conf: a joiner receives every retained entity record at once.
            "max_queued_messages 50000",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"persistence {'true' if self.persistence else 'false'}",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to user "mosquitto", which cannot write to the test's
            # directory; "root" tells it to stay.
            lines.append("user root")
        lines.extend(extra_config)
        return "\n".join(lines) + "\n"

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self._log_file() as log:
            return subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def _wait_ready(self, deadline: float) -> None:
        # Ready once this run logged "mosquitto version X running" (it does after opening its listeners)
        # and the port accepts a connection. The port alone could be answered by someone else's socket.
        while self.running:
            if self._logged_running() and self._accepts_connections():
                return
            if time.monotonic() >= deadline:
                raise BrokerStartError(self._failure(f"did not accept connections within {START_TIMEOUT} s"))
            time.sleep(_POLL_INTERVAL)

    def _logged_running(self) -> bool:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            this_run = log.read()
        return re.search(rb"mosquitto version \S+ running", this_run) is not None

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class AmqttProcess(BrokerProcess):
    """hasync's embedded amqtt broker, ``python -m hasync.broker``, in its own process.

    Without a port, the first start binds a free one (no race) and later starts reuse it.
    """

    name = "amqtt"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir, port)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "hasync.broker", "--host", self.host, "--port", str(self._port or 0)]
        with self._log_file() as log:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)

    def _wait_ready(self, deadline: float) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise BrokerStartError(self._failure(f"printed no READY line within {START_TIMEOUT} s"))
        # The broker prints one short line at once, so once readable, readline() does not block for long;
        # an empty line means it exited before it was ready.
        line = stdout.readline().decode(errors="replace").split()
        if not line:
            self._process.wait(STOP_TIMEOUT)
            return
        if len(line) != 2 or line[0] != "READY":
            raise BrokerStartError(self._failure(f"printed {' '.join(line)!r} instead of READY <port>"))
        self._port = int(line[1])
