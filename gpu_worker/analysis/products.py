"""Where crop-health's per-pixel products go: the whole scene's three COGs, or one clip per field.

Both take each window's products as numpy arrays on the scene's grid (NDVI float32, NaN nodata; the cloud mask
uint8 0 / 1, :data:`MASK_NODATA` elsewhere; cover [3, h, w] uint8 percent, :data:`MASK_NODATA` elsewhere) with the
window's parts (:class:`~gpu_worker.analysis.placement.FieldPart`), and return the finished files by output key.

* :class:`SceneProducts` (no fields): ``ndvi_cog``, ``cloud_mask_cog``, ``cover_cog`` over the scene.
* :class:`FieldClips` (fields): ``field_<n>_cog`` per field (``n`` its 1-based position in the job's fields), over
  its pixel box, nodata outside its polygon: one float32 COG of :data:`CLIP_BANDS` (the values of the scene's
  products at the same pixels, NaN nodata). A file per field rather than one over all of them: far-apart fields
  span most of a tile, and the cost of the COG copy follows its extent. One file per field rather than one per
  product: at most ``MAX_FIELDS`` + 1 uploads and signed links, and a client gets a field's products in one read.
  The band layout is fixed (a product the scene cannot give is all nodata), so band *i* always means the same.

``finish`` makes the COG copies one after the other in a background thread (GDAL releases the GIL while it computes
overviews and compresses) and renders the quicklook PNG (``quicklook_png``, the last file) in the calling thread as
soon as the COGs it reads are done, while the others (the scene's cover COG) are still being copied: on a 1024 x 1024
scene the quicklook (~35 ms) overlaps the cover's copy (~40 ms). The files are the same as when made one after the
other. Three copies at once (:data:`COPY_THREADS` 3) were no faster within a whole job on two cores, and a full
tile's peak RSS was 1.34 and 1.74 GB with them against 1.12 GB one at a time (one run each).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import rasterio
import rasterio.env
from affine import Affine
from rasterio.windows import Window

from gpu_worker.analysis import quicklook
from gpu_worker.analysis.cover import FRACTIONS
from gpu_worker.analysis.outputs import COG_CONTENT_TYPE, PNG_CONTENT_TYPE, RasterSink
from gpu_worker.analysis.placement import Box, FieldPart, Placement
from gpu_worker.analysis.request import Progress

MASK_NODATA = 255
COPY_THREADS = 1  # COG copies at a time (see the module docstring)
QUICKLOOK = "quicklook_png"
CLIP_BANDS = ("ndvi", "cloud", *(f"{f}_cover_percent" for f in FRACTIONS))
_CLOUD, _COVER = 1, slice(2, 2 + len(FRACTIONS))  # band positions (0-based) in a clip

Files = dict[str, tuple[Path, str]]
K = TypeVar("K")


def _finish_all(
    sinks: Mapping[K, RasterSink],
    needs: Collection[K],
    render: Callable[[], Path],
    progress: Progress,
    done: Callable[[K, Path], None],
) -> Path:
    """Finish every sink (its COG copy) in a thread pool, and ``render`` the quicklook in this thread as soon as the
    copies it ``needs`` are done, while the others go on; ``done`` hears of each finished file (by key) at once.
    Returns the quicklook. On an error (or an interruption: a progress report's checkpoint, the shutdown's signal)
    the copies not yet started are cancelled and the one under way is waited for (GDAL cannot be stopped), then the
    error is raised; the files not finished are the caller's to discard. The copies run with this thread's
    ``GDAL_NUM_THREADS`` (a config option rasterio sets per thread outside the main thread)."""
    threads = rasterio.env.get_gdal_config("GDAL_NUM_THREADS")

    def finish(sink: RasterSink) -> Path:
        if threads is None:
            return sink.finish()
        with rasterio.Env(GDAL_NUM_THREADS=threads):
            return sink.finish()

    pool = ThreadPoolExecutor(max(1, min(len(sinks), COPY_THREADS)), thread_name_prefix="cog")
    try:
        futures = {key: pool.submit(finish, sink) for key, sink in sinks.items()}
        steps = [k for k in futures if k in needs] + [None] + [k for k in futures if k not in needs]  # None: render
        png: Path | None = None
        for step, key in enumerate(steps):
            progress("outputs", step / len(steps))
            if key is not None:
                done(key, futures[key].result())
            else:
                png = render()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: the copies not started never start
    assert png is not None
    return png


def clip_key(index: int) -> str:
    """The output key of the field at 0-based ``index`` (the file is ``field_<n>.tif``)."""
    return f"field_{index + 1}_cog"


class SceneProducts:
    """The whole scene's COGs on ``grid`` (``sparse``: leave out tiles that are all nodata)."""

    def __init__(self, grid: dict[str, Any], workdir: Path, *, clouds: bool, cover: bool, sparse: bool) -> None:
        self.sinks = {
            "ndvi_cog": RasterSink(workdir / "ndvi.tif", grid, count=1, dtype="float32", nodata=float(np.nan),
                                   overview_resampling="average", descriptions=("ndvi",), sparse=sparse),
        }  # fmt: skip
        if clouds:
            self.sinks["cloud_mask_cog"] = RasterSink(
                workdir / "cloud_mask.tif", grid, count=1, dtype="uint8", nodata=MASK_NODATA,
                overview_resampling="mode", descriptions=("cloud (1) / clear (0)",), sparse=sparse,
            )  # fmt: skip
        if cover:
            self.sinks["cover_cog"] = RasterSink(
                workdir / "cover.tif", grid, count=3, dtype="uint8", nodata=MASK_NODATA,
                overview_resampling="average", descriptions=tuple(f"{f} cover (%)" for f in FRACTIONS), sparse=sparse,
            )  # fmt: skip
        self.files: Files = {}

    def write_indices(self, window: Window, parts: list[FieldPart], ndvi: np.ndarray, cloud: np.ndarray | None) -> None:
        self.sinks["ndvi_cog"].write(window, ndvi)
        if cloud is not None:
            self.sinks["cloud_mask_cog"].write(window, cloud)

    def write_cover(self, window: Window, parts: list[FieldPart], percent: np.ndarray) -> None:
        self.sinks["cover_cog"].write(window, percent)

    def finish(self, progress: Progress, quicklook: Callable[[], Path]) -> Files:
        """The COGs, and the ``quicklook`` (which reads the NDVI and cloud-mask COGs: :meth:`quicklook`) rendered
        while the cover COG is copied."""

        def done(key: str, path: Path) -> None:
            self.files[key] = (path, COG_CONTENT_TYPE)

        # the COG copies: GDAL work, seconds on a full tile
        png = _finish_all(self.sinks, ("ndvi_cog", "cloud_mask_cog"), quicklook, progress, done)
        self.files = {key: self.files[key] for key in self.sinks} | {QUICKLOOK: (png, PNG_CONTENT_TYPE)}
        return self.files

    def discard(self) -> None:
        for key, sink in self.sinks.items():
            if key not in self.files:
                sink.discard()

    def quicklook(self, out: Path, outlines: Sequence[Sequence[tuple[float, float]]]) -> Path:
        """From the NDVI and cloud-mask COGs (:meth:`finish` calls it once they are done)."""
        cloud = self.sinks["cloud_mask_cog"].path if "cloud_mask_cog" in self.sinks else None
        return quicklook.render(self.sinks["ndvi_cog"].path, out, cloud, outlines=outlines)


class FieldClips:
    """One :data:`CLIP_BANDS` COG per field over its pixel box (fields without a pixel box in the scene get none)."""

    def __init__(self, placement: Placement, grid: dict[str, Any], workdir: Path, region: Window) -> None:
        self.region, self.count = region, len(placement.fields)
        self.boxes: dict[int, Box] = {}
        self.sinks: dict[int, RasterSink] = {}
        self.files: Files = {}
        self.clouds = False
        try:
            for i, placed in enumerate(placement.fields):
                box = placed.box
                if box.empty:
                    continue
                clip = grid | {"width": box.col1 - box.col0, "height": box.row1 - box.row0,
                               "transform": grid["transform"] @ Affine.translation(box.col0, box.row0)}  # fmt: skip
                self.boxes[i] = box
                self.sinks[i] = RasterSink(
                    workdir / f"field_{i + 1}.tif", clip, count=len(CLIP_BANDS), dtype="float32",
                    nodata=float(np.nan), overview_resampling="average", descriptions=CLIP_BANDS, sparse=True,
                    interleave="band",
                )  # fmt: skip
        except BaseException:
            self.discard()
            raise

    def keys(self) -> list[str | None]:
        """Each field's output key, None for a field without a clip."""
        return [clip_key(i) if i in self.sinks else None for i in range(self.count)]

    def _place(self, window: Window, part: FieldPart) -> Window:
        """The part's pixels in its field's clip."""
        box = self.boxes[part.index]
        rows = range(int(window.row_off), int(window.row_off + window.height))[part.rows]
        cols = range(int(window.col_off), int(window.col_off + window.width))[part.cols]
        return Window(cols.start - box.col0, rows.start - box.row0, len(cols), len(rows))

    def write_indices(self, window: Window, parts: list[FieldPart], ndvi: np.ndarray, cloud: np.ndarray | None) -> None:
        self.clouds |= cloud is not None
        for part in parts:
            inside = part.mask if part.mask is not None else np.ones(ndvi[part.rows, part.cols].shape, bool)
            bands = np.full((2, *inside.shape), np.nan, dtype=np.float32)
            bands[0] = np.where(inside, ndvi[part.rows, part.cols], np.nan)
            if cloud is not None:
                mask = cloud[part.rows, part.cols]
                bands[_CLOUD] = np.where(inside & (mask != MASK_NODATA), mask, np.nan)
            self.sinks[part.index].write(self._place(window, part), bands, indexes=[1, 2])

    def write_cover(self, window: Window, parts: list[FieldPart], percent: np.ndarray) -> None:
        for part in parts:
            values = percent[:, part.rows, part.cols]
            keep = values != MASK_NODATA
            if part.mask is not None:
                keep &= part.mask
            bands = np.where(keep, values, np.nan).astype(np.float32)
            first = _COVER.start + 1
            self.sinks[part.index].write(self._place(window, part), bands, indexes=list(range(first, first + 3)))

    def finish(self, progress: Progress, quicklook: Callable[[], Path]) -> Files:
        """The clips, then the ``quicklook``, which reads every one of them (:meth:`quicklook`)."""

        def done(i: int, path: Path) -> None:
            self.files[clip_key(i)] = (path, COG_CONTENT_TYPE)

        png = _finish_all(self.sinks, self.sinks.keys(), quicklook, progress, done)
        keys = [clip_key(i) for i in self.sinks]
        self.files = {key: self.files[key] for key in keys} | {QUICKLOOK: (png, PNG_CONTENT_TYPE)}
        return self.files

    def discard(self) -> None:
        for i, sink in self.sinks.items():
            if clip_key(i) not in self.files:
                sink.discard()

    def quicklook(self, out: Path, outlines: Sequence[Sequence[tuple[float, float]]]) -> Path:
        r = self.region
        clips = [(self.sinks[i].path, box.col0 - r.col_off, box.row0 - r.row_off)
                 for i, box in self.boxes.items()]  # fmt: skip
        return quicklook.render_clips(clips, int(r.width), int(r.height), out, self.clouds, outlines=outlines)
