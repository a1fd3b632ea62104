from __future__ import annotations

import pytest

from shared.bands import BandError, parse_names, resolve


@pytest.mark.parametrize(
    ("names", "sensor", "red", "nir"),
    [
        (["B02", "B03", "B04", "B08"], "sentinel-2", 2, 3),
        (["b04", "b8a"], "sentinel-2", 0, None),
        (["blue", "green", "red", "nir"], "generic", 2, 3),
        (["B2", "B3", "B4", "B5"], "landsat-oli", 2, 3),
        (["SR_B4", "SR_B5"], "landsat-oli", 0, 1),
        (["red", "B08"], "sentinel-2", 0, 1),
    ],
)
def test_resolve(names: list[str], sensor: str, red: int, nir: int | None) -> None:
    bands = resolve(names)
    assert bands.sensor == sensor
    assert bands.index("red") == red
    assert bands.roles.get("nir") == nir


def test_sentinel2_b8a_is_narrow_nir() -> None:
    assert resolve(["B8A"]).roles == {"nir08": 0}


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (["B04", "B5"], "mix"),
        (["B04", "red"], "twice"),
        (["B13"], "unknown band name 'B13'"),
    ],
)
def test_refused(names: list[str], fragment: str) -> None:
    with pytest.raises(BandError, match=fragment):
        resolve(names)


def test_missing_role_names_it() -> None:
    with pytest.raises(BandError, match="no nir band"):
        resolve(["B04"]).index("nir")


@pytest.mark.parametrize("text", ["", "B02,,B04", " , "])
def test_parse_names_refuses_empty_entries(text: str) -> None:
    with pytest.raises(BandError):
        parse_names(text)


def test_parse_names() -> None:
    assert parse_names(" B02, B03 ,B04") == ["B02", "B03", "B04"]
