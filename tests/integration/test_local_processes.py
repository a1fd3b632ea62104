"""The stack's process handling with real child processes: readiness, early exit, timeouts, stop by PID."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from local.ports import PortBusy, ensure_free, free_port
from local.processes import Service, ServiceFailed, is_alive, spawn, stop, wait_ready

pytestmark = pytest.mark.integration

READY = "service ready: yes"


def _service(pid: int, log: Path, *, grace: float = 5.0) -> Service:
    return Service("test", pid, str(log), marker="-c", grace=grace)


def test_ready_line_then_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text(f"{READY} (from an earlier run: must not count)\n")
    line = f"{READY} at http://127.0.0.1:1234"
    proc, offset = spawn(
        [sys.executable, "-c", f"import time; time.sleep(0.3); print({line!r}, flush=True); time.sleep(60)"],
        log,
        dict(os.environ),
        tmp_path,
    )
    assert wait_ready("test", proc, log, timeout=30, ready_line=READY, offset=offset) == "at http://127.0.0.1:1234"
    assert is_alive(proc.pid)
    assert log.read_text().count(READY) == 2
    assert stop(_service(proc.pid, log)) == "stopped (SIGTERM)"
    assert not is_alive(proc.pid)
    assert stop(_service(proc.pid, log)) == "not running"  # twice is fine


def test_a_ready_line_counts_once_its_end_is_written(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    code = f"import sys, time; sys.stdout.write({READY + ' at http://127.0.0.1:12'!r}); sys.stdout.flush(); "
    code += "time.sleep(1); print('34', flush=True); time.sleep(60)"
    proc, offset = spawn([sys.executable, "-c", code], log, dict(os.environ), tmp_path)
    try:
        assert wait_ready("test", proc, log, timeout=30, ready_line=READY, offset=offset) == "at http://127.0.0.1:1234"
    finally:
        stop(_service(proc.pid, log))


def test_early_exit_names_the_log(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    proc, offset = spawn([sys.executable, "-c", "import sys; sys.exit(3)"], log, dict(os.environ), tmp_path)
    with pytest.raises(ServiceFailed, match=r"exited with status 3 .*svc\.log"):
        wait_ready("test", proc, log, timeout=30, ready_line=READY, offset=offset)


def test_not_ready_in_time(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    proc, offset = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log, dict(os.environ), tmp_path)
    try:
        with pytest.raises(ServiceFailed, match="not ready within"):
            wait_ready("test", proc, log, timeout=0.5, ready_line=READY, offset=offset)
    finally:
        stop(_service(proc.pid, log))


def test_sigkill_after_the_grace_when_sigterm_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += f"print({READY!r}, flush=True); time.sleep(60)"
    proc, offset = spawn([sys.executable, "-c", code], log, dict(os.environ), tmp_path)
    wait_ready("test", proc, log, timeout=30, ready_line=READY, offset=offset)
    assert stop(_service(proc.pid, log, grace=0.5)).startswith("killed (SIGKILL")
    assert not is_alive(proc.pid)


def test_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    proc, _ = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log, dict(os.environ), tmp_path)
    try:
        outcome = stop(Service("test", proc.pid, str(log), marker="azurite-blob"))
        assert "left alone" in outcome
        assert is_alive(proc.pid)
    finally:
        stop(_service(proc.pid, log))


def test_port_checks() -> None:
    port = free_port()
    ensure_free(port, "nothing")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(PortBusy, match=f"port {port} for the thing is busy"):
            ensure_free(port, "the thing")
