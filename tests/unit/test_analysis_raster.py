"""SceneReader: float32 blocks with the stored values alongside, and the read-ahead of :meth:`SceneReader.blocks`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from gpu_worker.analysis.raster import SceneReader, _fill_value, every_band
from shared.errors import InvalidImage

DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"
CPU = torch.device("cpu")


def test_blocks_are_the_reads_of_each_window_in_order() -> None:
    with SceneReader(FIELDS, [], 10000.0, CPU) as scene:
        windows = list(scene.windows(100))  # 9 windows, ragged at the right and bottom edges
        bands = [3, 7, 1]
        blocks = list(scene.blocks(windows, bands))
        assert [b.window for b in blocks] == windows
        for window, block in zip(windows, blocks, strict=True):
            expected = scene.read(window, bands)
            assert torch.equal(block.values, expected.values)
            assert torch.equal(block.valid, expected.valid)
            assert torch.equal(block.dn, expected.dn)


def test_block_values_are_float32_reflectance_and_exact_is_float64_from_the_stored_values() -> None:
    with rasterio.open(FIELDS) as src:
        dn = src.read(4, window=((0, 8), (0, 8)))
    with SceneReader(FIELDS, [], 10000.0, CPU) as scene:
        block = scene.read(next(iter(scene.windows(8))), [3])
    assert block.values.dtype == torch.float32
    np.testing.assert_allclose(block.values[0].numpy(), dn / 10000.0, rtol=1e-7)
    assert block.exact(0).dtype == torch.float64
    np.testing.assert_array_equal(block.exact(0).numpy(), dn.astype(np.float64) / 10000.0)


def test_stopping_early_and_a_corrupt_block_leave_no_read_behind(tmp_path: Path) -> None:
    with SceneReader(FIELDS, [], 10000.0, CPU) as scene:
        windows = list(scene.windows(64))
        blocks = scene.blocks(windows, [0])
        next(blocks)
        blocks.close()  # waits for the window being read ahead
        assert scene.read(windows[-1], [0]).values.shape == (1, 64, 64)
    broken = tmp_path / "truncated.tif"
    broken.write_bytes(FIELDS.read_bytes()[: FIELDS.stat().st_size // 2])
    with pytest.raises(InvalidImage), SceneReader(broken, [], 10000.0, CPU) as scene:
        for _ in scene.blocks(list(scene.windows(64)), list(range(13))):
            pass


@pytest.mark.parametrize("bands", [1, 2, 6, 11])
def test_every_band_is_all_over_the_bands(bands: int) -> None:
    valid = torch.rand(bands, 33, 47, generator=torch.Generator().manual_seed(bands)) > 0.1
    out = every_band(valid)
    assert torch.equal(out, valid.all(dim=0))
    out[:] = False
    assert valid.any()  # a new tensor, not a view of the first band


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32"])
@pytest.mark.parametrize("nodata", [None, 0.0, 255.0, 65535.0, -1.0, -9999.0, 0.5, 1e12, float("nan")])
def test_a_nodata_compares_like_the_float_it_is(dtype: str, nodata: float | None) -> None:
    """Integer bands compare with nodata in their own type (or not at all when no value can equal it): the same
    pixels as comparing with the float."""
    kind = np.dtype(dtype)
    if kind.kind in "iu":
        info = np.iinfo(kind)
        data = np.arange(max(info.min, -20_000), min(info.max, 70_000) + 1, dtype=np.int64).astype(kind)
    else:
        data = np.array([0.0, 0.5, -1.0, 255.0, np.nan, -9999.0, 1e12], dtype=kind)
    expected = np.ones(data.shape, dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        expected &= data != nodata
    got = np.ones(data.shape, dtype=bool)
    fill = _fill_value(nodata, kind)
    if fill is not None:
        np.not_equal(data, fill, out=got)
    np.testing.assert_array_equal(got, expected)
