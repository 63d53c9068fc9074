"""hasync's container image and containers, for the container tests (Debian's docker.io, scripts/setup-docker.sh).

The image is built once per machine state (BuildKit's cache makes a rebuild of an unchanged tree a few
seconds), under a file lock so that parallel test workers do not build it side by side. Containers run on
the host network, as the README tells users to run them, so they reach a broker the tests start on loopback.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"  # Debian's, with BuildKit (another docker CLI earlier on PATH may lack it)
IMAGE = "hasync:test"
BUILD_TIMEOUT = 900.0  # a cold machine: debootstrap, apt and pip inside the build


class DockerError(RuntimeError):
    """A docker command failed; the message has its output."""


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise DockerError(f"docker {' '.join(args[:3])}... exited {result.returncode}: "
                          f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


@contextmanager
def _locked(name: str) -> Iterator[None]:
    lock = ROOT / ".cache" / name
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build(script: str, *args: str) -> str:
    """Run one of the project's build scripts (scripts/build-image.sh, scripts/build-addon.sh) under the
    build lock; returns what it printed last (the image's tag)."""
    with _locked("docker-build.lock"):
        result = subprocess.run([str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT, check=False)
    if result.returncode != 0:
        raise DockerError(f"{script} failed ({result.returncode}): {(result.stderr + result.stdout)[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


class Container:
    """One ``docker run -d``; removed (forcibly) by ``remove`` or the ``running`` context manager."""

    def __init__(self, name: str, image: str, args: Sequence[str] = (), *, options: Sequence[str] = ()) -> None:
        self.name = name
        docker("rm", "-f", name, check=False)
        docker("run", "-d", "--name", name, *options, image, *args)

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(docker("inspect", self.name).stdout)
        return data[0]

    @property
    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def health(self) -> str:
        """Docker's verdict from the image's HEALTHCHECK: starting, healthy or unhealthy."""
        return str(self.inspect()["State"].get("Health", {}).get("Status", "none"))

    def health_log(self) -> str:
        entries = self.inspect()["State"].get("Health", {}).get("Log", [])
        return "\n".join(f"{e['ExitCode']}: {e['Output'].strip()}" for e in entries)

    def wait_healthy(self, timeout: float) -> None:
        wait_until(lambda: self.health() == "healthy", timeout, f"{self.name} to be healthy", step=0.25)

    def stop(self, timeout: int) -> tuple[float, int]:
        """``docker stop -t timeout``: how long it took and the exit code."""
        started = time.monotonic()
        docker("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        took = time.monotonic() - started
        return took, int(self.inspect()["State"]["ExitCode"])

    def exec(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *args, timeout=timeout, check=False)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def image_size_mb(image: str) -> float:
    return int(docker("image", "inspect", image, "--format", "{{.Size}}").stdout.strip()) / 1e6
