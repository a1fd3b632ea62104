"""Cheap GeoTIFF inspection of an upload, before anything is stored.

Only the header is read: the magic bytes, then GDAL's view of the first IFD through an in-memory file. Pixel data is
never decoded, so a decompression bomb (a few kilobytes declaring 100 000 x 100 000 pixels) is refused by its declared
size alone. A file cut short is caught either by GDAL (its IFD is gone) or by the last block of each band ending past
the end of the bytes we were given. A header GDAL opens but Python cannot decode (a band description that is not
UTF-8, a CRS that does not parse when the georeferencing is read) is unreadable too: the client's mistake, never a
500.

The georeferencing (CRS and geotransform) is read only when asked for (``georeferencing``: a submit with field
boundaries places them with it). Building the CRS from the GeoKeys is most of the check's cost (GDAL looks the keys
up in PROJ's database, exports WKT and rasterio parses it again: 0.42 ms of a 0.55 ms warm check of a 100 KB crop,
1.4 ms cold in the Functions host), and nothing else at submit uses it: GDAL then reads the file as it would without
GeoTIFF tags (its ``GEOREF_SOURCES=NONE`` open option). GDAL itself tolerates bad GeoKeys (a CRS it cannot resolve
becomes a local one); an error rasterio raises building the CRS reaches the worker then, which fails the job
``invalid_image`` (``gpu_worker.analysis.raster.GDAL_ERRORS``).

A file whose blocks are all left out (GDAL's ``SPARSE_OK``: a tile or strip with offset 0 is never written, and reads
as the nodata value, or 0 without one) holds no pixel data at all: refused as ``no_valid_pixels``, from the block
offsets in the header. :func:`stored_blocks` is the same block map for the worker, which skips empty windows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile

from shared.rejection import Rejected

# Classic TIFF (little / big endian) and BigTIFF (little / big endian).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Block offsets looked up at most (~0.5 us each), per plane in the worker, in all at submit: 512 x 512 tiles of a full
# Sentinel-2 tile are 484 per band. Past it the map is unknown (every block counts as stored; the worker decides).
MAX_BLOCK_LOOKUPS = 1 << 18
NO_GEOREFERENCING = {"GEOREF_SOURCES": "NONE"}  # GTiff open option: no CRS, no geotransform read

# A file without georeferencing is valid input everywhere here, and a plain upload is checked without reading it:
# rasterio's NotGeoreferencedWarning is never wanted. Filtered once for the process, when this module is imported
# (the worker's and the API's readers import it): warnings.catch_warnings() around each open is not thread-safe, two
# submits in two threads restore each other's filters and the warning escapes.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int
    max_bands: int


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    count: int
    dtype: str
    descriptions: tuple[str | None, ...]
    crs: str | None
    transform: tuple[float, ...] | None = None  # the geotransform, affine a..f; None when the file has none

    @property
    def integer(self) -> bool:
        return bool(np.issubdtype(np.dtype(self.dtype), np.integer))


def inspect(data: bytes, limits: Limits, *, georeferencing: bool = True) -> ImageHeader:
    """Return the header of the GeoTIFF in ``data``; raise :class:`Rejected` with a code saying what is wrong.
    Without ``georeferencing`` its ``crs`` and ``transform`` are not read (``None``)."""
    if not data:
        raise Rejected("empty_body", "the request has no image: send GeoTIFF bytes")
    if len(data) > limits.max_bytes:
        raise Rejected("payload_too_large", f"the image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if data[:4] not in TIFF_MAGIC:
        raise Rejected("not_a_tiff", "the body is not a TIFF file (its first bytes are not a TIFF signature)")
    try:
        with (
            rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
            MemoryFile(data) as mem,
            mem.open(driver="GTiff", **({} if georeferencing else NO_GEOREFERENCING)) as ds,
        ):
            header = check_dataset(ds, len(data), limits)
    except (RasterioError, ValueError) as e:  # ValueError: a band description that is not UTF-8, a CRSError
        raise Rejected("unreadable_image", f"the TIFF cannot be read: {_reason(e)}") from e
    return header


def check_dataset(ds: DatasetReader, size: int, limits: Limits) -> ImageHeader:
    """The header of an open GeoTIFF of ``size`` bytes, checked against ``limits``, for completeness (every block
    inside the file) and for data (some block stored); :class:`Rejected` with a code saying what is wrong. What
    :func:`inspect` does once the bytes are open, and :mod:`shared.ranged` for a file read by ranges."""
    header = _header(ds)
    _check_limits(header, limits)
    _check_complete(ds, size)
    _check_has_data(ds)
    return header


def _header(ds: DatasetReader) -> ImageHeader:
    return ImageHeader(
        width=ds.width,
        height=ds.height,
        count=ds.count,
        dtype=ds.dtypes[0],
        descriptions=tuple(ds.descriptions),
        crs=ds.crs.to_string() if ds.crs else None,
        transform=None if ds.transform.is_identity else tuple(ds.transform)[:6],
    )


def _check_limits(header: ImageHeader, limits: Limits) -> None:
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise Rejected(
            "image_too_large",
            f"the image declares {header.width} x {header.height} = {pixels} pixels; the limit is {limits.max_pixels}",
        )
    if header.count > limits.max_bands:
        raise Rejected("too_many_bands", f"the image has {header.count} bands; the limit is {limits.max_bands}")


def _check_complete(ds: DatasetReader, size: int) -> None:
    """The last block of every band must lie within the bytes received (sparse, never-written blocks are fine)."""
    block_h, block_w = ds.block_shapes[0]
    last = f"BLOCK_OFFSET_{math.ceil(ds.width / block_w) - 1}_{math.ceil(ds.height / block_h) - 1}"
    for band in planes(ds):
        offset = ds.get_tag_item(last, "TIFF", bidx=band)
        length = ds.get_tag_item(last.replace("OFFSET", "SIZE"), "TIFF", bidx=band)
        if offset and length and int(offset) + int(length) > size:
            raise Rejected(
                "truncated_image",
                f"the TIFF is cut short: band {band} needs {int(offset) + int(length)} bytes, the body has {size}",
            )


def _check_has_data(ds: DatasetReader) -> None:
    """Some block of some band must be stored; stops at the first plane that has one. Past
    :data:`MAX_BLOCK_LOOKUPS` blocks in all, the worker decides."""
    blocks = 0
    block_h, block_w = ds.block_shapes[0]
    if math.ceil(ds.height / block_h) * math.ceil(ds.width / block_w) * len(planes(ds)) > MAX_BLOCK_LOOKUPS:
        return
    for plane in planes(ds):
        stored = stored_blocks(ds, plane)
        if stored is None or stored.any():
            return
        blocks += stored.size
    raise Rejected(
        "no_valid_pixels", f"the image holds no pixel data: all {blocks} blocks are empty (a sparse file, none written)"
    )


def planes(ds: DatasetReader) -> list[int]:
    """The 1-based bands that have blocks of their own: only band 1 when the bands are interleaved by pixel."""
    pixel = ds.count == 1 or (ds.interleaving is not None and ds.interleaving.name == "PIXEL")
    return [1] if pixel else list(range(1, ds.count + 1))


def plane_of(ds: DatasetReader, band: int) -> int:
    """The plane (see :func:`planes`) holding 1-based ``band``'s blocks."""
    return band if len(planes(ds)) > 1 else 1


def stored_blocks(ds: DatasetReader, plane: int) -> np.ndarray | None:
    """[rows, cols] bool: which blocks of ``plane`` the file stores (the others read as nodata, or 0 without one);
    None when unknown (not a GeoTIFF, more than :data:`MAX_BLOCK_LOOKUPS` blocks). Header only: GDAL's block
    offsets (``BLOCK_OFFSET_x_y`` in the TIFF domain, absent for a block with offset 0)."""
    block_h, block_w = ds.block_shapes[0]
    rows, cols = math.ceil(ds.height / block_h), math.ceil(ds.width / block_w)
    if ds.driver != "GTiff" or rows * cols > MAX_BLOCK_LOOKUPS:
        return None
    offsets = [
        bool(ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=plane)) for y in range(rows) for x in range(cols)
    ]
    return np.array(offsets, dtype=bool).reshape(rows, cols)


def _reason(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"a text field in its header is not valid {e.encoding.upper()} (byte {e.start})"
    # GDAL prefixes messages with the random in-memory file name; keep only what helps the client.
    text = str(e)
    return text.split(": ", 1)[1] if text.count(": ") and text.split(": ", 1)[0].endswith(".tif") else text
