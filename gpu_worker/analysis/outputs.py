"""Per-pixel outputs written window by window, then turned into Cloud-Optimized GeoTIFFs.

A :class:`RasterSink` writes a tiled GeoTIFF (fast-compressed when large) in ``workdir`` window by window (memory
stays at one window), then :meth:`RasterSink.finish` copies it with GDAL's COG driver: 512 x 512 tiles (a raster that
fits in one: a single tile, the smallest power of two that holds it, :func:`tile_for`), DEFLATE level 1 with a
predictor, internal overviews (computed by GDAL from the full-resolution file, in bounded memory),
same grid and CRS as the input. The partial file is deleted.

Why DEFLATE level 1: on a 1024 x 1024 float32 NDVI, DEFLATE level 6 (GDAL's default) took 89 ms, level 1 49 ms
(1 % larger), ZSTD level 1 26 ms (33 % smaller). ZSTD is not readable everywhere our outputs go: geotiff.js, which
browser viewers (OpenLayers and the like) use, reads it only from its 3.x releases (geotiffjs/geotiff.js#372), so
ZSTD stays inside the worker (the partial files) and the published COGs use DEFLATE, which every TIFF reader has.
A partial file of at most :data:`RAW_PARTIAL_BYTES` uncompressed is not compressed at all: it lives for the moment
of the copy (in the page cache), and compressing and inflating it again cost 10-20 ms of a 1024 x 1024 NDVI's
60-90 ms; the COG is the same, byte for byte. Larger ones (a full tile's: 480 MB of NDVI) stay ZSTD on disk.

Why a smaller tile for a small raster: a tile is stored whole, padded, so a 128 x 128 NDVI in a 512 x 512 tile
compressed 16 times its pixels, and its COG copy took 5.3 ms; in a 128 x 128 tile, 2.1 ms. A field's clip (5 float32
bands over the field's box) saved more. Readers see the same pixels; a tile is still the unit of one range read.

``sparse=True`` (the input itself left blocks out, so windows were skipped): tiles that are all nodata are left out
of the COG too (GDAL's ``SPARSE_OK``; GDAL, rasterio and geotiff.js since 2022, geotiffjs/geotiff.js#305, read
them as nodata). On an 11000 x 11000 float32 output that is nodata but for one window, the COG copy took 0.4 s
instead of 2.6 s. Outputs of inputs without empty blocks are unchanged (dense).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

COG_CONTENT_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
PNG_CONTENT_TYPE = "image/png"
TILE = 512
MIN_TILE = 16  # TIFF tiles are multiples of 16 pixels
DEFLATE_LEVEL = 1
RAW_PARTIAL_BYTES = 64 * 1024 * 1024


def tile_for(width: int, height: int) -> int:
    """The tile side of a ``width`` x ``height`` output: :data:`TILE`, or the smallest power of two (at least
    :data:`MIN_TILE`) that holds the raster when that is smaller."""
    return min(TILE, 1 << (max(width, height, MIN_TILE) - 1).bit_length())


class RasterSink:
    """One output raster on the input's grid. ``overview_resampling``: ``average`` for continuous values,
    ``nearest`` / ``mode`` for classes."""

    def __init__(
        self,
        path: Path,
        grid: dict[str, Any],
        *,
        count: int,
        dtype: str,
        nodata: float,
        overview_resampling: str,
        descriptions: tuple[str, ...] = (),
        sparse: bool = False,
        interleave: str = "pixel",
    ) -> None:
        """``interleave="band"``: bands written at different times (a field clip's) go to blocks of their own."""
        self.path = path
        self.overview_resampling = overview_resampling
        self._sparse = {"SPARSE_OK": True} if sparse else {}
        self._partial = path.with_name(f".{path.stem}.partial.tif")
        self.tile = tile_for(int(grid["width"]), int(grid["height"]))
        raw = int(grid["width"]) * int(grid["height"]) * count * np.dtype(dtype).itemsize
        compress = {"compress": "zstd", "zstd_level": 1} if raw > RAW_PARTIAL_BYTES else {}
        profile = {
            "driver": "GTiff", "count": count, "dtype": dtype, "nodata": nodata, "tiled": True,
            "blockxsize": self.tile, "blockysize": self.tile, **compress, "bigtiff": "if_safer",
            "interleave": interleave, **grid, **self._sparse,
        }  # fmt: skip
        self._dataset: Any = rasterio.open(self._partial, "w", **profile)
        for i, text in enumerate(descriptions, start=1):
            self._dataset.set_band_description(i, text)

    def write(self, window: Window, data: np.ndarray, indexes: list[int] | None = None) -> None:
        """``data`` is [count, h, w] (or [h, w] for one band) for ``window``; ``indexes``: the 1-based bands it
        holds (default: all of them)."""
        data = data if data.ndim == 3 else data[None]
        self._dataset.write(data, indexes=indexes or list(range(1, data.shape[0] + 1)), window=window)

    def finish(self) -> Path:
        """Close the partial file and write the COG; returns its path."""
        self._dataset.close()
        rasterio.shutil.copy(
            self._partial, self.path, driver="COG", compress="DEFLATE", level=DEFLATE_LEVEL, predictor="YES",
            blocksize=self.tile,
            overview_resampling=self.overview_resampling, bigtiff="IF_SAFER", **self._sparse,
        )  # fmt: skip
        self._partial.unlink()
        return self.path

    def discard(self) -> None:
        self._dataset.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> RasterSink:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is not None:
            self.discard()
