"""Analysis throughput per stage, and (``--full-tile``) peak memory on a full 10980 x 10980 Sentinel-2 tile.

    python -m bench.analysis [--size 2048] [--repeat 3] [--full-tile] [--tile-dir .local/bench]

Prints one JSON object. Stages are timed model-only on data already in memory (except ``read`` and
``cog_write``, which are the I/O stages), on the CPU and, when CUDA is available, on the GPU:

* ``read``: rasterio window reads of the six bands pass 2 uses, DN -> float64 reflectance on the device;
* ``indices``: NDVI, NDWI, EVI, SAVI + validity + streaming statistics for one 1024 x 1024 window;
* ``cloud_mask``: s2cloudless on the 160 m grid (LightGBM, CPU) + torch post-processing, expressed per 10 m
  scene pixel (``coarse_cells_per_s`` is the rate on 160 m cells);
* ``cover``: the fractional-cover MLP on 1024 x 1024 pixels;
* ``cog_write``: a float32 NDVI raster written window by window then copied to a COG with overviews;
* ``end_to_end``: ``Analyzer.analyse`` on a ``--size`` square 13-band scene (both passes, all outputs).

The scene is the real Sentinel-2 crop ``tests/data/s2_l1c_fields_256.tif`` tiled (with its 8 mirror images, so
there are no seams of identical pixels) to the requested size: real reflectances, deflate-compressed, 256 px tiles.
``--full-tile`` writes a 10980 x 10980 13-band tile the same way and runs the analysis in a child process,
reporting its wall time and peak RSS (``ru_maxrss`` of the child).
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
        out["read"] = rate(lambda: reader.read(window, six), WINDOW * WINDOW, repeat, sync)
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


def end_to_end(scene: Path, device: torch.device, workdir: Path) -> dict[str, float]:
    analyzer = Analyzer(device)
    start = time.perf_counter()
    analyzer.analyse(scene, AnalysisRequest("crop-health", [], 10000.0), workdir)
    seconds = time.perf_counter() - start
    with rasterio.open(scene) as src:
        pixels = src.width * src.height
    return {"seconds": round(seconds, 2), "mpx_per_s": round(pixels / seconds / 1e6, 3)}


def full_tile(tile_dir: Path) -> dict[str, Any]:
    tile_dir.mkdir(parents=True, exist_ok=True)
    scene = tile_dir / "s2_full_tile_10980.tif"
    start = time.perf_counter()
    if not scene.exists():
        make_scene(scene, 10980)
    generated = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=tile_dir) as work:
        code = (
            "import json, resource, sys, time, torch; from pathlib import Path;"
            "from gpu_worker.analysis import AnalysisRequest, Analyzer, select_device;"
            "a = Analyzer(select_device('auto')); t = time.perf_counter();"
            f"o = a.analyse(Path({str(scene)!r}), AnalysisRequest('crop-health', [], 10000.0), Path({work!r}));"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'cloud_fraction': o.result['cloud_fraction'],"
            "'ndvi_mean': o.result['indices']['ndvi']['mean'], 'files': {k: Path(p).stat().st_size for k, (p, _) in"
            " o.files.items()}}))"
        )
        proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "size": [10980, 10980], "bands": 13, "input_bytes": scene.stat().st_size,
        "generate_seconds": round(generated, 1), "analyse_seconds": round(child["seconds"], 1),
        "mpx_per_s": round(10980 * 10980 / child["seconds"] / 1e6, 3), "peak_rss_mb": round(peak_mb),
        "output_bytes": child["files"], "ndvi_mean": child["ndvi_mean"], "cloud_fraction": child["cloud_fraction"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--full-tile", action="store_true")
    parser.add_argument("--tile-dir", type=Path, default=Path(".local/bench"))
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda:0")] if torch.cuda.is_available() else [])
    report: dict[str, Any] = {
        "benchmark": "analysis", "unit": "Mpx/s (10 m scene pixels per second, best of repeats)",
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "devices": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene = make_scene(work / "scene.tif", args.size)
        for device in devices:
            result: dict[str, Any] = {k: round(v, 3) for k, v in stages(scene, device, args.repeat, work).items()}
            result["cog_write"] = round(cog_rate(scene, work, args.repeat), 3)
            out_dir = work / f"out-{device.type}"
            out_dir.mkdir()
            result["end_to_end"] = end_to_end(scene, device, out_dir)
            report["devices"][str(device)] = result
    if args.full_tile:
        report["full_tile"] = full_tile(args.tile_dir)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
