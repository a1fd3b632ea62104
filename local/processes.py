"""Background services of the local stack: spawn detached with a log file, wait until ready, stop by PID.

``spawn`` starts a service in its own session (so ``make up`` can exit and Ctrl-C in the terminal does not reach
it), appending stdout and stderr to its log. ``wait_ready`` watches the log for the service's ready line, or a port,
and fails with the log's path when the process dies or time runs out; ``wait_bound`` also reads the port a service
that bound port 0 names on its ready line. ``stop`` sends a signal, waits a grace period,
then SIGKILLs, and only ever signals a PID whose command line still carries the service's marker (PIDs are reused).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from local.ports import bound_port, is_listening

# Services this process started and has not reaped yet (the stack runs in-process in tests): keeping the Popen
# objects lets us reap them on stop and keeps Popen.__del__ from warning about children that are still running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceFailed(RuntimeError):
    """A service did not become ready: the message names it, says why and where its log is."""


@dataclass(frozen=True)
class Service:
    """One started service, as recorded in ``.local/stack.json``."""

    name: str
    pid: int
    log: str
    marker: str  # a substring of its command line, checked before any signal
    port: int | None = None
    stop_signal: str = "SIGTERM"
    grace: float = 10.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Service:
        return cls(**data)


def spawn(argv: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv`` detached, output appended to ``log``; return the process and the log's size before it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc  # so that is_alive and stop reap it
    return proc, offset


def _line_after(log: Path, offset: int, text: str) -> str | None:
    """What follows ``text`` on its first line in the log after ``offset``; None while that line is not there whole
    (its end not yet written: the address on it could still be cut short)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            written = f.read()
    except OSError:
        return None
    wanted = text.encode()
    at = written.find(wanted)
    if at < 0:
        return None
    rest, newline, _ = written[at + len(wanted) :].partition(b"\n")
    return rest.decode(errors="replace").strip() if newline else None


def wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float,
    ready_line: str | None = None,
    offset: int = 0,
    port: int | None = None,
    probe: Callable[[], bool] | None = None,
) -> str:
    """Return once the ready line is in the log (after ``offset``), the port listens, or ``probe()`` is true: what
    follows ``ready_line`` on its line (where a service says the address it bound), else ``""``."""
    deadline = time.monotonic() + timeout
    while True:
        if ready_line is not None and (rest := _line_after(log, offset, ready_line)) is not None:
            return rest
        if ready_line is None and port is not None and is_listening(port):
            return ""
        if probe is not None and probe():
            return ""
        if proc.poll() is not None:
            raise ServiceFailed(f"{name} exited with status {proc.returncode} before it was ready; see {log}")
        if time.monotonic() > deadline:
            raise ServiceFailed(f"{name} was not ready within {timeout:.0f} s; see {log}")
        time.sleep(0.1)


def wait_bound(
    name: str, proc: subprocess.Popen[bytes], log: Path, *, timeout: float, ready_line: str, offset: int = 0
) -> int:
    """:func:`wait_ready` for a service that bound a port itself and names its address on its ready line
    (``amqp://127.0.0.1:5672 ...``): that port."""
    ready = wait_ready(name, proc, log, timeout=timeout, ready_line=ready_line, offset=offset)
    port = bound_port(ready)
    if port is None:
        raise ServiceFailed(f"{name} said it was ready without an address: {ready!r}; see {log}")
    return port


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (reaping it first when it is our own exited child)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop(service: Service) -> str:
    """Stop one service: its signal, then SIGKILL after its grace. Returns what happened, for the log."""
    if not is_alive(service.pid):
        return "not running"
    if service.marker not in command_line(service.pid):
        return f"PID {service.pid} is now another program; left alone"
    os.kill(service.pid, signal.Signals[service.stop_signal])
    deadline = time.monotonic() + service.grace
    while time.monotonic() < deadline:
        if not is_alive(service.pid):
            return f"stopped ({service.stop_signal})"
        time.sleep(0.1)
    os.kill(service.pid, signal.SIGKILL)
    while is_alive(service.pid):
        time.sleep(0.05)
    return f"killed (SIGKILL after {service.grace:.0f} s)"
