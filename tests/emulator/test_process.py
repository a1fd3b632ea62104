"""The emulator's command line: ready line, free port, clean stop, and bad configurations."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from local.servicebus_emulator import start_emulator
from tests.fixtures.servicebus import REPO_CONFIG

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_ready_line_and_clean_stop(tmp_path: Path, sig: int) -> None:
    process, port = start_emulator(REPO_CONFIG, tmp_path / "data", log_level="INFO")
    assert port > 0
    process.send_signal(sig)
    assert process.wait(timeout=10) == 0
    assert (tmp_path / "data" / "servicebus.sqlite3").exists()


def _run_with(tmp_path: Path, document: Any) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.json"
    config.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    command = [sys.executable, "-m", "local.servicebus_emulator", "--config", str(config), "--port", "0"]
    command += ["--data-dir", str(tmp_path / "data")]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)


def _config(**properties: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REPO_CONFIG.read_text(encoding="utf-8"))
    document["UserConfig"]["Namespaces"][0]["Queues"][0]["Properties"].update(properties)
    return document


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("{not json", "invalid JSON"),
        ({"UserConfig": {}}, "UserConfig.Namespaces: missing"),
        (_config(LockDuration="5 minutes"), "Queues[0].Properties.LockDuration: not an ISO-8601 duration"),
        (_config(MaxDeliveryCount=0), "Queues[0].Properties.MaxDeliveryCount"),
        (_config(RequiresDuplicateDetection="yes"), "Queues[0].Properties.RequiresDuplicateDetection"),
        (_config(DefaultMessageTimeToLive="PT0S"), "Queues[0].Properties.DefaultMessageTimeToLive: must be positive"),
        (_config(RequiresSession=True), "RequiresSession: sessions are not supported"),
    ],
    ids=["json", "missing", "duration", "max-delivery", "flag", "zero-ttl", "sessions"],
)
def test_bad_config_exits_naming_the_field(tmp_path: Path, document: Any, named: str) -> None:
    result = _run_with(tmp_path, document)
    assert result.returncode == 2
    assert named in result.stderr
    assert "ready" not in result.stderr


def test_port_in_use_fails_clearly(tmp_path: Path) -> None:
    process, port = start_emulator(REPO_CONFIG, tmp_path / "one")
    try:
        command = [sys.executable, "-m", "local.servicebus_emulator", "--config", str(REPO_CONFIG)]
        command += ["--port", str(port), "--data-dir", str(tmp_path / "two")]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 1
        assert "cannot listen" in result.stderr
    finally:
        process.terminate()
        process.wait(timeout=10)
