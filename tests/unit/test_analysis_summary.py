"""SceneSummary: each valid pixel in the clear or the cloudy accumulators, windows without a cloud add no cloudy."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gpu_worker.analysis.indices import INDICES, compute
from gpu_worker.analysis.summary import SceneSummary

CPU = torch.device("cpu")


def window(seed: int, size: int = 64) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(base, index values) of a window of random reflectance, a few pixels of it invalid."""
    g = torch.Generator().manual_seed(seed)
    bands = {r: torch.rand(size, size, generator=g) * 0.5 for r in ("blue", "green", "red", "nir")}
    valid = {r: torch.rand(size, size, generator=g) > 0.05 for r in bands}
    ndvi, base = compute(INDICES[0], bands, valid)
    values = {"ndvi": (ndvi, base)}
    for spec in INDICES[1:]:
        v, ok = compute(spec, bands, valid)
        values[spec.name] = (v, ok & base)
    return base, values


def counts(result: dict[str, Any], key: str) -> dict[str, int]:
    return {name: s["count"] for name, s in result[key].items()}


def test_a_window_without_clouds_adds_nothing_cloudy() -> None:
    summary = SceneSummary(list(INDICES), True, CPU)
    base, values = window(1)
    land = summary.add(base, torch.zeros_like(base), values)
    assert all(s.summary() is None for s in summary.cloudy.values())
    result = summary.result(base.numel(), True, False)
    assert result["cloud_fraction"] == 0.0
    for name, clear in result["indices_clear"].items():
        merged = result["indices"][name]
        assert {k: v for k, v in merged.items() if k != "mean"} == {k: v for k, v in clear.items() if k != "mean"}
        assert merged["mean"] == pytest.approx(clear["mean"], rel=1e-15)
    ndwi, ndwi_ok = values["ndwi"]
    assert torch.equal(land, base & ~(ndwi_ok & (ndwi > 0)))


@pytest.mark.parametrize("has_cloud_mask", [True, False])
def test_cloudy_pixels_count_in_indices_not_in_indices_clear(has_cloud_mask: bool) -> None:
    summary = SceneSummary(list(INDICES), has_cloud_mask, CPU)
    clear_base, clear_values = window(2)
    summary.add(clear_base, torch.zeros_like(clear_base), clear_values)
    base, values = window(3)
    cloud = torch.zeros_like(base)
    cloud[:20] = True
    land = summary.add(base, cloud, values)
    assert not land[:20].any()
    result = summary.result(2 * base.numel(), True, False)
    for name, (_v, mask) in values.items():
        clear_mask = clear_values[name][1]
        everywhere = int(clear_mask.sum() + mask.sum())
        clear = int(clear_mask.sum() + (mask & ~cloud).sum())
        assert result["indices"][name]["count"] == (everywhere if has_cloud_mask else clear)
        if has_cloud_mask:
            assert result["indices_clear"][name]["count"] == clear
    if has_cloud_mask:
        assert result["cloud_fraction"] == pytest.approx(int((base & cloud).sum()) / int(clear_base.sum() + base.sum()))
    else:
        assert result["indices_clear"] is None
