"""Reference cloud masks from s2cloudless's OWN predictor, for tests/unit/test_analysis_cloudmask.py.

Run it in a throwaway virtual environment that has the real package (it pulls sentinelhub and OpenCV, which the
worker never needs):

    python3 -m venv /tmp/s2venv && /tmp/s2venv/bin/pip install s2cloudless==1.7.3 rasterio
    /tmp/s2venv/bin/python tests/data/make_reference_cloudmask.py

For each real crop it writes ``s2cloudless_<crop>.npz`` with:

* ``prob_10m``: ``S2PixelCloudDetector.get_cloud_probability_maps`` on the crop's 10 m pixels (reflectance = DN/1e4);
* ``mask_10m``: ``get_mask_from_prob`` with threshold 0.4, average_over 4, dilation_size 2 (the defaults we use);
* ``mask_10m_low`` at ``threshold_low`` (the 60th percentile of ``prob_10m``), so that the mask is far from empty
  and the disk averaging, threshold and dilation are really exercised on a cloud-free scene;
* ``prob_160m`` / ``mask_160m``: the same detector on 16 x 16 block means (160 m), as the analysis runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from s2cloudless import S2PixelCloudDetector

HERE = Path(__file__).parent
CROPS = ("s2_l1c_fields_256", "s2_l1c_coast_256")
FACTOR = 16


def block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    c, h, w = data.shape
    means: np.ndarray = data.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
    return means


def main() -> None:
    detector = S2PixelCloudDetector(threshold=0.4, average_over=4, dilation_size=2, all_bands=True)
    for crop in CROPS:
        with rasterio.open(HERE / f"{crop}.tif") as src:
            assert list(src.descriptions) == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                                              "B10", "B11", "B12"]  # fmt: skip
            dn = src.read().astype(np.float64)
        assert (dn != 0).all(), "the crops have no nodata; block means below assume it"
        reflectance = dn / 10000.0
        prob_10m = detector.get_cloud_probability_maps(reflectance.transpose(1, 2, 0)[None].astype(np.float32))
        threshold_low = float(np.round(np.percentile(prob_10m, 60), 4))
        coarse = block_mean(reflectance, FACTOR).transpose(1, 2, 0)[None].astype(np.float32)
        prob_160m = detector.get_cloud_probability_maps(coarse)
        np.savez_compressed(
            HERE / f"s2cloudless_{crop}.npz",
            prob_10m=prob_10m[0],
            mask_10m=detector.get_mask_from_prob(prob_10m)[0],
            threshold_low=np.float32(threshold_low),
            mask_10m_low=detector.get_mask_from_prob(prob_10m, threshold=threshold_low)[0],
            prob_160m=prob_160m[0],
            mask_160m=detector.get_mask_from_prob(prob_160m)[0],
        )
        low = detector.get_mask_from_prob(prob_10m, threshold=threshold_low)[0]
        print(f"{crop}: max prob {prob_10m.max():.3f}, 160 m max {prob_160m.max():.3f}, "
              f"low threshold {threshold_low} -> {low.mean():.1%} cloudy")  # fmt: skip


if __name__ == "__main__":
    main()
