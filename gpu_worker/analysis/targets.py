"""What one crop-health pass measures and writes: the whole scene, or field boundaries.

:class:`Target` gives the pass its windows, each window's parts (the whole window for the scene; each field's pixels
in it, from :mod:`placement`), one summary per part owner, and the outputs' extent (the scene, or the fields'
bounding box).
:class:`Tally` counts pixels as the pass goes; :func:`check_valid` raises ``no_valid_pixels`` when nothing counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.windows import Window

from gpu_worker.analysis.placement import FieldPart, Placement, bounding, covering
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.analysis.summary import SceneSummary
from gpu_worker.analysis.validity import no_valid_pixels
from shared.errors import NoValidPixels
from shared.fields import Field


@dataclass(frozen=True)
class Target:
    """What a pass measures and writes: the whole scene (one summary, every window; ``region`` the scene) or fields
    (one summary each, over the windows covering them; ``region`` the bounding box of the fields' pixel boxes, the
    quicklook's extent)."""

    windows: list[Window]
    region: Window
    count: int
    placement: Placement | None = None

    @staticmethod
    def whole(scene: SceneReader, size: int) -> Target:
        return Target(list(scene.windows(size)), Window(0, 0, scene.width, scene.height), 1)

    @staticmethod
    def of_fields(scene: SceneReader, placement: Placement, size: int) -> Target:
        block_h, block_w = scene.dataset.block_shapes[0]
        align = (block_h if block_h <= size else 1, block_w if block_w <= size else 1)
        windows = covering(placement.boxes, scene.width, scene.height, size, align)
        boxes = placement.boxes
        region = bounding([b.window() for b in boxes]) if boxes else Window(0, 0, 1, 1)
        return Target(windows, region, len(placement.fields), placement)

    @property
    def partial(self) -> bool:
        """Only part of the output region is written: the rest stays nodata (and its tiles are left out)."""
        return self.placement is not None

    def parts(self, window: Window) -> list[FieldPart]:
        if self.placement is None:
            return [FieldPart(0, slice(None), slice(None), None)]
        return self.placement.parts(window)

    def grid(self, scene: SceneReader) -> dict[str, Any]:
        grid = scene.grid()
        r = self.region
        return grid | {"width": r.width, "height": r.height,
                       "transform": grid["transform"] @ Affine.translation(r.col_off, r.row_off)}  # fmt: skip


@dataclass
class Tally:
    """Pixel counts of a pass: each summary's pixels (read or not), the pixels in any field (the scene's: all),
    those of them in skipped (empty) windows, and those with red and NIR present (for the ``no_valid_pixels``
    message)."""

    pixels: list[int]
    present: torch.Tensor
    total: int = 0
    empty: int = 0

    def count(self, parts: list[FieldPart], window: Window, *, skipped: bool) -> np.ndarray | None:
        """Count a window; returns its pixels in any part ([h, w] bool), None when a part is the whole window."""
        area = int(window.width * window.height)
        union: np.ndarray | None = np.zeros((int(window.height), int(window.width)), dtype=bool)
        for part in parts:
            self.pixels[part.index] += area if part.mask is None else int(part.mask.sum())
            if part.mask is None or union is None:
                union = None
            else:
                union[part.rows, part.cols] |= part.mask
        n = area if union is None else int(union.sum())
        self.total += n
        self.empty += n if skipped else 0
        return union


def check_valid(target: Target, tally: Tally, summaries: list[SceneSummary], scale: float) -> None:
    """Raise :class:`NoValidPixels` when no summary (the scene, or any field) has a valid pixel."""
    if target.partial and tally.total == 0:
        raise NoValidPixels("no pixel of the image has its centre inside a field: each field is smaller than a pixel "
                            "or only grazes the image")  # fmt: skip
    if all(summary.valid_pixels() == 0 for summary in summaries):
        where = "red and NIR within the fields" if target.partial else "red and NIR"
        raise no_valid_pixels(tally.total, tally.empty, int(tally.present.item()), scale, where)


def field_result(field: Field, pixels: int, stats: dict[str, Any], output: str | None) -> dict[str, Any]:
    """One entry of ``fields``: id, geodesic area, its pixels in the scene, the output key of its clip (None
    without one), then the scene-level statistics' keys."""
    out = {"id": field.id, "area_ha": field.area_ha, "pixel_count": pixels, "output": output, **stats}
    return out | ({"properties": field.properties} if field.properties is not None else {})
