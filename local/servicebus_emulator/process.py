"""Start the emulator as a subprocess and wait for its ready line (used by the test fixture and local/stack.py)."""

from __future__ import annotations

import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

__all__ = ["CONNECTION_STRING", "EmulatorStartError", "connection_string", "start_emulator"]

CONNECTION_STRING = (
    "Endpoint=sb://{host}:{port};SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
)
_READY = re.compile(r"Service Bus emulator ready: amqp://(?P<host>[^:\s]+):(?P<port>\d+)")
_REPO_ROOT = Path(__file__).resolve().parents[2]


_LOGGER = logging.getLogger(__name__)


class EmulatorStartError(RuntimeError):
    """The emulator exited or did not report ready in time; the message carries its stderr."""


def connection_string(host: str, port: int) -> str:
    return CONNECTION_STRING.format(host=host, port=port)


def start_emulator(
    config: Path,
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    timeout: float = 15.0,
    log_level: str = "WARNING",
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m local.servicebus_emulator``; return the process and its bound port once it is ready.

    After the ready line a daemon thread keeps reading the process's stderr (so the pipe never fills up) and
    logs each line to this module's logger; it closes the pipe when the process exits. Raises
    :class:`EmulatorStartError` when the process exits or is not ready within ``timeout``.
    """
    command = [
        sys.executable,
        "-m",
        "local.servicebus_emulator",
        "--config",
        str(config),
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    output = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
                continue
            chunk = os.read(process.stderr.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            match = _READY.search(output.decode("utf-8", "replace"))
            if match:
                threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
                return process, int(match.group("port"))
    process.kill()
    process.wait()
    raise EmulatorStartError(f"Service Bus emulator did not start: {output.decode('utf-8', 'replace').strip()}")


def _drain(stream: IO[bytes]) -> None:
    with stream:
        for line in stream:
            _LOGGER.info("emulator: %s", line.decode("utf-8", "replace").rstrip())
