"""Band names → spectral roles, for Sentinel-2 L1C/L2A, Landsat-8/9 OLI and generic RGBN files.

Accepted names (case-insensitive), in file order:

* STAC ``eo`` common names, for any sensor: coastal, blue, green, red, rededge1..3, nir, nir08, nir09, cirrus,
  swir16, swir22 (``rgbn`` files simply use blue, green, red, nir);
* Sentinel-2, zero-padded as ESA names them: B01 … B12 and B8A;
* Landsat-8/9 OLI/TIRS, unpadded: B1 … B11, or Collection-2 surface reflectance SR_B1 … SR_B7; the quality
  bands QA_PIXEL (Collection 2) and BQA (pre-collection / Collection 1) map to the roles qa_pixel and qa_bqa.

Mixing Sentinel-2 and Landsat names in one file is refused: the two numberings disagree (B5 is red edge on
Sentinel-2 and NIR on Landsat).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Sensor = Literal["sentinel-2", "landsat-oli", "generic"]

COMMON_NAMES = frozenset(
    {
        "coastal",
        "blue",
        "green",
        "red",
        "rededge1",
        "rededge2",
        "rededge3",
        "nir",
        "nir08",
        "nir09",
        "cirrus",
        "swir16",
        "swir22",
        "lwir11",
        "lwir12",
    }
)

SENTINEL2: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16",
    "B12": "swir22",
}  # fmt: skip

LANDSAT_OLI: dict[str, str] = {
    "B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "nir", "B6": "swir16", "B7": "swir22",
    "B9": "cirrus", "B10": "lwir11", "B11": "lwir12",
}  # fmt: skip
LANDSAT_OLI.update({f"SR_{name}": role for name, role in list(LANDSAT_OLI.items()) if name <= "B7"})
# Quality bands (bit masks, not reflectance): Collection-2 QA_PIXEL, and the older BQA (pre-collection or
# Collection 1; gpu_worker/analysis/cloud_sources.py tells the two bit layouts apart).
LANDSAT_OLI.update({"QA_PIXEL": "qa_pixel", "BQA": "qa_bqa"})


class BandError(ValueError):
    """The band names cannot be resolved; the message says which name and why."""


@dataclass(frozen=True)
class BandSet:
    """Resolved bands: ``names`` in file order, ``roles`` maps a role to its 0-based index in the file."""

    sensor: Sensor
    names: tuple[str, ...]
    roles: dict[str, int]

    def has(self, *roles: str) -> bool:
        return all(r in self.roles for r in roles)

    def index(self, role: str) -> int:
        try:
            return self.roles[role]
        except KeyError:
            raise BandError(f"no {role} band among {', '.join(self.names)}") from None

    def native_names(self, sensor_names: dict[str, str], wanted: Iterable[str]) -> list[int]:
        """Indices of ``wanted`` sensor-native band names (e.g. s2cloudless's B01 … B12), via their roles."""
        return [self.index(sensor_names[name]) for name in wanted]


def parse_names(text: str) -> list[str]:
    """Split a ``bands`` query value such as ``B02,B03,B04,B08``."""
    names = [part.strip() for part in text.split(",")]
    if not names or any(not n for n in names):
        raise BandError(f"bands must be a comma-separated list of names, got {text!r}")
    return names


def resolve(names: Sequence[str]) -> BandSet:
    """Map band names (file order) to roles; raises :class:`BandError` on unknown, duplicate or mixed names."""
    s2 = landsat = 0
    roles: dict[str, int] = {}
    for index, raw in enumerate(names):
        key = raw.strip()
        upper, lower = key.upper(), key.lower()
        if lower in COMMON_NAMES:
            role = lower
        elif upper in SENTINEL2:
            role, s2 = SENTINEL2[upper], s2 + 1
        elif upper in LANDSAT_OLI:
            role, landsat = LANDSAT_OLI[upper], landsat + 1
        else:
            raise BandError(
                f"unknown band name {raw!r} (band {index + 1}): use Sentinel-2 names (B01..B12, B8A), "
                "Landsat OLI names (B1..B11, SR_B1..SR_B7) or common names (blue, green, red, nir, ...)"
            )
        if role in roles:
            raise BandError(f"band role {role!r} appears twice ({names[roles[role]]!r} and {raw!r})")
        roles[role] = index
    if s2 and landsat:
        raise BandError("band names mix Sentinel-2 (zero-padded, e.g. B04) and Landsat (e.g. B4) numbering")
    sensor: Sensor = "sentinel-2" if s2 else "landsat-oli" if landsat else "generic"
    return BandSet(sensor=sensor, names=tuple(names), roles=roles)
