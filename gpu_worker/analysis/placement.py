"""Field boundaries placed on a scene's pixel grid: reprojected to the scene's CRS, the windows that cover them, and
each field's pixels in a window.

* **Reprojection**: each vertex goes from the fields' CRS to the scene's with pyproj (``always_xy``); edges stay
  straight lines in the scene's CRS (at field scale, centimetres from the true image of the edge).
* **Which pixels**: the pixel-centre rule (GDAL's rasterisation without ``ALL_TOUCHED``, i.e.
  ``rasterio.features.geometry_mask(all_touched=False)``): a pixel belongs to a field when its centre lies inside the
  polygon. Each pixel is counted once per field it belongs to, so the statistics are unbiased at the edges; fields
  that overlap share pixels.
* **Outside the scene**: a field that does not intersect the scene at all fails the job
  (:class:`shared.errors.GeometryOutsideScene`); a field partly outside is clipped to it (only the pixels of the
  scene count, and ``pixel_count`` says how many).
* **What is read**: :func:`covering` crops each window of the analysis grid to the fields' pixel boxes in it,
  aligned outward to the file's blocks (tiles): a per-field job decodes the blocks under its fields, not the scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.windows import Window

from gpu_worker.analysis.raster import SceneReader
from shared.errors import GeometryOutsideScene
from shared.fields import Field, Fields, PlacementError, in_crs, outside, outside_detail


@dataclass(frozen=True)
class Box:
    """A pixel rectangle [row0, row1) x [col0, col1) on the scene grid (possibly empty)."""

    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def empty(self) -> bool:
        return self.row1 <= self.row0 or self.col1 <= self.col0

    def clip(self, other: Box) -> Box:
        return Box(max(self.row0, other.row0), max(self.col0, other.col0),
                   min(self.row1, other.row1), min(self.col1, other.col1))  # fmt: skip

    def window(self) -> Window:
        return Window(self.col0, self.row0, self.col1 - self.col0, self.row1 - self.row0)

    @staticmethod
    def of(window: Window) -> Box:
        r, c = int(window.row_off), int(window.col_off)
        return Box(r, c, r + int(window.height), c + int(window.width))


@dataclass(frozen=True)
class FieldPart:
    """Field ``index``'s pixels in one window: ``rows`` x ``cols`` of the window, ``mask`` [h, w] within them
    (None: all of them, the whole-scene case)."""

    index: int
    rows: slice
    cols: slice
    mask: np.ndarray | None


@dataclass(frozen=True)
class PlacedField:
    field: Field
    geometry: Any  # shapely, in the scene's CRS
    box: Box  # the pixels whose centre may lie inside, clipped to the scene


class Placement:
    """The fields on ``scene``'s grid. Raises :class:`GeometryOutsideScene` when the scene has no CRS or a field
    does not intersect it."""

    def __init__(self, fields: Fields, scene: SceneReader) -> None:
        ds = scene.dataset
        if not ds.crs:
            raise GeometryOutsideScene("the image has no CRS: the fields cannot be placed on it")
        crs, self.transform = ds.crs.to_wkt(), ds.transform
        try:
            ids = outside(fields, crs, tuple(self.transform), scene.width, scene.height)
            geometries = in_crs(fields, crs)
        except PlacementError as e:
            raise GeometryOutsideScene(str(e)) from e
        if ids:
            raise GeometryOutsideScene(outside_detail(ids, len(fields)))
        scene_box = Box(0, 0, scene.height, scene.width)
        self.fields = [
            PlacedField(f, g, self._pixel_box(g).clip(scene_box)) for f, g in zip(fields, geometries, strict=True)
        ]

    def _pixel_box(self, geometry: Any) -> Box:
        x0, y0, x1, y1 = geometry.bounds
        inverse = ~self.transform
        cols, rows = zip(*(inverse @ (x, y) for x in (x0, x1) for y in (y0, y1)), strict=True)
        return Box(math.floor(min(rows)), math.floor(min(cols)), math.ceil(max(rows)), math.ceil(max(cols)))

    @property
    def boxes(self) -> list[Box]:
        return [f.box for f in self.fields if not f.box.empty]

    def parts(self, window: Window) -> list[FieldPart]:
        """Each field's pixels in ``window`` (fields without a pixel there are left out)."""
        at = Box.of(window)
        parts = []
        for i, placed in enumerate(self.fields):
            box = placed.box.clip(at)
            if box.empty:
                continue
            shape = (box.row1 - box.row0, box.col1 - box.col0)
            grid = self.transform @ Affine.translation(box.col0, box.row0)
            mask = geometry_mask([placed.geometry], out_shape=shape, transform=grid, all_touched=False, invert=True)
            rows, cols = slice(box.row0 - at.row0, box.row1 - at.row0), slice(box.col0 - at.col0, box.col1 - at.col0)
            parts.append(FieldPart(i, rows, cols, mask))
        return parts

    def outlines(self, region: Window) -> list[list[tuple[float, float]]]:
        """Every ring of every field as (column, row) pixel coordinates relative to ``region``'s corner."""
        inverse = Affine.translation(-region.col_off, -region.row_off) @ ~self.transform
        rings = []
        for placed in self.fields:
            for polygon in getattr(placed.geometry, "geoms", [placed.geometry]):
                for ring in (polygon.exterior, *polygon.interiors):
                    rings.append([inverse @ xy for xy in ring.coords])
        return rings


def covering(boxes: Sequence[Box], width: int, height: int, size: int, align: tuple[int, int]) -> list[Window]:
    """The windows of a ``size`` x ``size`` grid over the scene, each cropped to the bounding box of the ``boxes``'
    parts in it and widened to multiples of ``align`` (rows, columns) within it; windows no box touches are left
    out. Row-major, like :meth:`SceneReader.windows`."""
    out = []
    for row in range(0, height, size):
        for col in range(0, width, size):
            cell = Box(row, col, min(row + size, height), min(col + size, width))
            inside = [c for c in (b.clip(cell) for b in boxes) if not c.empty]
            if not inside:
                continue
            a_r, a_c = align
            r0 = max(cell.row0, min(b.row0 for b in inside) // a_r * a_r)
            c0 = max(cell.col0, min(b.col0 for b in inside) // a_c * a_c)
            r1 = min(cell.row1, -(-max(b.row1 for b in inside) // a_r) * a_r)
            c1 = min(cell.col1, -(-max(b.col1 for b in inside) // a_c) * a_c)
            out.append(Box(r0, c0, r1, c1).window())
    return out


def bounding(windows: Sequence[Window]) -> Window:
    """The smallest window holding all of ``windows`` (at least one)."""
    boxes = [Box.of(w) for w in windows]
    return Box(min(b.row0 for b in boxes), min(b.col0 for b in boxes),
               max(b.row1 for b in boxes), max(b.col1 for b in boxes)).window()  # fmt: skip
