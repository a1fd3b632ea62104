"""Analysis throughput per stage, against the rasterio decode of the same file, and (``--full-tile``) on a full tile.

    python -m bench.analysis [--sizes 1024,2048] [--repeat 3] [--full-tile] [--tile-dir .local/bench]

Prints one JSON object. Stages are timed model-only on data already in memory (except ``read`` and
``cog_write``, which are the I/O stages), on the CPU and, when CUDA is available, on the GPU:

* ``read``: rasterio window reads of the six bands pass 2 uses (a fresh handle each time: decoded, not cached),
  DN -> reflectance on the device;
* ``indices``: NDVI, NDWI, EVI, SAVI + validity + streaming statistics for one 1024 x 1024 window;
* ``cloud_mask``: s2cloudless on the 160 m grid (LightGBM, CPU) + torch post-processing, expressed per 10 m
  scene pixel (``coarse_cells_per_s`` is the rate on 160 m cells);
* ``cover``: the fractional-cover MLP on 1024 x 1024 pixels;
* ``cog_write``: a float32 NDVI raster written window by window then copied to a COG with overviews;
* ``end_to_end``: ``Analyzer.analyse`` per ``--sizes`` square 13-band scene (both passes, all outputs; one
  untimed warm-up run first, then the best of ``--e2e-repeat``); ``end_to_end_bfloat16`` the same with the cover
  MLP in bfloat16 (``ANALYSIS_MIXED_PRECISION=bfloat16``: faster, not exact; off in the worker by default).

``decode`` (per size): rasterio's decode of the scene, every band of the file (a superset of the bands the two passes
read: pass 1 the ten s2cloudless bands, pass 2 the index and cover bands, 11 of the 13), 1024 x 1024 windows, one
read per window: each 256 x 256 block decoded once, in one thread, into uint16 arrays. The scene is pixel-interleaved
(as Sentinel-2 stacks usually are), so a block is inflated whole whatever bands are asked for (asking for 11 or 4
bands instead of 13 was at most ~15 % faster here): this is about the least decode work any analysis of the file
can do. ``analysis_over_decode`` = end-to-end Mpx/s / decode Mpx/s per
device and size: 1.0 would be an analysis as fast as decoding its input (``analysis_over_decode_bfloat16``: the
same for the bfloat16 runs).

The scene is the real Sentinel-2 crop ``tests/data/s2_l1c_fields_256.tif`` tiled (with its 8 mirror images, so
there are no seams of identical pixels) to the requested size: real reflectances, deflate-compressed, 256 px tiles.
``--full-tile`` writes a 10980 x 10980 13-band tile the same way (kept in ``--tile-dir`` for the next run) and runs
the analysis in a child process, reporting its wall time and peak RSS (``ru_maxrss`` of the child), then the decode
rate of the tile and ``analysis_over_decode``. Mpx/s are 10 m scene pixels per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from gpu_worker.analysis import AnalysisRequest, Analyzer
from gpu_worker.analysis.cloudmask import CloudDetector, postprocess
from gpu_worker.analysis.cover import FractionalCover
from gpu_worker.analysis.indices import INDICES, compute
from gpu_worker.analysis.outputs import RasterSink
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.analysis.stats import StreamingStats

CROP = Path(__file__).parents[1] / "tests" / "data" / "s2_l1c_fields_256.tif"
WINDOW = 1024


def make_scene(path: Path, size: int) -> Path:
    """A ``size`` x ``size`` 13-band uint16 GeoTIFF tiled from the real crop, written one 256-row strip at a time."""
    with rasterio.open(CROP) as src:
        crop = src.read()
        profile = src.profile | {"width": size, "height": size, "tiled": True, "blockxsize": 256, "blockysize": 256,
                                 "compress": "deflate", "zlevel": 1, "predictor": 2, "bigtiff": "if_safer"}  # fmt: skip
        names = src.descriptions
    variants = [crop[:, :: (1 - 2 * (k & 1)), :: (1 - 2 * (k >> 1 & 1))] for k in range(4)]
    n = crop.shape[1]
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, n):
            strip = np.concatenate([variants[(row // n + col // n) % 4] for col in range(0, size, n)], axis=2)
            h = min(n, size - row)
            dst.write(strip[:, :h, :size], window=Window(0, row, size, h))
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path


def rate(fn: Callable[[], Any], pixels: int, repeat: int, sync: Callable[[], None]) -> float:
    """Best-of-``repeat`` throughput in Mpx/s (after one warm-up call)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return pixels / best / 1e6


def stages(scene: Path, device: torch.device, repeat: int, workdir: Path) -> dict[str, Any]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out: dict[str, Any] = {}
    with SceneReader(scene, [], 10000.0, device) as reader:
        window = Window(0, 0, WINDOW, WINDOW)
        six = [reader.bands.index(r) for r in FractionalCover.BANDS]

        def read() -> None:  # a fresh handle each time: decoded, not served from GDAL's block cache
            with SceneReader(scene, [], 10000.0, device) as fresh:
                fresh.read(window, six)

        out["read"] = rate(read, WINDOW * WINDOW, repeat, sync)
        block = reader.read(window, six)
        roles = FractionalCover.BANDS
        bands = {r: block.values[i] for i, r in enumerate(roles)}
        valid = {r: block.valid[i] for i, r in enumerate(roles)}

        def indices() -> None:
            for spec in INDICES:
                values, mask = compute(spec, bands, valid)
                StreamingStats(*spec.histogram_range, device).update(values, mask)

        out["indices"] = rate(indices, WINDOW * WINDOW, repeat, sync)
        model = FractionalCover.load(device)
        x = block.values.float()[None]

        def cover() -> None:
            with torch.inference_mode():
                model(x)

        out["cover"] = rate(cover, WINDOW * WINDOW, repeat, sync)
    detector = CloudDetector()
    cells = (WINDOW // 16) ** 2 * 16  # 16 windows' worth of 160 m cells
    coarse = np.random.default_rng(0).uniform(0.01, 0.4, size=(cells, 10)).astype(np.float32)
    lgbm_cells = rate(lambda: detector.probability(coarse), cells, repeat, sync) * 1e6
    prob = torch.rand(687, 687, device=device)
    post_cells = rate(lambda: postprocess(prob), 687 * 687, repeat, sync) * 1e6
    per_cell = 1 / lgbm_cells + 1 / post_cells
    out["cloud_mask"] = 256 / per_cell / 1e6  # 256 scene pixels (10 m) per 160 m cell
    out["cloud_mask_coarse_cells_per_s"] = 1 / per_cell
    return out


def cog_rate(scene: Path, workdir: Path, repeat: int) -> float:
    with rasterio.open(scene) as src:
        grid = {"width": src.width, "height": src.height, "crs": src.crs, "transform": src.transform}
    ndvi = np.random.default_rng(0).uniform(-1, 1, size=(WINDOW, WINDOW)).astype(np.float32)

    def write() -> None:
        sink = RasterSink(workdir / "bench_ndvi.tif", grid, count=1, dtype="float32", nodata=float("nan"),
                          overview_resampling="average")  # fmt: skip
        for row in range(0, grid["height"], WINDOW):
            for col in range(0, grid["width"], WINDOW):
                h, w = min(WINDOW, grid["height"] - row), min(WINDOW, grid["width"] - col)
                sink.write(Window(col, row, w, h), ndvi[:h, :w])
        sink.finish()

    return rate(write, grid["width"] * grid["height"], repeat, lambda: None)


def decode(scene: Path, windows: list[Window] | None = None, threads: int = 1) -> float:
    """Seconds to decode every band of ``windows`` (all 1024 x 1024 windows of the scene by default) with rasterio,
    split among ``threads`` threads, each with its own dataset handle (GDAL handles are not thread-safe)."""
    with rasterio.open(scene) as src:
        width, height, bands = src.width, src.height, list(range(1, src.count + 1))
    if windows is None:
        windows = [Window(c, r, min(WINDOW, width - c), min(WINDOW, height - r))
                   for r in range(0, height, WINDOW) for c in range(0, width, WINDOW)]  # fmt: skip

    def part(mine: list[Window]) -> None:
        with rasterio.open(scene) as src:  # a fresh handle: no block of an earlier run in GDAL's cache
            for window in mine:
                src.read(bands, window=window)

    start = time.perf_counter()
    if threads == 1:
        part(windows)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, [windows[k::threads] for k in range(threads)]))
    return time.perf_counter() - start


def decode_rate(scene: Path, repeat: int) -> dict[str, float]:
    with rasterio.open(scene) as src:
        pixels, count = src.width * src.height, src.count
    best = min(decode(scene) for _ in range(repeat + 1))  # the first one warms the page cache
    return {"mpx_per_s": round(pixels / best / 1e6, 3), "seconds": round(best, 3), "bands": count}


def end_to_end(
    scenes: dict[int, Path], device: torch.device, workdir: Path, repeat: int, precision: torch.dtype | None = None
) -> dict[str, dict[str, float]]:
    """``Analyzer.analyse`` per scene: one warm-up run on the smallest, then the best of ``repeat`` per scene
    (``precision``: the cover MLP's, as ``ANALYSIS_MIXED_PRECISION``)."""
    analyzer = Analyzer(device, precision=precision)
    request = AnalysisRequest("crop-health", [], 10000.0)

    def once(scene: Path) -> float:
        with tempfile.TemporaryDirectory(dir=workdir) as out:
            start = time.perf_counter()
            analyzer.analyse(scene, request, Path(out))
            return time.perf_counter() - start

    once(scenes[min(scenes)])
    result = {}
    for size, scene in scenes.items():
        seconds = min(once(scene) for _ in range(repeat))
        result[str(size)] = {"seconds": round(seconds, 3), "mpx_per_s": round(size * size / seconds / 1e6, 3)}
    return result


def cached_scene(tile_dir: Path, size: int) -> Path:
    """``tile_dir/s2_full_tile_{size}.tif``, made once (written under another name, then renamed: never half)."""
    tile_dir.mkdir(parents=True, exist_ok=True)
    scene = tile_dir / f"s2_full_tile_{size}.tif"
    if not scene.exists():
        partial = make_scene(scene.with_suffix(".partial.tif"), size)
        partial.replace(scene)
    return scene


def full_tile(tile_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    scene = cached_scene(tile_dir, 10980)
    generated = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=tile_dir) as work:
        code = (
            "import json, resource, sys, time, torch; from pathlib import Path;"
            "from gpu_worker.analysis import AnalysisRequest, Analyzer, select_device;"
            "a = Analyzer(select_device('auto')); t = time.perf_counter();"
            f"o = a.analyse(Path({str(scene)!r}), AnalysisRequest('crop-health', [], 10000.0), Path({work!r}));"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'cloud_fraction': o.result['cloud_fraction'],"
            "'device': str(a.device),"
            "'ndvi_mean': o.result['indices']['ndvi']['mean'], 'files': {k: Path(p).stat().st_size for k, (p, _) in"
            " o.files.items()}}))"
        )
        proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    mpx_per_s = 10980 * 10980 / child["seconds"] / 1e6
    decode_mpx_per_s = 10980 * 10980 / decode(scene) / 1e6
    return {
        "size": [10980, 10980], "bands": 13, "input_bytes": scene.stat().st_size,
        "generate_seconds": round(generated, 1), "analyse_seconds": round(child["seconds"], 1),
        "mpx_per_s": round(mpx_per_s, 3), "decode_mpx_per_s": round(decode_mpx_per_s, 3),
        "analysis_over_decode": round(mpx_per_s / decode_mpx_per_s, 4), "peak_rss_mb": round(peak_mb),
        "device": child["device"], "output_bytes": child["files"], "ndvi_mean": child["ndvi_mean"],
        "cloud_fraction": child["cloud_fraction"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048", help="scene sides (the stages use the largest)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the stages and the decode")
    parser.add_argument("--e2e-repeat", type=int, default=3, help="best of N for the end-to-end runs (as the decode)")
    parser.add_argument("--full-tile", action="store_true")
    parser.add_argument("--tile-dir", type=Path, default=Path(".local/bench"))
    args = parser.parse_args(argv)
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    devices = [torch.device("cpu")] + ([torch.device("cuda:0")] if torch.cuda.is_available() else [])
    report: dict[str, Any] = {
        "benchmark": "analysis", "unit": "Mpx/s (10 m scene pixels per second, best of repeats)",
        "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "devices": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scenes = {size: make_scene(work / f"scene_{size}.tif", size) for size in sizes}
        report["decode"] = {str(size): decode_rate(scene, args.repeat) for size, scene in scenes.items()}
        largest = scenes[sizes[-1]]
        for device in devices:
            result: dict[str, Any] = {k: round(v, 3) for k, v in stages(largest, device, args.repeat, work).items()}
            result["cog_write"] = round(cog_rate(largest, work, args.repeat), 3)
            result["end_to_end"] = end_to_end(scenes, device, work, args.e2e_repeat)
            result["end_to_end_bfloat16"] = end_to_end(scenes, device, work, args.e2e_repeat, torch.bfloat16)
            report["devices"][str(device)] = result
    for key in ("", "_bfloat16"):
        report[f"analysis_over_decode{key}"] = {
            device: {size: round(e2e["mpx_per_s"] / report["decode"][size]["mpx_per_s"], 4)
                     for size, e2e in result[f"end_to_end{key}"].items()}
            for device, result in report["devices"].items()
        }  # fmt: skip
    if args.full_tile:
        report["full_tile"] = full_tile(args.tile_dir)
    print(json.dumps(report, indent=2))
    return 0


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
