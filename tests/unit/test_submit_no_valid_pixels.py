"""POST /api/jobs with a GeoTIFF that holds no pixel data at all (every block left out: GDAL's SPARSE_OK) is a 422
``no_valid_pixels`` problem, decided from the header: nothing is stored or queued. A file with one block written is
accepted (the worker decides on its pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from tests import geotiffs
from tests.functions_client import post_job
from tests.unit.test_functions import World, assert_problem
from tests.unit.test_functions import world as world

LAYOUT: dict[str, Any] = {
    "width": 1024,
    "height": 1024,
    "tiled": True,
    "blockxsize": 256,
    "blockysize": 256,
    "SPARSE_OK": True,
}


def test_an_image_with_no_block_written_is_refused(world: World) -> None:
    problem = assert_problem(post_job(geotiffs.crafted(write=False, **LAYOUT)), 422, "no_valid_pixels")
    assert "no pixel data" in str(problem["detail"])
    assert world.publisher.sent == []


def test_an_image_with_one_block_written_is_accepted(world: World, tmp_path: Path) -> None:
    path = tmp_path / "one.tif"
    path.write_bytes(geotiffs.crafted(write=False, **LAYOUT))
    with rasterio.open(path, "r+") as ds:
        ds.write(np.full((4, 256, 256), 900, np.uint16), window=Window(768, 768, 256, 256))
    assert post_job(path.read_bytes()).status_code == 202
