"""Submit latency against the raw cost of the same I/O, measured side by side, as JSON on stdout.

``python -m bench.submit_overhead [--n 30] [--large-bytes 15000000]``

Starts the local stack without workers (``local.stack.up``, its timer out of the way) in a temporary directory on
free ports: nothing else runs while it measures. Two valid GeoTIFFs with Sentinel-2 band names: ``small``, the
real crop ``tests/data/s2_rgbn_fields_128.tif`` (99,856 bytes, B02 B03 B04 B08), and ``large``, a 13-band scene
from ``bench.analysis.make_scene`` sized to about ``--large-bytes``. For each, after 3 untimed rounds, ``--n``
rounds of one submit then one raw sequence (alternating, so that both see the same machine):

* ``submit_ms``: ``POST /api/jobs`` of the bytes through the local Functions host, from request to 202 (one
  keep-alive connection);
* ``raw_ms``: the I/O a submit does, done directly with the clients the submit path uses: ``BlobStore.put_input`` of
  the same bytes (a new job id), one ``INSERT`` of the job's row (one psycopg connection), one Service Bus send of
  its message (``JobPublisher``, a long-lived sender). The bytes' SHA-256 is computed once, outside the timing.

``submit_over_raw`` = submit p50 / raw p50: what validation, hashing, the host, the function and the job store's
bookkeeping add to the bare round trips. ``raw_parts_ms`` has each raw step's p50.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import rasterio
from psycopg.types.json import Jsonb

from bench.analysis import make_scene
from local.stack import REPO_ROOT, StackConfig, down, up
from shared.bus import JobPublisher, servicebus_client
from shared.messages import JobMessage
from shared.settings import Settings
from shared.storage import BlobStore

SMALL = REPO_ROOT / "tests" / "data" / "s2_rgbn_fields_128.tif"
INSERT = "INSERT INTO jobs (job_id, input_blob, input_sha256, params) VALUES (%s, %s, %s, %s)"
WARMUP = 3


def sized_scene(path: Path, target: int) -> Path:
    """A ``make_scene`` scene whose file is about ``target`` bytes (its size scales with the pixel count)."""
    probe = make_scene(path, 512)
    side = round(512 * math.sqrt(target / probe.stat().st_size))
    return make_scene(path, side)


def describe(path: Path) -> str:
    with rasterio.open(path) as ds:
        bands = " ".join(d or "?" for d in ds.descriptions)
        return f"{path.name if path == SMALL else 'bench.analysis.make_scene'}: {ds.width}x{ds.height}, {bands}"


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 2)

    return {"n": len(ordered), "p50": at(0.5), "p95": at(0.95), "max": round(ordered[-1], 2)}


class Raw:
    """The submit's I/O without the submit: upload, insert, send, each timed."""

    def __init__(self, settings: Settings, bands: list[str]) -> None:
        self.store = BlobStore.from_settings(settings)
        self.publisher = JobPublisher(servicebus_client(settings), settings.priority_queues)
        self.conn = psycopg.connect(str(settings.database_url), autocommit=True)
        self.params = {"bands": bands, "scale": 10000.0, "analysis": "crop-health"}

    def __call__(self, data: bytes, sha256: str) -> dict[str, float]:
        job_id = uuid4()
        times = [time.perf_counter()]
        blob = self.store.put_input(job_id, data, sha256)
        times.append(time.perf_counter())
        self.conn.execute(INSERT, (job_id, blob, sha256, Jsonb(self.params)))
        times.append(time.perf_counter())
        message = JobMessage(job_id=job_id, input_blob=blob, input_sha256=sha256, bands=self.params["bands"],
                             scale=10000.0, submitted_at=datetime.now(UTC))  # fmt: skip
        self.publisher.send(message)
        times.append(time.perf_counter())
        parts = ("upload", "insert", "send")
        return {part: (times[k + 1] - times[k]) * 1000 for k, part in enumerate(parts)}

    def close(self) -> None:
        self.conn.close()
        self.publisher.close()
        self.store.close()


def measure(client: httpx.Client, url: str, raw: Raw, data: bytes, n: int) -> dict[str, Any]:
    sha256 = hashlib.sha256(data).hexdigest()
    submits: list[float] = []
    raws: list[dict[str, float]] = []
    for round_ in range(WARMUP + n):
        started = time.perf_counter()
        response = client.post(f"{url}/jobs", content=data, headers={"Content-Type": "image/tiff"})
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 202:
            raise SystemExit(f"submit answered {response.status_code}: {response.text[:300]}")
        parts = raw(data, sha256)
        if round_ >= WARMUP:
            submits.append(elapsed)
            raws.append(parts)
    submit_ms, raw_ms = stats(submits), stats([sum(p.values()) for p in raws])
    return {
        "bytes": len(data),
        "submit_ms": submit_ms,
        "raw_ms": raw_ms,
        "raw_parts_ms": {part: stats([p[part] for p in raws])["p50"] for part in raws[0]},
        "submit_over_raw": round(submit_ms["p50"] / raw_ms["p50"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.submit_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="timed rounds (one submit + one raw) per image")
    parser.add_argument("--large-bytes", type=int, default=15_000_000, help="about how big the large GeoTIFF is")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="cropai-bench-submit-"))
    root.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    config = StackConfig(root, 0, 0, 0, 0, workers=0, env={"RECONCILE_SCHEDULE": "0 0 0 1 1 *"})
    try:
        images = {"small": SMALL, "large": sized_scene(root / "large.tif", args.large_bytes)}
        state = up(config, environ)
        settings = Settings.from_env(state["env"])
        raw = Raw(settings, ["B02", "B03", "B04", "B08"])
        try:
            with httpx.Client(timeout=120) as client:
                results = {name: measure(client, state["api_url"], raw, path.read_bytes(), args.n)
                           for name, path in images.items()}  # fmt: skip
        finally:
            raw.close()
        report = {
            "benchmark": "submit_overhead",
            "submit_over_raw": {name: result["submit_over_raw"] for name, result in results.items()},
            **results,
            "images": {name: describe(path) for name, path in images.items()},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1m": os.getloadavg()[0]},
        }
        print(json.dumps(report, indent=2))
    finally:
        down(root)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
