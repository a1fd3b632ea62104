"""Azurite (Blob Storage only) from ``node_modules/.bin/azurite-blob``, installed by ``npm ci`` (package-lock.json).

``start_azurite(location, port)`` starts it on 127.0.0.1 (without ``port``: on a port the system picks, which Azurite
binds itself, so no other process can take it between the pick and the bind), waits until Azurite's log says it
listens and on which port, and returns the well-known development connection string for that port, the process and
the port. Azurite's flags:
``--skipApiVersionCheck`` (the SDK may be newer than Azurite), ``--disableTelemetry``, ``--loose`` (ignore headers
Azurite does not implement).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

from local.ports import LOOPBACK, ensure_free
from local.processes import ServiceFailed, spawn, wait_bound

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's published, well-known development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


# What azurite-blob prints once its server is bound, before the address with the port it got (the one asked for, or
# the system's pick).
LISTENING = "Azurite Blob service successfully listens on "


class Azurite(NamedTuple):
    connection_string: str
    process: subprocess.Popen[bytes]
    port: int


class AzuriteError(RuntimeError):
    """Azurite is missing or did not become ready; the message says why and where the log is."""


def connection_string(port: int, host: str = LOOPBACK) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{port}/{ACCOUNT};"
    )


def command(location: Path, port: int, host: str = LOOPBACK) -> list[str]:
    return [
        str(AZURITE_BLOB),
        "--skipApiVersionCheck",
        "--disableTelemetry",
        "--loose",
        "--blobHost",
        host,
        "--blobPort",
        str(port),
        "--location",
        str(location),
    ]


def start_azurite(
    location: Path, port: int | None = None, log_path: Path | None = None, timeout: float = 30.0
) -> Azurite:
    """Start Azurite's blob service (``port`` None: on a port of the system's choosing). Stop it with
    :func:`stop_azurite`."""
    if not AZURITE_BLOB.exists():
        raise AzuriteError(f"{AZURITE_BLOB} not found: run `npm ci` (or `make install`) in {REPO_ROOT}")
    if port is not None:
        ensure_free(port, "Azurite")
    location.mkdir(parents=True, exist_ok=True)
    log = log_path or location / "azurite.log"
    # Detached (the stack leaves it running after `make up` exits), appended to a log that may hold earlier runs':
    # only what this one writes names its port.
    proc, start = spawn(command(location, port or 0), log, os.environ, REPO_ROOT)
    try:
        port = wait_bound("Azurite", proc, log, timeout=timeout, ready_line=LISTENING, offset=start)
    except ServiceFailed as e:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise AzuriteError(str(e)) from e
    logger.info("Azurite ready on port %d", port, extra={"action": "azurite_ready"})
    return Azurite(connection_string(port), proc, port)


def stop_azurite(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
