"""Role hooks: config validation, strict ordering, drain(), timeouts, environment, results, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from harness.brokers import wait_exited
from hasync.config import HookEvent, HooksConfig
from hasync.hooks import MAX_LOGGED_OUTPUT, HookResult, HookRunner


class Results:
    """Collects on_result calls."""

    def __init__(self) -> None:
        self.all: list[HookResult] = []

    def __call__(self, result: HookResult) -> None:
        self.all.append(result)


# ---- configuration ------------------------------------------------------------------------------


def test_config_defaults_disable_every_hook() -> None:
    config = HooksConfig()
    assert (config.promote, config.demote, config.fault, config.timeout) == (None, None, None, 30.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timeout": 0}, "hook timeout must be a finite number of seconds > 0"),
        ({"timeout": float("inf")}, "hook timeout must be a finite number of seconds > 0"),
        ({"promote": " "}, "the promote hook is empty"),
        ({"notify": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_invalid_values(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HooksConfig.model_validate(fields)


# ---- running hooks ------------------------------------------------------------------------------


async def test_hooks_run_one_at_a_time_in_submission_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    # The first hook is the slowest: if hooks overlapped, the others would write first.
    config = HooksConfig(
        promote=f"sleep 0.2; echo promote >> {log}",
        demote=f"echo demote >> {log}",
        fault=f"echo fault >> {log}",
        timeout=3,
    )
    results = Results()
    async with HookRunner(config, on_result=results) as runner:
        runner.submit(HookEvent.PROMOTE)
        runner.submit(HookEvent.DEMOTE)
        runner.submit(HookEvent.FAULT)
        assert runner.pending == 3
        await asyncio.wait_for(runner.drain(), 3)
        assert runner.pending == 0
        assert log.read_text().split() == ["promote", "demote", "fault"]
        assert [(r.event, r.ok, r.returncode, r.error) for r in results.all] == [
            ("promote", True, 0, None),
            ("demote", True, 0, None),
            ("fault", True, 0, None),
        ]


async def test_drain_waits_only_for_hooks_submitted_before_it(tmp_path: Path) -> None:
    first, go, second = tmp_path / "first", tmp_path / "go", tmp_path / "second"
    config = HooksConfig(
        promote=f"touch {first}",
        demote=f"while [ ! -e {go} ]; do sleep 0.01; done; touch {second}",
        timeout=4,
    )
    async with HookRunner(config) as runner:
        await asyncio.wait_for(runner.drain(), 1)  # nothing submitted: returns at once
        runner.submit(HookEvent.PROMOTE)
        drained = asyncio.create_task(runner.drain())
        runner.submit(HookEvent.DEMOTE)  # after drain() was called: not waited for
        await asyncio.wait_for(drained, 3)
        assert first.exists()
        assert not second.exists()
        assert runner.pending == 1
        go.touch()
        await asyncio.wait_for(runner.drain(), 3)
        assert second.exists()


async def test_missing_hook_is_a_no_op(tmp_path: Path) -> None:
    results = Results()
    async with HookRunner(HooksConfig(promote="true"), on_result=results) as runner:
        runner.submit(HookEvent.FAULT)
        runner.submit(HookEvent.DEMOTE)
        assert runner.pending == 0
        await asyncio.wait_for(runner.drain(), 1)
    assert results.all == []


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    config = HooksConfig(promote=f"sleep 5 & echo $$ $! > {pids}; wait", timeout=0.3)
    results = Results()
    async with HookRunner(config, on_result=results) as runner:
        started = time.monotonic()
        runner.submit(HookEvent.PROMOTE)
        await asyncio.wait_for(runner.drain(), 3)
        assert time.monotonic() - started < 2
    (result,) = results.all
    assert not result.ok
    assert result.error == "timed out after 0.3s; process group killed"
    assert result.returncode == -9
    assert 0.3 <= result.duration < 2
    shell, sleeper = (int(pid) for pid in pids.read_text().split())
    await wait_exited(shell)
    await wait_exited(sleeper)  # the grandchild too, not only the shell


async def test_hook_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env.json"
    script = tmp_path / "dump_env.py"
    script.write_text(f"import json, os\njson.dump(dict(os.environ), open({str(out)!r}, 'w'))\n")
    monkeypatch.setenv("HASYNC_TEST_OUTER", "from the agent's environment")
    config = HooksConfig(demote=f"{sys.executable} {script}", timeout=4)
    base = {"HASYNC_NODE": "node-1", "HASYNC_CLUSTER": "home", "HASYNC_REASON": "overridden"}
    async with HookRunner(config, base) as runner:
        runner.submit(
            HookEvent.DEMOTE,
            {
                "HASYNC_ROLE": "standby",
                "HASYNC_TERM": "7",
                "HASYNC_LEADER": "node-2",
                "HASYNC_REASON": "preempted",
                "HASYNC_EVENT": "ignored",
            },
        )
        await asyncio.wait_for(runner.drain(), 4)
    env = json.loads(out.read_text())
    assert {key: value for key, value in env.items() if key.startswith("HASYNC_")} == {
        "HASYNC_TEST_OUTER": "from the agent's environment",
        "HASYNC_NODE": "node-1",
        "HASYNC_CLUSTER": "home",
        "HASYNC_ROLE": "standby",
        "HASYNC_TERM": "7",
        "HASYNC_LEADER": "node-2",
        "HASYNC_REASON": "preempted",
        "HASYNC_EVENT": "demote",
    }
    assert env["PATH"] == os.environ["PATH"]


async def test_failure_reaches_on_result_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hasync.hooks")
    results = Results()
    config = HooksConfig(fault="echo stopping ha; echo 'disk full' >&2; exit 3", timeout=3)
    async with HookRunner(config, on_result=results) as runner:
        runner.submit(HookEvent.FAULT)
        await asyncio.wait_for(runner.drain(), 3)
    (result,) = results.all
    assert (result.event, result.ok, result.returncode, result.error) == ("fault", False, 3, "exit 3")
    assert result.output_tail == "stopping ha\ndisk full\n"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "hook fault: stopping ha" in lines
    assert "hook fault: disk full" in lines
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "exit 3" in error
    assert error.endswith("stopping ha\ndisk full")


async def test_output_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hasync.hooks")
    results = Results()
    config = HooksConfig(promote="yes 'a line of output' | head -n 20000; echo last", timeout=3)
    async with HookRunner(config, on_result=results) as runner:
        runner.submit(HookEvent.PROMOTE)
        await asyncio.wait_for(runner.drain(), 3)
    (result,) = results.all
    assert result.ok
    assert len(result.output_tail) <= 4096
    assert result.output_tail.endswith("a line of output\nlast\n")
    messages = [r.getMessage() for r in caplog.records]
    logged = [m.removeprefix("hook promote: ") for m in messages if m.startswith("hook promote: a line")]
    assert MAX_LOGGED_OUTPUT - 20 < sum(len(line) + 1 for line in logged) <= MAX_LOGGED_OUTPUT
    assert any(m.endswith("bytes of output not logged") for m in messages)


async def test_exit_waits_a_bounded_time_then_stops_the_queue() -> None:
    results = Results()
    config = HooksConfig(promote="sleep 0.6", demote="sleep 0.6", fault="true", timeout=1.0)
    began = time.monotonic()
    async with HookRunner(config, on_result=results) as runner:
        runner.submit(HookEvent.PROMOTE)
        runner.submit(HookEvent.DEMOTE)
        runner.submit(HookEvent.FAULT)
    # promote finishes (0.6 s); demote is killed at the 1 s bound; fault never starts.
    assert 0.9 <= time.monotonic() - began < 2
    assert [(r.event, r.ok, r.error) for r in results.all] == [
        ("promote", True, None),
        ("demote", False, "killed: the hook runner was closed"),
        ("fault", False, "not run: the hook runner was closed"),
    ]
    assert results.all[1].returncode == -9


async def test_submit_never_raises_and_reports_what_it_cannot_run() -> None:
    results = Results()
    runner = HookRunner(HooksConfig(promote="true"), on_result=results)
    runner.submit(HookEvent.PROMOTE)
    async with runner:
        await asyncio.wait_for(runner.drain(), 1)
    runner.submit(HookEvent.PROMOTE)
    assert [(r.event, r.ok, r.error) for r in results.all] == [
        ("promote", False, "not run: the hook runner has not started"),
        ("promote", False, "not run: the hook runner is closed"),
    ]
    with pytest.raises(RuntimeError, match="Cannot start a HookRunner that is closed"):
        async with runner:
            pass


async def test_a_failing_callback_does_not_stop_the_runner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    done = tmp_path / "done"

    def broken(result: HookResult) -> None:
        raise ZeroDivisionError

    config = HooksConfig(promote="true", demote=f"touch {done}", timeout=3)
    async with HookRunner(config, on_result=broken) as runner:
        runner.submit(HookEvent.PROMOTE)
        runner.submit(HookEvent.DEMOTE)
        await asyncio.wait_for(runner.drain(), 3)
    assert done.exists()
    assert any(r.getMessage() == "hook on_result callback failed" for r in caplog.records)
