"""How hasync is installed: the systemd unit (deploy/systemd/hasync.service)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hasync.agent import FINAL_PUBLISH_TIMEOUT
from hasync.config import HooksConfig

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "hasync.service"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the documented install path; verify checks that ExecStart exists, so point it at ours.
    hasync = Path(sys.executable).parent / "hasync"
    unit = tmp_path / "hasync.service"
    unit.write_text(UNIT.read_text().replace("/opt/hasync/bin/hasync", str(hasync)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_the_units_stop_timeout_covers_a_graceful_handover() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert "network-online.target" in unit["Unit"]["After"]
    # What the agent allows itself on SIGTERM: the demote hook and the automations, then its last word.
    handover = HooksConfig().timeout + 11 + FINAL_PUBLISH_TIMEOUT
    assert float(service["TimeoutStopSec"]) > handover


def test_once_the_agent_is_gone_the_unit_takes_its_fenced_resources_down(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    # "-": a failure does not fail the unit (the agent has stopped either way; the guardian and the lifetimes
    # are there too).
    assert unit["Service"]["ExecStopPost"].split() == [
        "-/opt/hasync/bin/hasync", "fence", "--config", "/etc/hasync/hasync.yaml"]
    config = tmp_path / "hasync.yaml"
    config.write_text("node_id: n1\n")
    hasync = Path(sys.executable).parent / "hasync"
    for command in ("fence", "vip-release"):  # (the unit's former command still works)
        result = subprocess.run([str(hasync), command, "--config", str(config)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert (result.returncode, result.stdout.strip()) == (
            0, "no floating IP (vip:) and no fence command (hooks.fence) configured: nothing to do")
    # The fence command, with the hook's variables: the recipe's dnsmasq.sh stops dnsmasq on HASYNC_EVENT=fence.
    marker = tmp_path / "fenced"
    config.write_text(f"node_id: n1\nhooks:\n  fence: echo $HASYNC_EVENT $HASYNC_NODE $HASYNC_REASON > {marker}\n")
    result = subprocess.run([str(hasync), "fence", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout.strip(), marker.read_text()) == (
        0, "fence command: ok", "fence n1 agent stopped\n")
    config.write_text("node_id: n1\nhooks:\n  fence: exit 3\n")
    result = subprocess.run([str(hasync), "fence", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (1, "fence command: exit status 3")
