from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from shared import geotiff
from shared.geotiff import Limits, inspect
from shared.rejection import Rejected
from tests import geotiffs

LIMITS = Limits(max_bytes=100 * 1024 * 1024, max_pixels=130_000_000, max_bands=32)


def test_real_sentinel2_crop_header() -> None:
    header = inspect(geotiffs.real(), LIMITS)
    assert (header.width, header.height, header.count, header.dtype) == (256, 256, 13, "uint16")
    assert header.descriptions[3] == "B04"
    assert header.crs == "EPSG:32618"
    assert header.transform is not None
    assert header.transform[0] == 10.0
    assert header.integer


def test_the_not_georeferenced_warning_is_filtered_for_the_process_on_import() -> None:
    """A plain upload is opened without its georeferencing, so rasterio warns on every submit; the filter is installed
    once, when shared.geotiff is imported (catch_warnings around each open is not thread-safe). A process of its own,
    with every warning an error: pytest's filters would hide the import's."""
    code = (
        "import shared.geotiff as g; from tests import geotiffs; "
        "g.inspect(geotiffs.crafted(), g.Limits(10**8, 10**8, 32), georeferencing=False)"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_without_georeferencing_the_header_is_the_same_but_crs_and_transform() -> None:
    """What a submit without fields reads: the CRS (most of the check's cost) and the geotransform are not built."""
    full = inspect(geotiffs.real(), LIMITS)
    bare = inspect(geotiffs.real(), LIMITS, georeferencing=False)
    assert (bare.crs, bare.transform) == (None, None)
    assert bare == dataclasses.replace(full, crs=None, transform=None)


@pytest.mark.parametrize(
    ("options", "magic"),
    [
        ({}, b"II*\x00"),
        ({"ENDIANNESS": "BIG"}, b"MM\x00*"),
        ({"BIGTIFF": "YES"}, b"II+\x00"),
        ({"BIGTIFF": "YES", "ENDIANNESS": "BIG"}, b"MM\x00+"),
        ({"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"}, b"II*\x00"),
    ],
)
def test_every_tiff_flavour_is_accepted(options: dict[str, Any], magic: bytes) -> None:
    data = geotiffs.crafted(**options)
    assert data[:4] == magic
    assert inspect(data, LIMITS).count == 4


def test_float_images_are_not_integer() -> None:
    assert not inspect(geotiffs.crafted(dtype="float32"), LIMITS).integer


def _cog_style_truncated() -> bytes:
    # IFD first, pixel data after it: GDAL still opens the header, the last block points past the end.
    data = geotiffs.crafted(width=64, height=64, tiled=True, blockxsize=16, blockysize=16)
    return data[: len(data) - 100]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_body"),
        (b"hello, this is not an image", "not_a_tiff"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not_a_tiff"),
        (b"II*\x00" + b"\xff" * 60, "unreadable_image"),
        (geotiffs.real()[:500_000], "unreadable_image"),  # this file's IFD is at its end: GDAL cannot open it
        (_cog_style_truncated(), "truncated_image"),
        (geotiffs.huge_sparse(), "image_too_large"),
        (geotiffs.crafted(count=33, descriptions=None, width=4, height=4), "too_many_bands"),
    ],
    ids=["empty", "text", "png", "garbage-after-magic", "truncated-ifd", "truncated-blocks", "bomb", "bands"],
)
def test_refusals(data: bytes, code: str) -> None:
    with pytest.raises(Rejected) as info:
        inspect(data, LIMITS)
    assert info.value.code == code
    assert info.value.detail
    assert ".tif:" not in info.value.detail  # no in-memory file names leak to clients


def test_size_limit_is_checked_before_anything_else() -> None:
    with pytest.raises(Rejected) as info:
        inspect(b"x" * 101, Limits(max_bytes=100, max_pixels=10, max_bands=1))
    assert info.value.code == "payload_too_large"


def test_pixel_limit_is_inclusive() -> None:
    data = geotiffs.crafted(width=10, height=10)
    assert inspect(data, Limits(max_bytes=10**6, max_pixels=100, max_bands=4)).width == 10
    with pytest.raises(Rejected, match="image_too_large"):
        inspect(data, Limits(max_bytes=10**6, max_pixels=99, max_bands=4))


def _with_header_bytes(placeholder: str, replacement: bytes, band: int) -> bytes:
    """A valid file whose band ``band`` description is rewritten in place (same length) with raw bytes."""
    descriptions = ["B02", "B03", "B04", "B08"]
    descriptions[band - 1] = placeholder
    data = geotiffs.crafted(descriptions=tuple(descriptions))
    assert data.count(placeholder.encode()) == 1
    assert len(replacement) == len(placeholder)
    return data.replace(placeholder.encode(), replacement)


@pytest.mark.parametrize(
    ("replacement", "band"),
    [
        (b"\xff\xfe\xfdQ", 1),  # bytes that never occur in UTF-8
        (b"B0\x80Q", 4),  # a lone continuation byte
        (b"\xc0\xafQQ", 2),  # an overlong encoding of '/'
        (b"\xe9t\xe9Q", 3),  # Latin-1 'été'
    ],
    ids=["ff-fe", "lone-continuation", "overlong", "latin-1"],
)
def test_a_band_description_that_is_not_utf8_is_unreadable(replacement: bytes, band: int) -> None:
    with pytest.raises(Rejected) as info:
        inspect(_with_header_bytes("QQQQ", replacement, band), LIMITS)
    assert info.value.code == "unreadable_image"
    assert "UTF-8" in info.value.detail


SPARSE_LAYOUTS: dict[str, dict[str, Any]] = {
    "tiles": {"tiled": True, "blockxsize": 64, "blockysize": 64},
    "tiles-by-band": {"tiled": True, "blockxsize": 64, "blockysize": 64, "interleave": "band"},
    "strips": {"blockysize": 16},
    "strips-by-band": {"blockysize": 16, "interleave": "band"},
}


@pytest.mark.parametrize("layout", SPARSE_LAYOUTS.values(), ids=SPARSE_LAYOUTS.keys())
@pytest.mark.parametrize("nodata", [None, 0])
def test_a_file_with_no_block_written_has_no_valid_pixel(layout: dict[str, Any], nodata: int | None) -> None:
    data = geotiffs.crafted(width=256, height=256, write=False, SPARSE_OK=True, nodata=nodata, **layout)
    with pytest.raises(Rejected) as info:
        inspect(data, LIMITS)
    assert info.value.code == "no_valid_pixels"
    assert "no pixel data" in info.value.detail


def _one_block_written(path: Path, band: int, **layout: Any) -> bytes:
    path.write_bytes(geotiffs.crafted(width=256, height=256, write=False, SPARSE_OK=True, **layout))
    with rasterio.open(path, "r+") as ds:
        ds.write(np.full((64, 64), 7, np.uint16), band, window=Window(192, 192, 64, 64))
    return path.read_bytes()


@pytest.mark.parametrize("layout", SPARSE_LAYOUTS.values(), ids=SPARSE_LAYOUTS.keys())
def test_one_block_written_anywhere_is_enough(tmp_path: Path, layout: dict[str, Any]) -> None:
    """A scene with a large empty area, left out of the file, is legitimate: the worker decides on its pixels."""
    assert inspect(_one_block_written(tmp_path / "one.tif", 4, **layout), LIMITS).count == 4


def test_past_the_block_lookup_bound_the_worker_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    data = geotiffs.crafted(width=256, height=256, write=False, SPARSE_OK=True, **SPARSE_LAYOUTS["tiles"])
    monkeypatch.setattr(geotiff, "MAX_BLOCK_LOOKUPS", 15)  # 16 blocks: the map is unknown
    assert inspect(data, LIMITS).count == 4
