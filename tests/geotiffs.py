"""GeoTIFF bytes for tests: the real crops in tests/data and small files crafted with rasterio."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.io import MemoryFile
from rasterio.windows import Window

DATA = Path(__file__).parent / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"  # 13 Sentinel-2 L1C bands, uint16, descriptions B01..B12
RGBN = DATA / "s2_rgbn_fields_128.tif"  # B02, B03, B04, B08


def real(path: Path = FIELDS) -> bytes:
    return path.read_bytes()


def crafted(
    *,
    count: int = 4,
    width: int = 32,
    height: int = 32,
    dtype: str = "uint16",
    descriptions: tuple[str | None, ...] | None = ("B02", "B03", "B04", "B08"),
    write: bool = True,
    **profile: Any,
) -> bytes:
    """A georeferenced GeoTIFF in memory; ``write=False`` leaves it sparse (no pixel block written at all)."""
    options: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "crs": "EPSG:32618",
        "transform": Affine(10.0, 0.0, 439730.0, 0.0, -10.0, 4175460.0),
        **profile,
    }
    with MemoryFile() as mem:
        with mem.open(**options) as ds:
            if descriptions is not None:
                for band, text in enumerate(descriptions[:count], start=1):
                    if text:
                        ds.set_band_description(band, text)
            if write:
                rng = np.random.default_rng(0)
                ds.write(rng.integers(1, 5000, size=(count, height, width)).astype(dtype))
        return bytes(mem.read())


def huge_sparse(width: int = 20_000, height: int = 20_000, count: int = 4) -> bytes:
    """A few hundred kilobytes declaring width x height pixels: a decompression bomb if anyone decoded it."""
    return crafted(
        count=count, width=width, height=height, write=False, tiled=True, blockxsize=1024, blockysize=1024,
        compress="deflate", SPARSE_OK=True,
    )  # fmt: skip


def write_scene(
    path: Path,
    data: np.ndarray,
    names: Sequence[str],
    *,
    nodata: float | None = None,
    only: Iterable[Window] | None = None,
    **profile: Any,
) -> Path:
    """``data`` [bands, h, w] as a GeoTIFF at ``path``, its bands described as ``names``. ``only``: write just these
    windows and leave the rest of the file sparse (GDAL's SPARSE_OK: never written, read as ``nodata``, or 0)."""
    count, height, width = data.shape
    options: dict[str, Any] = {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": data.dtype.name,
        "crs": "EPSG:32618", "transform": Affine(10.0, 0.0, 439730.0, 0.0, -10.0, 4175460.0), "nodata": nodata,
        **({"SPARSE_OK": True} if only is not None else {}), **profile,
    }  # fmt: skip
    with rasterio.open(path, "w", **options) as ds:
        for band, name in enumerate(names, start=1):
            ds.set_band_description(band, name)
        if only is None:
            ds.write(data)
        for window in only or ():
            ds.write(data[:, window.toslices()[0], window.toslices()[1]], window=window)
    return path
