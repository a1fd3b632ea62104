"""``python -m local.stack up|status|down`` as ``make up`` / ``make down`` run it: detached services, stack.json,
stop by PID, safe to repeat, and a clear error (with nothing left running) when a port is taken."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.processes import is_alive
from local.stack import REPO_ROOT

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

FREE_PORTS = ["--postgres-port", "0", "--azurite-port", "0", "--servicebus-port", "0", "--api-port", "0"]
STATE_KEYS = {"api_url", "database_url", "blob_connection_string", "servicebus_connection_string", "queue_name"}


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cropai-cli-"))
    path.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    try:
        yield path
    finally:
        _stack("down", path)
        shutil.rmtree(path, ignore_errors=True)


def _stack(command: str, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "local.stack", command, "--root", str(root), *extra]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


def _processes_under(root: Path) -> list[int]:
    """PIDs whose command line mentions ``root`` (what the stack started there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(root).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_up_status_down_down(root: Path) -> None:
    started = _stack("up", root, *FREE_PORTS, "--workers", "0")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip().splitlines()[-1].startswith("API: http://127.0.0.1:")

    state = json.loads((root / "stack.json").read_text())
    assert state.keys() >= STATE_KEYS
    assert state["api_url"].endswith("/api")
    assert started.stdout.strip().endswith(state["api_url"])
    pids = [s["pid"] for s in state["services"]]
    assert [s["name"] for s in state["services"]] == ["postgres", "azurite", "servicebus", "functions"]
    assert all(is_alive(pid) for pid in pids)  # still running after `up` returned
    response = httpx.get(f"{state['api_url']}/jobs/{uuid.uuid4()}", timeout=30)
    assert response.status_code == 404
    assert _stack("status", root).returncode == 0

    stopped = _stack("down", root)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(is_alive(pid) for pid in pids)
    assert not (root / "stack.json").exists()
    again = _stack("down", root)
    assert (again.returncode, again.stdout.strip()) == (0, "stack: nothing to stop")
    assert _stack("status", root).returncode == 1


def test_busy_port_is_reported_and_nothing_is_left_running(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = [*FREE_PORTS[:2], "--azurite-port", str(port), *FREE_PORTS[4:]]
        result = _stack("up", root, *ports, "--workers", "0")
    assert result.returncode == 1
    assert f"port {port} for Azurite is busy" in result.stderr
    assert not (root / "stack.json").exists()
    assert _processes_under(root) == []
