"""A large scene read by URL: a whole-scene crop-health job against a 10-field job on the same tile (issue 12).

    python -m bench.fields [--size 10980] [--tile-dir .local/bench]

Prints one JSON object. The scene is :func:`bench.analysis.cached_scene` (the real crop tiled to ``--size``², 13
bands, deflate, 256 px tiles; made once under ``--tile-dir``), uploaded once to an Azurite the benchmark starts (its
data kept in ``--tile-dir``/azurite, so a second run does not upload again). Three jobs then run one after the
other, each in its own child process, through the worker's real input path: ``JobHandler.prepare`` (the ETag and
size checked; then a whole-scene job copies the blob to the work directory, ``ten_fields`` reads it by ranges through
the ``/vsicurl/`` GDAL path, pinned by its ``If-Match`` header file) and ``JobHandler.analyse`` (``Analyzer.analyse``,
crop-health, the fields from the job's params as a submit stores them), outputs written to local disk and not
uploaded: ``ten_fields``, ``whole_scene_by_ranges`` (the whole scene read by ranges as the worker read it before it
copied whole-scene inputs: ``copy_inputs=False``) and ``whole_scene`` (copied first, the worker's default).

Every request of the child goes through a small counting reverse proxy in front of Azurite (:mod:`bench.proxy`):
``http_bytes`` is the response bytes (bodies) it passed on while the job ran, ``requests`` their number. Per job:
``seconds`` (prepare + analyse, the Analyzer already built), ``peak_rss_mb`` (the child's own ``ru_maxrss``), and
``field_over_whole`` (against ``whole_scene``) and ``copy_over_ranges`` for bytes and time. The 10 fields are
irregular hexagons about 1 km across, one per cell of a 5 x 2 grid over the tile, given in the tile's CRS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import rasterio
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient

from bench.analysis import cached_scene, cpu_model
from bench.proxy import CountingProxy
from local.azurite import start_azurite, stop_azurite
from local.ports import free_port

BLOB = "bench/full_tile.tif"
FIELDS = 10


def field_polygons(path: Path) -> tuple[dict[str, Any], float]:
    """10 hexagons (about 1 km across, each a little irregular) spread over the tile, in its CRS, as a GeoJSON
    FeatureCollection with a ``crs`` member; and the fraction of the tile's area they cover."""
    with rasterio.open(path) as src:
        t, width, height, crs = src.transform, src.width, src.height, src.crs
    features, area = [], 0.0
    for k in range(FIELDS):
        cx = t.c + t.a * width * (0.1 + 0.2 * (k % 5))
        cy = t.f + t.e * height * (0.25 + 0.5 * (k // 5))
        ring = []
        for v in range(6):
            radius = 450.0 + 120.0 * math.sin(3.0 * v + k)  # metres
            angle = math.pi / 3 * v + 0.2 * k
            ring.append([round(cx + radius * math.cos(angle), 2), round(cy + radius * math.sin(angle), 2)])
        ring.append(ring[0])
        area += 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring)))
        features.append({"type": "Feature", "id": f"f{k + 1}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"crop": "maize" if k % 2 else "wheat"}})  # fmt: skip
    collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs.to_string()}},
                  "features": features}  # fmt: skip
    return collection, area / abs(t.a * width * t.e * height)


def upload_once(connection: str, path: Path) -> dict[str, Any]:
    """The tile as blob ``images/bench/full_tile.tif`` (uploaded unless Azurite's data already holds it whole)."""
    blob = BlobClient.from_connection_string(connection, "images", BLOB, max_block_size=8 << 20)
    with BlobServiceClient.from_connection_string(connection) as service:
        if not service.get_container_client("images").exists():
            service.create_container("images")
    try:
        props = blob.get_blob_properties()
        uploaded = props.size == path.stat().st_size
    except ResourceNotFoundError:
        uploaded = False
    seconds = 0.0
    if not uploaded:
        start = time.perf_counter()
        with path.open("rb") as f:
            blob.upload_blob(f, overwrite=True, max_concurrency=4)
        seconds = time.perf_counter() - start
        props = blob.get_blob_properties()
    return {"etag": props.etag, "size": props.size, "upload_seconds": round(seconds, 1)}


def run_job(
    connection: str, reference: dict[str, Any], fields: dict[str, Any] | None, work: Path, copy: bool
) -> dict[str, Any]:
    """One job in a child process (``--child``): its JSON line."""
    spec = {"connection": connection, "reference": reference, "fields": fields, "work": str(work), "copy": copy}
    proc = subprocess.run([sys.executable, "-m", "bench.fields", "--child", json.dumps(spec)],
                          check=True, capture_output=True, text=True)  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def child(spec: dict[str, Any]) -> None:
    """Prepare and analyse one job as the worker does (``JobHandler``), its input by reference; print JSON."""
    from gpu_worker.analysis import Analyzer, select_device
    from gpu_worker.handler import JobHandler
    from shared.jobs import Job, JobStatus, JobStore
    from shared.storage import BlobStore

    class Nothing:
        def check(self) -> None: ...

        def report(self, stage: str, fraction: float = 0.0) -> None: ...

    store = BlobStore(BlobServiceClient.from_connection_string(spec["connection"]))
    analyzer = Analyzer(select_device("auto"))
    handler = JobHandler(cast(JobStore, None), store, analyzer, tmp_dir=Path(spec["work"]), remote=store,
                         copy_inputs=spec["copy"])  # fmt: skip
    reference = spec["reference"]
    params: dict[str, Any] = {"analysis": "crop-health", "bands": [], "scale": 10000.0, "input": reference}
    if spec["fields"] is not None:
        params["fields"] = spec["fields"]
    now = datetime.now(UTC)
    job = Job(job_id=uuid.uuid4(), status=JobStatus.RUNNING, created_at=now, updated_at=now,
              input_blob=reference["location"], input_sha256="", params=params, attempts=1)  # fmt: skip
    with rasterio.open(Path(__file__).parents[1] / "tests" / "data" / "s2_l1c_fields_256.tif") as src:
        params["bands"] = list(src.descriptions)
    start = time.perf_counter()
    prepared = handler.prepare(job, Nothing(), Nothing())
    try:
        output = handler.analyse(job, prepared, Nothing())
        seconds = time.perf_counter() - start
        files = {key: path.stat().st_size for key, (path, _) in output.files.items()}
    finally:
        prepared.close()
    result = output.result
    peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary: dict[str, Any] = {"seconds": round(seconds, 2), "device": str(analyzer.device), "output_bytes": files,
                               "peak_rss_mb": peak_mb}  # fmt: skip
    if "fields" in result:
        summary["fields_window"] = result["fields_window"]
        summary["fields"] = [{"id": f["id"], "area_ha": f["area_ha"], "pixel_count": f["pixel_count"],
                              "ndvi_mean": f["indices"]["ndvi"]["mean"]} for f in result["fields"]]  # fmt: skip
    else:
        summary["ndvi_mean"] = result["indices"]["ndvi"]["mean"]
    print(json.dumps(summary))


def measure(proxy: CountingProxy, connection: str, reference: dict[str, Any], fields: dict[str, Any] | None,
            work: Path, copy: bool = True) -> dict[str, Any]:  # fmt: skip
    proxy.reset()
    result = run_job(connection, reference, fields, work, copy)
    result["http_bytes"], result["requests"] = proxy.bytes, proxy.requests
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10980, help="tile side in pixels (10980: a full tile)")
    parser.add_argument("--tile-dir", type=Path, default=Path(".local/bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    scene = cached_scene(args.tile_dir, args.size)
    fields, covered = field_polygons(scene)
    data = args.tile_dir / f"azurite-{args.size}"
    data.mkdir(parents=True, exist_ok=True)
    direct, azurite, port = start_azurite(data, log_path=args.tile_dir / "azurite-fields.log")
    try:
        upload = upload_once(direct, scene)
        with CountingProxy(port, free_port()) as proxy, tempfile.TemporaryDirectory(dir=args.tile_dir) as work:
            through_proxy = direct.replace(f":{port}/", f":{proxy.port}/")
            reference = {"kind": "blob", "location": BLOB, "etag": upload["etag"], "size": upload["size"]}
            field_job = measure(proxy, through_proxy, reference, fields, Path(work))
            by_ranges = measure(proxy, through_proxy, reference, None, Path(work), copy=False)
            whole_job = measure(proxy, through_proxy, reference, None, Path(work))
    finally:
        stop_azurite(azurite)
    report = {
        "benchmark": "fields", "cpu": cpu_model(),
        "scene": {"size": [args.size, args.size], "bands": 13, "bytes": upload["size"], "blob_tiles_px": 256,
                  "upload_seconds": upload["upload_seconds"]},
        "fields": {"count": FIELDS, "fraction_of_tile": round(covered, 5)},
        "whole_scene": whole_job, "whole_scene_by_ranges": by_ranges, "ten_fields": field_job,
        "copy_over_ranges": {"bytes": round(whole_job["http_bytes"] / by_ranges["http_bytes"], 3),
                             "seconds": round(whole_job["seconds"] / by_ranges["seconds"], 3)},
        "field_over_whole": {"bytes": round(field_job["http_bytes"] / whole_job["http_bytes"], 4),
                             "seconds": round(field_job["seconds"] / whole_job["seconds"], 4)},
        "bytes_over_file": {"whole_scene": round(whole_job["http_bytes"] / upload["size"], 3),
                            "whole_scene_by_ranges": round(by_ranges["http_bytes"] / upload["size"], 3),
                            "ten_fields": round(field_job["http_bytes"] / upload["size"], 4)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
