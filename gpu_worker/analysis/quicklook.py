"""The quicklook: NDVI with a colour ramp, clouds in white, a labelled colour bar; at most 1024 px either way. A
palette PNG (:data:`PALETTE`): a 1024 px quicklook encodes in a third of the time of an RGB one, and is smaller.

It is read back from the NDVI COG at reduced resolution (GDAL uses the COG's overviews, averaging valid pixels), so
memory does not depend on the scene size. The COGs are opened without their georeferencing
(:data:`shared.geotiff.NO_GEOREFERENCING`): only pixels are drawn, and building the CRS (a PROJ database lookup) was
40 % of each open, with the GIL held. With fields it is composed from the field clips (:func:`render_clips`) over the
extent of the fields, at the same bounded size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageDraw, ImageFont
from rasterio.enums import Resampling

from shared.geotiff import NO_GEOREFERENCING

MAX_SIDE = 1024
PNG_LEVEL = 1  # zlib level: 81 ms instead of 265 ms (Pillow's default 6) for a 1024 px quicklook, a little larger
MIN_SIDE = 512  # small scenes are enlarged (nearest neighbour) so that a person can see them
LEGEND_HEIGHT = 72
# NDVI colour ramp: water blue, bare soil tan, sparse vegetation yellow-green, dense vegetation dark green.
STOPS = np.array([-0.5, 0.0, 0.2, 0.4, 0.6, 0.9])
COLOURS = np.array(
    [[33, 102, 172], [222, 206, 170], [210, 180, 90], [166, 217, 106], [26, 150, 65], [0, 68, 27]], dtype=np.float64
)
NO_DATA = (64, 64, 64)
CLOUD = (255, 255, 255)
TICKS = (-0.5, 0.0, 0.2, 0.4, 0.6, 0.9)


def colourise(ndvi: np.ndarray) -> np.ndarray:
    """[...] NDVI (NaN = no data) -> [..., 3] uint8."""
    rgb = np.stack([np.interp(ndvi, STOPS, COLOURS[:, c]) for c in range(3)], axis=-1)
    rgb[~np.isfinite(ndvi)] = NO_DATA
    return rgb.round().astype(np.uint8)


# The image is a palette PNG (1 byte per pixel, 3x less to compress than RGB): RAMP_STEPS colours of the ramp over
# [STOPS[0], STOPS[-1]] (0.0056 NDVI apart), then no data, cloud, and the legend's white and black.
RAMP_STEPS = 252
NO_DATA_INDEX, CLOUD_INDEX, WHITE_INDEX, BLACK_INDEX = range(RAMP_STEPS, RAMP_STEPS + 4)
PALETTE = [
    int(v)
    for colour in (*colourise(np.linspace(STOPS[0], STOPS[-1], RAMP_STEPS)), NO_DATA, CLOUD, (255, 255, 255), (0, 0, 0))
    for v in colour
]


def ramp_index(ndvi: np.ndarray) -> np.ndarray:
    """[h, w] NDVI (NaN = no data) -> [h, w] uint8 palette indices (values beyond the ramp take its end colours)."""
    lo, hi = STOPS[0], STOPS[-1]
    with np.errstate(invalid="ignore"):
        index = np.clip(np.rint((ndvi - lo) / (hi - lo) * (RAMP_STEPS - 1)), 0, RAMP_STEPS - 1)
    return np.where(np.isfinite(ndvi), index, NO_DATA_INDEX).astype(np.uint8)


def _paletted(index: np.ndarray) -> Image.Image:
    image = Image.fromarray(index, "P")
    image.putpalette(PALETTE)
    return image


def _open(cog: Path) -> rasterio.DatasetReader:
    return rasterio.open(cog, driver="GTiff", **NO_GEOREFERENCING)


def _shape(width: int, height: int) -> tuple[float, tuple[int, int]]:
    """The reduction factor (>= 1) and the [h, w] of the image of a ``width`` x ``height`` extent."""
    scale = max(width / MAX_SIDE, height / (MAX_SIDE - LEGEND_HEIGHT), 1.0)
    return scale, (max(1, round(height / scale)), max(1, round(width / scale)))


def render(
    ndvi_cog: Path,
    out: Path,
    cloud_cog: Path | None = None,
    title: str = "NDVI",
    outlines: Sequence[Sequence[tuple[float, float]]] = (),
) -> Path:
    """``outlines``: rings (field boundaries) in the COG's pixel coordinates (column, row), drawn in black."""
    with _open(ndvi_cog) as src:
        _scale, shape = _shape(src.width, src.height)
        ndvi = src.read(1, out_shape=shape, resampling=Resampling.average)
        width, height = src.width, src.height
    cloud = None
    if cloud_cog is not None:
        with _open(cloud_cog) as src:
            cloud = src.read(1, out_shape=shape, resampling=Resampling.nearest) == 1
    return _draw(ndvi, cloud, (width, height), out, title, outlines)


def render_clips(
    clips: Sequence[tuple[Path, int, int]],
    width: int,
    height: int,
    out: Path,
    clouds: bool,
    title: str = "NDVI",
    outlines: Sequence[Sequence[tuple[float, float]]] = (),
) -> Path:
    """The quicklook of a ``width`` x ``height`` extent from field clips: (COG, column, row of its corner in the
    extent), NDVI in band 1 and the cloud mask in band 2 (:mod:`products`); each clip is read at the quicklook's
    resolution (its overviews), so the cost and the image are bounded whatever the extent. Where clips overlap, the
    later one's valid pixels win."""
    scale, shape = _shape(width, height)
    ndvi = np.full(shape, np.nan, dtype=np.float32)
    cloud = np.zeros(shape, dtype=bool)
    for path, col, row in clips:
        with _open(path) as src:
            r0, c0 = min(int(row / scale), shape[0] - 1), min(int(col / scale), shape[1] - 1)
            r1 = min(max(r0 + 1, math.ceil((row + src.height) / scale)), shape[0])
            c1 = min(max(c0 + 1, math.ceil((col + src.width) / scale)), shape[1])
            part = (r1 - r0, c1 - c0)
            values = src.read(1, out_shape=part, resampling=Resampling.average)
            cloudy = src.read(2, out_shape=part, resampling=Resampling.nearest) == 1 if clouds else None
        present = np.isfinite(values)
        ndvi[r0:r1, c0:c1][present] = values[present]
        if cloudy is not None:
            cloud[r0:r1, c0:c1] |= cloudy
    return _draw(ndvi, cloud if clouds else None, (width, height), out, title, outlines)


def _draw(
    ndvi: np.ndarray,
    cloud: np.ndarray | None,
    extent: tuple[int, int],
    out: Path,
    title: str,
    outlines: Sequence[Sequence[tuple[float, float]]],
) -> Path:
    """``extent``: the (width, height) in scene pixels that ``ndvi`` shows (the outlines' coordinates)."""
    index = ramp_index(ndvi)
    if cloud is not None:
        index[cloud] = CLOUD_INDEX
    image = _paletted(index)
    enlarge = max(1, MIN_SIDE // max(image.size))
    if enlarge > 1:
        image = image.resize((image.width * enlarge, image.height * enlarge), Image.Resampling.NEAREST)
    if outlines:
        draw = ImageDraw.Draw(image)
        sx, sy = image.width / extent[0], image.height / extent[1]
        for ring in outlines:
            draw.line([(x * sx, y * sy) for x, y in ring], fill=BLACK_INDEX, width=max(1, enlarge // 2))
    width = max(image.width, 360)
    canvas = _paletted(np.full((image.height + LEGEND_HEIGHT, width), WHITE_INDEX, dtype=np.uint8))
    canvas.paste(image, ((width - image.width) // 2, 0))
    canvas.paste(_legend(width, title, cloud is not None), (0, image.height))
    canvas.save(out, format="PNG", compress_level=PNG_LEVEL)
    return out


@functools.lru_cache(maxsize=64)
def _legend(width: int, title: str, clouds: bool) -> Image.Image:
    """The legend strip (``width`` x :data:`LEGEND_HEIGHT`), drawn once per width, title and cloud key: it was ~1 ms
    of each quicklook, the font's loading included. Callers only paste it (never draw on the cached image)."""
    canvas = _paletted(np.full((LEGEND_HEIGHT, width), WHITE_INDEX, dtype=np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    margin = 24
    bar_w = canvas.width - 2 * margin
    lo, hi = STOPS[0], STOPS[-1]
    ramp = ramp_index(np.linspace(lo, hi, bar_w)[None, :].repeat(14, axis=0))
    bar_top = 24
    canvas.paste(_paletted(ramp), (margin, bar_top))
    draw.rectangle((margin - 1, bar_top - 1, margin + bar_w, bar_top + 14), outline=BLACK_INDEX)
    draw.text((margin, 4), title, fill=BLACK_INDEX, font=font)
    x = canvas.width - margin
    for label, colour in (("no data", NO_DATA_INDEX), *((("cloud", CLOUD_INDEX),) if clouds else ())):
        x -= int(draw.textlength(label, font=font))
        draw.text((x, 4), label, fill=BLACK_INDEX, font=font)
        x -= 18
        draw.rectangle((x, 6, x + 12, 18), fill=colour, outline=BLACK_INDEX)
        x -= 14
    for tick in TICKS:
        x = margin + (tick - lo) / (hi - lo) * (bar_w - 1)
        draw.line((x, bar_top + 14, x, bar_top + 19), fill=BLACK_INDEX)
        draw.text((x, bar_top + 20), f"{tick:g}", fill=BLACK_INDEX, font=font, anchor="ma")
    return canvas
