"""Reading a GeoTIFF window by window onto the device, with band roles and nodata resolved once.

Every rasterio / GDAL failure (not a raster, truncated, corrupt block) becomes :class:`shared.errors.InvalidImage`
at this edge, so nothing above it catches GDAL exceptions, except for an input by reference
(:class:`~gpu_worker.analysis.request.Input`): a read through rasterio's opener (an outside URL) that failed raises
what its source raised (``input_missing``, ``input_changed``, the transient ``image_unreachable``...: the opener
records it, GDAL only sees a short read), and a ``/vsicurl/`` read (a blob of our storage) that failed on the network
becomes the transient :class:`shared.inputs.SourceUnavailable` (:func:`gdal_errors_as_invalid_image`).

:meth:`SceneReader.blocks` decodes the next window in a background thread while the caller computes on the current
one (GDAL releases the GIL while it decompresses); a lock keeps the dataset to one reader at a time, since a GDAL
dataset handle is not thread-safe. On CUDA the decoded values go through pinned memory, so that the copy to the GPU
is asynchronous.

:meth:`SceneReader.holds_data` says whether a window has any pixel data stored at all: a tiled or stripped GeoTIFF
may leave blocks out (GDAL's ``SPARSE_OK``), and GDAL reads such a block as the nodata value (0 without one). The
analyses skip such windows instead of decoding and computing on fill values: a 1.7 KB file declaring 11000 x 11000
pixels would otherwise cost seconds of CPU per band set (docs/analysis.md, "Sparse files").
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import torch
from rasterio._err import CPLE_BaseError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from gpu_worker.analysis.request import Input
from shared.bands import BandError, BandSet, resolve
from shared.errors import InvalidImage
from shared.geotiff import plane_of, stored_blocks
from shared.inputs import SourceUnavailable

# CRSError: a CRS rasterio cannot build from what GDAL read (a ValueError, not a RasterioError). The submit does not
# build the CRS of an image without fields (shared.geotiff), so the worker is the first to meet one.
GDAL_ERRORS = (rasterio.errors.RasterioError, rasterio.errors.CRSError, CPLE_BaseError)
# How GDAL (3.10.3, measured) reports a ranged read of /vsicurl/ that failed (an HTTP error status after its own
# retries, a timeout, a reset connection): the HTTP status goes to the debug log only. A block read fails short
# ("TIFFFillTile:Read error at row 4294967295, col 4294967295, tile 0; got 0 bytes, expected 458942"): the network,
# since submit checked that every block lies within the file and its size and ETag are pinned (If-Match). Opening
# fails "not recognized as being in a supported file format" when the first request fails: submit read that header,
# so it is the network too. A directory read that fails ("TIFFReadDirectory:Failed to read directory at offset N")
# is the network only when N lies within the file: a later IFD's offset past the end is a corrupt file, never
# retried. A status GDAL does report ("HTTP response code: 503") is transient when it is 5xx, 408 or 429, or 401 or
# 403 (our own storage refusing our SAS: a role assignment still propagating); a 404 or 412 is left to the worker,
# which re-checks the blob and says input_missing or input_changed.
_SHORT_READ = re.compile(r"(?<!vsi)curl|got \d+ bytes, expected|not recognized as being in a supported file format",
                         re.IGNORECASE)  # fmt: skip
_DIRECTORY = re.compile(r"failed to read directory at offset (\d+)", re.IGNORECASE)
_STATUS = re.compile(r"HTTP (?:response |error )?code\s*:?\s*(\d{3})", re.IGNORECASE)
_TRANSIENT_STATUS = (401, 403, 408, 429)


def _messages(error: BaseException) -> Iterator[str]:
    """The error's text and that of the GDAL errors it chains (rasterio chains the ones raised before it)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        current = current.__cause__ or current.__context__


def _network(error: BaseException, size: int | None) -> bool:
    """Whether a failed ``/vsicurl/`` read of a file of ``size`` bytes failed on the network (see :data:`_STATUS`)."""
    for text in _messages(error):
        status = _STATUS.search(text)
        if status is not None:
            code = int(status.group(1))
            return code >= 500 or code in _TRANSIENT_STATUS
        directory = _DIRECTORY.search(text)
        if directory is not None:
            return size is not None and int(directory.group(1)) < size
        if _SHORT_READ.search(text):
            return True
    return False


@contextmanager
def gdal_errors_as_invalid_image(what: str, *, source: Input | None = None) -> Iterator[None]:
    """GDAL errors become :class:`InvalidImage`, but for an input by reference (``source``): an error its opener
    recorded (the read failed, GDAL saw a short read) is raised as it is, after the GDAL call even if GDAL let the
    short read pass; a ``/vsicurl/`` read that failed on the network (:func:`_network`) becomes
    :class:`SourceUnavailable` (transient: the attempt is retried)."""
    opener = source.opener if source is not None else None
    try:
        yield
    except GDAL_ERRORS as e:
        if opener is not None and opener.error is not None:
            raise opener.error from e
        if source is not None and opener is None and _network(e, source.size):
            raise SourceUnavailable(f"{what}: the image could not be read over the network now ({e})") from e
        raise InvalidImage(f"{what}: {e}") from e
    if opener is not None and opener.error is not None:
        raise opener.error


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def as_float(dn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``dn``'s values in ``dtype`` (float32 or float64), never ``dn`` itself (callers work in place
    on it). On the CPU through numpy, which converts uint16 (the usual stored type) 3-5x faster than torch here and
    backs a large new array with huge pages: torch's fresh allocations of tens of MB cost more in page faults than
    the conversion itself."""
    if dn.device.type != "cpu":
        return dn.to(dtype, copy=True)
    converted: torch.Tensor = torch.from_numpy(dn.numpy().astype(_NUMPY_FLOAT[dtype]))
    return converted


def every_band(valid: torch.Tensor) -> torch.Tensor:
    """[C, H, W] bool -> [H, W]: true where every band is (``valid.all(dim=0)``, a new tensor). One band after the
    other in place: 10x faster than ``all(dim=0)`` on the CPU here (1.2 ms for six 1024 x 1024 bands)."""
    out = valid[0].clone()
    for band in valid[1:]:
        out &= band
    return out


@dataclass(frozen=True)
class Block:
    """One window: ``values`` float32 reflectance [C, h, w], ``valid`` bool [C, h, w] (not nodata, finite).

    float32: reflectance has at most 16 bits of data (DN / scale), and the indices computed from it agree with a
    float64 numpy reference within 1e-6 relative in their statistics (tests/unit/test_analysis_indices.py); float64
    made the element-wise work 5x slower. Accumulations (statistics, the cloud grid's block sums) are exact or in
    float64. ``dn`` is the data as stored (on the device: the host-to-device copy moves 2 bytes per uint16 value, not
    4), for what needs reflectance exactly (:meth:`exact`) and for the cloud grid, which never asks for ``values``:
    they are computed on first use (the cloud-mask pass reads ten bands and converts none)."""

    window: Window
    valid: torch.Tensor
    dn: torch.Tensor
    scale: float

    @property
    def values(self) -> torch.Tensor:
        """float32 reflectance, DN / scale (the float32 DN divided by the scale, in place), made on first use and
        kept. Not a ``functools.cached_property``: on Python 3.11 that takes one lock for every instance, which would
        make the conversions of analyses running at once (``WORKER_ANALYSES``) wait for each other."""
        cached: torch.Tensor | None = self.__dict__.get("_values")
        if cached is None:
            cached = self.__dict__["_values"] = as_float(self.dn, torch.float32).div_(self.scale)
        return cached

    def exact(self, j: int) -> torch.Tensor:
        """Band ``j``'s reflectance in float64, from the stored values (not from the rounded float32 ones)."""
        return as_float(self.dn[j], torch.float64).div_(self.scale)


def _fill_value(nodata: float | None, dtype: np.dtype[Any]) -> float | np.generic | None:
    """A band's nodata as :meth:`SceneReader.read` compares the stored values with it, None where none can equal it
    (no nodata, NaN, or a value the integer type cannot hold). Integers of up to 32 bits compare in their own type,
    with the same outcome as against the float (exact in float64): a uint16 band compared with a float went through
    float64, 0.7 % of a 1024 x 1024 job's CPU."""
    if nodata is None or math.isnan(nodata):
        return None
    if dtype.kind not in "iu" or dtype.itemsize > 4:
        return nodata
    info = np.iinfo(dtype)
    if not (float(nodata).is_integer() and info.min <= nodata <= info.max):
        return None
    integer: np.generic = dtype.type(int(nodata))
    return integer


class SceneReader:
    """An open GeoTIFF whose band names resolve to roles. Use as a context manager."""

    def __init__(
        self,
        path: Path | Input,
        band_names: list[str],
        scale: float,
        device: torch.device,
        required: tuple[str, ...] = ("red", "nir"),
    ) -> None:
        self.source = path if isinstance(path, Input) else None
        self.path = path.path if isinstance(path, Input) else path
        self.scale, self.device = scale, device
        self._lock = threading.Lock()  # one GDAL call on the dataset at a time (blocks() reads in a thread)
        opener = self.source.opener if self.source is not None else None
        with self._errors("not a readable GeoTIFF"):  # NotGeoreferencedWarning: filtered (shared.geotiff)
            self.dataset: Any = rasterio.open(self.path, opener=opener)
        try:
            self.bands = self._resolve(band_names, required)
        except BaseException:
            self.dataset.close()
            raise
        self.width: int = self.dataset.width
        self.height: int = self.dataset.height
        dtype = np.dtype(self.dataset.dtypes[0])
        self._nodata = tuple(_fill_value(value, dtype) for value in self.dataset.nodatavals)
        self._float = np.issubdtype(dtype, np.floating)
        self._stored: dict[int, np.ndarray | None] = {}  # plane -> [rows, cols] of blocks that hold data

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return gdal_errors_as_invalid_image(what, source=self.source)

    def _resolve(self, band_names: list[str], required: tuple[str, ...]) -> BandSet:
        ds = self.dataset
        names = band_names or [d or "" for d in ds.descriptions]
        if len(names) != ds.count:
            raise InvalidImage(f"{len(names)} band names given for a file with {ds.count} bands")
        if len(set(ds.dtypes)) != 1:
            raise InvalidImage(f"bands have mixed data types {sorted(set(ds.dtypes))}")
        try:
            bands = resolve(names)
        except BandError as e:
            raise InvalidImage(f"band names: {e}") from e
        missing = [role for role in required if not bands.has(role)]
        if missing:
            raise InvalidImage(f"no {' and no '.join(missing)} band among {', '.join(names)}: NDVI needs red and nir")
        return bands

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.dataset.close()

    def describe(self) -> dict[str, Any]:
        """The ``scene`` part of the result JSON."""
        ds = self.dataset
        crs = ds.crs.to_string() if ds.crs else None
        bounds = None
        if ds.crs:
            with self._errors("cannot transform the bounds to WGS 84"):
                bounds = [round(v, 7) for v in transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)]
        return {"width": ds.width, "height": ds.height, "band_count": ds.count, "crs": crs, "bounds_wgs84": bounds}

    def grid(self) -> dict[str, Any]:
        """width, height, crs and transform: the profile keys an output on the same grid needs."""
        ds = self.dataset
        return {"width": ds.width, "height": ds.height, "crs": ds.crs, "transform": ds.transform}

    def pixel_size_m(self) -> float | None:
        """Pixel width in metres (degrees taken as 111.32 km), None without a CRS."""
        ds = self.dataset
        if not ds.crs:
            return None
        size = abs(float(ds.transform.a))
        if ds.crs.is_geographic:
            return size * 111_320.0
        _unit, factor = ds.crs.linear_units_factor
        return size * float(factor)

    def windows(self, size: int) -> Iterator[Window]:
        """Row-major windows of ``size`` x ``size`` pixels (smaller at the right and bottom edges)."""
        for row in range(0, self.height, size):
            for col in range(0, self.width, size):
                yield Window(col, row, min(size, self.width - col), min(size, self.height - row))

    def holds_data(self, window: Window, band_indices: Sequence[int]) -> bool:
        """Whether any block of ``window`` holds stored data in any of the given 0-based bands. False means every
        pixel of it reads as the fill value: the band's nodata, or 0 without one. True when unknown
        (:func:`shared.geotiff.stored_blocks`)."""
        block_h, block_w = self.dataset.block_shapes[0]
        rows = slice(int(window.row_off) // block_h, math.ceil((window.row_off + window.height) / block_h))
        cols = slice(int(window.col_off) // block_w, math.ceil((window.col_off + window.width) / block_w))
        for i in band_indices:
            stored = self._block_map(i)
            if stored is None or bool(stored[rows, cols].any()):
                return True
        return False

    def _block_map(self, band_index: int) -> np.ndarray | None:
        plane = plane_of(self.dataset, band_index + 1)
        if plane not in self._stored:
            with self._lock, self._errors("cannot read the block offsets"):
                self._stored[plane] = stored_blocks(self.dataset, plane)
        return self._stored[plane]

    def read_raw(self, window: Window, band_index: int) -> np.ndarray:
        """One band of ``window`` as stored (a quality bit mask, say): no scaling, no nodata handling."""
        with self._lock, self._errors(f"cannot read window {window!r}"):
            data: np.ndarray = self.dataset.read(band_index + 1, window=window)
        return data

    def blocks(self, windows: Sequence[Window], band_indices: list[int]) -> Generator[Block, None, None]:
        """:meth:`read` of each window in turn, the next one decoded in a background thread meanwhile: at most two
        blocks are held at a time. Stopping the iteration early waits for the read in progress. The thread reads in
        this thread's context: rasterio finds an opener's files in a context variable (a GDAL ``stat`` from a thread
        without it fails with a ``SystemError``)."""
        if len(windows) < 2:
            yield from (self.read(window, band_indices) for window in windows)
            return
        context = contextvars.copy_context()
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            pending = pool.submit(context.copy().run, self.read, windows[0], band_indices)
            for window in windows[1:]:
                block = pending.result()
                pending = pool.submit(context.copy().run, self.read, window, band_indices)
                yield block
            yield pending.result()

    def read(self, window: Window, band_indices: list[int]) -> Block:
        """Read the given 0-based bands of ``window``; reflectance = DN / scale."""
        with self._lock, self._errors(f"cannot read window {window!r}"):
            data = self.dataset.read([i + 1 for i in band_indices], window=window)
        valid = np.ones(data.shape, dtype=bool)
        for j, i in enumerate(band_indices):
            nodata = self._nodata[i]
            if nodata is not None:
                np.not_equal(data[j], nodata, out=valid[j])
        if self._float:
            valid &= np.isfinite(data)
        host = torch.from_numpy(data)
        if self.device.type == "cuda":
            host = host.pin_memory()  # an asynchronous copy needs page-locked memory
        dn = host.to(self.device, non_blocking=True)
        valid_host = torch.from_numpy(valid)
        valid_t = (valid_host.pin_memory() if self.device.type == "cuda" else valid_host).to(
            self.device, non_blocking=True
        )
        return Block(window=window, valid=valid_t, dn=dn, scale=self.scale)
