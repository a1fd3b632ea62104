"""The GPU run: one command on a GPU machine (``make bench-gpu``, ``python -m bench.gpu``), one JSON object on stdout.

``python -m bench.gpu [--tile-size 10980] [--tile-dir .local/bench] [--decode-rows 4096] [--device cuda] [--out F]``

Needs only the worker's dependencies (``pip install -r requirements-worker.txt`` and torch with CUDA, as in the
image of ``Dockerfile.gpu``; on a lent GPU machine, which reaches no package index, the archive of
:mod:`bench.gpu_kit`); no stack, no Azure. Without CUDA it prints a JSON note and exits 0 (``--device cpu``
runs every step on the CPU instead: a check of the script, not a GPU figure). Steps, on the device:

* ``stages``: ``bench.analysis``'s per-stage Mpx/s (read, indices, cover, cloud mask) on a 2048 x 2048 scene;
* ``sizes``: ``Analyzer.analyse`` end to end on 1024 and 2048 square scenes, their CPU decode rate and
  ``analysis_over_decode`` (as ``bench.analysis``);
* ``full_tile``: ``Analyzer.analyse`` of a ``--tile-size`` square 13-band tile (``bench.analysis.make_scene``, kept
  in ``--tile-dir`` for the next run) after the runs above (warm): seconds, Mpx/s, peak GPU memory
  (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over that run) and this process's peak RSS;
* ``decode``: the tile's CPU decode (every band, 1024 x 1024 windows of its first ``--decode-rows`` rows) with 1, 2,
  4, ... threads up to the CPU count, each thread its own dataset handle: Mpx/s per thread count;
* ``balance``: the tile's analysis Mpx/s over each thread count's decode Mpx/s (``analysis_over_decode``), the
  device's compute rate (indices + cover of a window, data in device memory) and the decode threads it takes to
  keep up with each (``threads_to_feed``, from the one-thread rate);
* ``cover_batching``: the fractional-cover MLP over ``--batch-jobs`` jobs of 128 x 128 pixels: one call per job
  vs one call on all of them stacked (what a cross-job batcher does): Mpx/s each and ``batched_over_unbatched``;
  ``batcher``: when ``gpu_worker/analysis/batcher.py`` is there, its ``DynamicBatcher`` (one submit per job) against
  direct ``predict_pixels`` calls per job (``batcher_over_direct``), else why it was not measured;
* ``analyses_at_once``: the worker's analysis of ``--batch-jobs`` small real scenes (the 256 x 256 x 13 crops of
  ``tests/data``, alternately), as its computing threads run them: one at a time with the cover MLP unbatched
  (``WORKER_ANALYSES=1``, ``ANALYSIS_BATCHING=false``) against 2 and 4 threads sharing one analyzer whose cover MLP
  goes through the dynamic batcher (``WORKER_ANALYSES=N``, ``ANALYSIS_BATCHING=true``): jobs/s each,
  ``over_one_at_a_time``, the model calls, and the largest difference of any job's mean cover fractions from its
  one-at-a-time result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rasterio
import torch
from rasterio.windows import Window

from bench.analysis import (
    WINDOW,
    cached_scene,
    cpu_model,
    decode,
    decode_rate,
    end_to_end,
    make_scene,
    rate,
    stages,
)
from gpu_worker.analysis import AnalysisRequest, Analyzer
from gpu_worker.analysis.cover import FractionalCover

REPO = Path(__file__).resolve().parents[1]


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": str(device), "commit": commit(),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_tile(tile: Path, device: torch.device, workdir: Path) -> dict[str, Any]:
    analyzer = Analyzer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        start = time.perf_counter()
        output = analyzer.analyse(tile, AnalysisRequest("crop-health", [], 10000.0), Path(out))
        sync(device)
        seconds = time.perf_counter() - start
    with rasterio.open(tile) as src:
        width, height, count = src.width, src.height, src.count
    result: dict[str, Any] = {
        "size": [width, height], "bands": count, "input_bytes": tile.stat().st_size,
        "seconds": round(seconds, 2), "mpx_per_s": round(width * height / seconds / 1e6, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cloud_fraction": output.result["cloud_fraction"],
    }  # fmt: skip
    if device.type == "cuda":
        result["gpu_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        result["gpu_max_memory_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
    return result


def decode_threads(tile: Path, rows: int) -> dict[str, float]:
    """Decode Mpx/s of the tile's first ``rows`` rows per thread count (1, 2, 4, ... up to the CPU count)."""
    with rasterio.open(tile) as src:
        width, height = src.width, min(rows, src.height)
    windows = [Window(c, r, min(WINDOW, width - c), min(WINDOW, height - r))
               for r in range(0, height, WINDOW) for c in range(0, width, WINDOW)]  # fmt: skip
    decode(tile, windows)  # the page cache warmed
    counts = sorted({2**k for k in range(int(math.log2(os.cpu_count() or 1)) + 1)} | {os.cpu_count() or 1})
    return {str(n): round(width * height / decode(tile, windows, n) / 1e6, 2) for n in counts}


def balance(tile_mpx_per_s: float, stage: dict[str, Any], decoded: dict[str, float]) -> dict[str, Any]:
    compute = 1 / (1 / stage["indices"] + 1 / stage["cover"])
    one = decoded["1"]
    return {
        "analysis_over_decode": {n: round(tile_mpx_per_s / rate_, 3) for n, rate_ in decoded.items()},
        "device_compute_mpx_per_s": round(compute, 2),
        "threads_to_feed": {"analysis": math.ceil(tile_mpx_per_s / one), "device_compute": math.ceil(compute / one)},
    }


def cover_batching(device: torch.device, jobs: int, repeat: int) -> dict[str, Any]:
    """The cover MLP over ``jobs`` jobs of 128 x 128 pixels, one call per job vs one call on all of them; and, when
    ``gpu_worker.analysis.batcher`` is there, its ``DynamicBatcher`` (one submit per job, host rows, as the worker's
    threads would) vs direct ``predict_pixels`` calls per job."""
    model = FractionalCover.load(device)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 6, 128, 128, generator=generator).mul(0.4).add(0.01).to(device) for _ in range(jobs)]
    stacked = torch.cat(images)
    pixels = jobs * 128 * 128

    def timed(fn: Callable[[], object]) -> float:
        def call() -> None:
            with torch.inference_mode():
                fn()

        return rate(call, pixels, repeat, lambda: sync(device))

    one = timed(lambda: [model(x) for x in images])
    many = timed(lambda: model(stacked))
    result: dict[str, Any] = {
        "jobs": jobs, "pixels_per_job": 128 * 128, "unbatched_mpx_per_s": round(one, 2),
        "batched_mpx_per_s": round(many, 2), "batched_over_unbatched": round(many / one, 2),
    }  # fmt: skip
    try:
        rows = [x[0, 1:].reshape(5, -1).t().contiguous().cpu() for x in images]  # [P, 5] used bands, host
        result["batcher"] = through_batcher(model, device, rows, timed)
    except Exception as e:  # absent, or its interface moved: say so, keep the rest
        result["batcher"] = f"not measured: {type(e).__name__}: {e}"
    return result


def through_batcher(
    model: FractionalCover,
    device: torch.device,
    rows: list[torch.Tensor],
    timed: Callable[[Callable[[], object]], float],
) -> dict[str, Any]:
    batcher: Any = importlib.import_module("gpu_worker.analysis.batcher")  # may not exist (yet)
    max_rows = batcher.default_max_rows(device)
    with batcher.DynamicBatcher(model.predict_pixels, max_rows=max_rows, max_wait=0.002, device=device,
                                name="bench", out_features=3) as dynamic:  # fmt: skip
        direct = timed(lambda: [model.predict_pixels(x.to(device)) for x in rows])
        batched = timed(lambda: [f.result() for f in [dynamic.submit(x) for x in rows]])
        calls = dynamic.batches
    return {
        "max_rows": max_rows, "max_wait_s": 0.002, "direct_mpx_per_s": round(direct, 2),
        "batcher_mpx_per_s": round(batched, 2), "batcher_over_direct": round(batched / direct, 2), "model_calls": calls,
    }  # fmt: skip


SMALL_SCENES = (REPO / "tests/data/s2_l1c_fields_256.tif", REPO / "tests/data/s2_l1c_coast_256.tif")


def analyses_at_once(device: torch.device, jobs: int, workdir: Path) -> dict[str, Any]:
    """Jobs/s of ``jobs`` small scenes analysed one at a time, unbatched, and by 2 and 4 threads sharing one batched
    analyzer (what the worker's computing threads do); see the module docstring."""
    scenes = [SMALL_SCENES[i % len(SMALL_SCENES)] for i in range(jobs)]
    request = AnalysisRequest("crop-health", [], 10000.0)

    def run(analyzer: Analyzer, threads: int) -> tuple[float, list[list[float]]]:
        def one(i: int) -> list[float]:
            with tempfile.TemporaryDirectory(dir=workdir) as out:
                cover = analyzer.analyse(scenes[i], request, Path(out)).result["cover"]
                return [cover[k] for k in sorted(cover)]

        analyzer.analyse(scenes[0], request, Path(tempfile.mkdtemp(dir=workdir)))  # warm-up, untimed
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            covers = list(pool.map(one, range(jobs)))
        sync(device)
        return time.perf_counter() - start, covers

    seconds, reference = run(Analyzer(device, batching=False), 1)
    result: dict[str, Any] = {"jobs": jobs, "scenes": [p.name for p in SMALL_SCENES],
                              "one_at_a_time": {"jobs_per_s": round(jobs / seconds, 2)}}  # fmt: skip
    for threads in (2, 4):
        analyzer = Analyzer(device, batching=True)
        took, covers = run(analyzer, threads)
        batcher = getattr(analyzer._crop_health, "_batcher", None)
        result[f"batched_{threads}_at_once"] = {
            "jobs_per_s": round(jobs / took, 2), "over_one_at_a_time": round(seconds / took, 2),
            "model_calls": batcher.batches if batcher is not None else None,
            "max_abs_cover_mean_difference": max(abs(a - b) for x, y in zip(covers, reference, strict=True)
                                                 for a, b in zip(x, y, strict=True)),
        }  # fmt: skip
    return result


def written(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """``report``, also written to ``out`` when given: whole or not at all (a temporary file renamed over it), so a
    run killed at its time limit leaves the last complete report."""
    if out is not None:
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a dry run of the script)")
    parser.add_argument("--tile-size", type=int, default=10980)
    parser.add_argument("--tile-dir", type=Path, default=Path(".local/bench"))
    parser.add_argument("--decode-rows", type=int, default=4096, help="rows of the tile the decode sweep reads")
    parser.add_argument("--batch-jobs", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the report there after each step (a run cut short "
                        "by a time limit keeps the steps it finished)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        note = "CUDA is not available on this machine: nothing measured (python -m bench.gpu --device cpu checks it)"
        absent = {"benchmark": "gpu", "cuda": False, "torch": torch.__version__, "note": note}
        print(json.dumps(written(absent, args.out)))
        return 0
    report: dict[str, Any] = {"benchmark": "gpu"}

    def step(name: str, value: Any) -> None:
        report[name] = value
        written(report, args.out)

    step("machine", machine(device))

    args.tile_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tile_dir) as tmp:
        work = Path(tmp)
        scenes = {size: make_scene(work / f"scene_{size}.tif", size) for size in (1024, 2048)}
        step("stages", {k: round(v, 3) for k, v in stages(scenes[2048], device, args.repeat, work).items()})
        e2e = end_to_end(scenes, device, work, 1)
        decoded = {str(size): decode_rate(scene, 1) for size, scene in scenes.items()}
        sizes = {}
        for size, result in e2e.items():
            ratio = round(result["mpx_per_s"] / decoded[size]["mpx_per_s"], 4)
            sizes[size] = {"end_to_end": result, "decode": decoded[size], "analysis_over_decode": ratio}
        step("sizes", sizes)
        step("cover_batching", cover_batching(device, args.batch_jobs, args.repeat))
        step("analyses_at_once", analyses_at_once(device, args.batch_jobs, work))
        start = time.perf_counter()
        tile = cached_scene(args.tile_dir, args.tile_size)
        generated = time.perf_counter() - start
        step("full_tile", {**full_tile(tile, device, work), "generate_seconds": round(generated, 1)})
    step("decode", decode_threads(tile, args.decode_rows))
    step("balance", balance(report["full_tile"]["mpx_per_s"], report["stages"], report["decode"]))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
