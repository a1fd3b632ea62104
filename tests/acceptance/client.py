"""What a client of the API does, for the acceptance tests: submit, poll, and an independent NDVI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import rasterio

TERMINAL = ("succeeded", "failed")


def submit(api: httpx.Client, data: bytes, *, params: dict[str, str] | None = None, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "image/tiff", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return api.post("/api/jobs", content=data, params=params or {}, headers=headers)


def poll(api: httpx.Client, location: str, timeout: float = 120.0, interval: float = 0.2) -> dict[str, Any]:
    """GET ``location`` until the job is terminal; the last body. Retry-After is checked, not slept (tests)."""
    deadline = time.monotonic() + timeout
    while True:
        response = api.get(location)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        if body["status"] in TERMINAL:
            return body
        assert int(response.headers["Retry-After"]) >= 1
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {body['status']} after {timeout:.0f} s: {body}")
        time.sleep(interval)


def wait_status(api: httpx.Client, location: str, wanted: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll fast until the job reaches ``wanted`` (or a terminal status); the body."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get(location).json()
        if body["status"] == wanted or body["status"] in TERMINAL or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def independent_means(path: Path, bands: list[str] | None = None, scale: float | None = None) -> dict[str, float]:
    """NDVI and SAVI means computed with numpy only: reflectance = DN / scale (10000 for integer data, 1 for float);
    pixels where red or NIR is nodata or not finite, or where the denominator is zero, are excluded."""
    with rasterio.open(path) as ds:
        names = bands or list(ds.descriptions)
        data = ds.read().astype(np.float64)
        nodata = ds.nodata
        is_integer = np.issubdtype(np.dtype(ds.dtypes[0]), np.integer)
    scale = scale or (10000.0 if is_integer else 1.0)
    red, nir = data[names.index(_name(names, "red"))], data[names.index(_name(names, "nir"))]
    valid = np.isfinite(red) & np.isfinite(nir)
    if nodata is not None and not np.isnan(nodata):
        valid &= (red != nodata) & (nir != nodata)
    red, nir = red[valid] / scale, nir[valid] / scale
    ndvi_ok = (nir + red) != 0
    savi_ok = (nir + red + 0.5) != 0
    return {
        "ndvi": float(np.mean((nir - red)[ndvi_ok] / (nir + red)[ndvi_ok])),
        "savi": float(np.mean(1.5 * (nir - red)[savi_ok] / (nir + red + 0.5)[savi_ok])),
    }


def _name(names: list[str], role: str) -> str:
    aliases = {"red": ("B04", "B4", "red"), "nir": ("B08", "B5", "nir")}[role]
    return next(n for n in names if n in aliases)
