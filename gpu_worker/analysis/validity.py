"""Which pixels count, and the error when none does: a job on an image without one valid pixel fails with
``no_valid_pixels`` (:class:`shared.errors.NoValidPixels`, permanent) instead of succeeding with nothing but nulls.

crop-health: a pixel is valid where NDVI is defined: red and NIR are not their band's nodata value, are finite, and
their reflectance (DN / scale, float32) has a non-zero sum and gives a finite NDVI. So an image that is 0 everywhere
(with or without 0 declared as nodata), all NaN, or read with a scale that makes every reflectance underflow to 0 or
overflow to infinity has no valid pixel. Cloudy pixels are valid (a scene under cloud succeeds with
``cloud_fraction`` 1). ``model:<name>``: a pixel is valid where every input band is (not nodata, finite).
"""

from __future__ import annotations

from shared.errors import NoValidPixels


def no_valid_pixels(total: int, empty: int, present: int, scale: float, bands: str = "red and NIR") -> NoValidPixels:
    """The error for a scene of ``total`` pixels, ``empty`` of them in blocks the file leaves out (sparse),
    ``present`` with ``bands`` not nodata and finite as stored."""
    if empty == total:
        return NoValidPixels(f"the file stores no pixel data for {bands}: every block is empty (sparse)")
    if present == 0:
        sparse = f" ({empty} of them in blocks the file leaves empty)" if empty else ""
        return NoValidPixels(f"every one of the {total} pixels is nodata or not a number in {bands}{sparse}")
    return NoValidPixels(
        f"{bands} reflectance (DN / scale, scale {scale:g}) is 0 or not finite in every one of the {present} pixels "
        "that are not nodata: the image is empty (0 everywhere: is 0 its nodata value?) or the scale makes every "
        "reflectance underflow or overflow"
    )
