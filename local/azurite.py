"""Azurite (Blob Storage only) from ``node_modules/.bin/azurite-blob``, installed by ``npm ci`` (package-lock.json).

``start_azurite(location, port)`` starts it on 127.0.0.1 (without ``port``: on a port the system picks, which Azurite
binds itself, so no other process can take it between the pick and the bind), waits until Azurite's log says which
port it listens on and that port accepts connections, and returns the well-known development connection string for
that port, the process and the port. Azurite's flags:
``--skipApiVersionCheck`` (the SDK may be newer than Azurite), ``--disableTelemetry``, ``--loose`` (ignore headers
Azurite does not implement).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from local.ports import LOOPBACK, ensure_free, is_listening

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's published, well-known development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


# What azurite-blob prints once its server is bound, with the port it got (the one asked for, or the system's pick).
LISTENING = re.compile(rb"successfully listens on http://[^\s/]+:(\d+)")


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
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        start = out.tell()  # the log may hold earlier runs': only what this one writes names its port
        proc = subprocess.Popen(
            command(location, port or 0),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,  # the stack leaves it running after `make up` exits
        )
    deadline = time.monotonic() + timeout
    while (bound := _listening_port(log, start)) is None or not is_listening(bound):
        if proc.poll() is not None:
            raise AzuriteError(f"Azurite exited with {proc.returncode} before it listened; see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AzuriteError(f"Azurite did not listen within {timeout:.0f} s; see {log}")
        time.sleep(0.1)
    logger.info("Azurite ready on port %d", bound, extra={"action": "azurite_ready"})
    return Azurite(connection_string(bound), proc, bound)


def _listening_port(log: Path, start: int) -> int | None:
    with log.open("rb") as f:
        f.seek(start)
        found = LISTENING.search(f.read())
    return int(found.group(1)) if found else None


def stop_azurite(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
