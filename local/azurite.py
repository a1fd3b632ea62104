"""Azurite (Blob Storage only) from ``node_modules/.bin/azurite-blob``, installed by ``npm ci`` (package-lock.json).

``start_azurite(location, port)`` starts it on 127.0.0.1, waits until the port accepts connections and returns the
well-known development connection string for that port together with the process. Azurite's flags:
``--skipApiVersionCheck`` (the SDK may be newer than Azurite), ``--disableTelemetry``, ``--loose`` (ignore headers
Azurite does not implement).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from local.ports import LOOPBACK, ensure_free, free_port, is_listening

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's published, well-known development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


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
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start Azurite's blob service; return (connection string, process). Stop it with ``terminate()``."""
    if not AZURITE_BLOB.exists():
        raise AzuriteError(f"{AZURITE_BLOB} not found: run `npm ci` (or `make install`) in {REPO_ROOT}")
    if port is None:
        port = free_port()
    else:
        ensure_free(port, "Azurite")
    location.mkdir(parents=True, exist_ok=True)
    log = log_path or location / "azurite.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command(location, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,  # the stack leaves it running after `make up` exits
        )
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if proc.poll() is not None:
            raise AzuriteError(f"Azurite exited with {proc.returncode} before listening on port {port}; see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AzuriteError(f"Azurite did not listen on port {port} within {timeout:.0f} s; see {log}")
        time.sleep(0.1)
    logger.info("Azurite ready on port %d", port, extra={"action": "azurite_ready"})
    return connection_string(port), proc


def stop_azurite(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
