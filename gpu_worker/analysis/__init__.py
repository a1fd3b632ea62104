"""Crop-health analysis of multispectral GeoTIFFs with torch, on one device (CUDA when present, else CPU).

    Analyzer(device, models_dir).analyse(image_path, AnalysisRequest(...), workdir) -> AnalysisOutput

Raises :class:`shared.errors.InvalidImage` for unreadable files or unusable bands,
:class:`shared.errors.NoValidPixels` when not one pixel is valid (:mod:`validity`) and
:class:`shared.errors.UnknownAnalysis` for an unknown analysis or model, :class:`shared.errors.GeometryOutsideScene`
for a field the scene does not cover; all are permanent.

``crop-health`` result (``AnalysisOutput.result``; the worker adds ``outputs``)::

    analysis             "crop-health"
    scene                {width, height, band_count, crs ("EPSG:32618" | null), bounds_wgs84 [W, S, E, N] | null}
    valid_fraction       valid pixels (red and NIR not nodata, finite, NDVI defined) / all pixels; > 0
    cloud_fraction       cloudy / valid pixels; null without a cloud mask       (summary.py has every definition)
    clear_fraction       1 - cloud_fraction; null without a cloud mask
    water_fraction       NDWI > 0 among clear pixels; null without green
    vegetation_fraction  NDVI > 0.3 among clear land (land = not water); null when there is no land
    cover                {bare, green, non_green} means over clear land, or null (bands missing / no land)
    cover_note           the fractional-cover caveat (TOA input, Landsat-trained model) when cover is given
    indices              {ndvi, ndwi, evi, savi}: {mean, std, p10, p50, p90, count} over all valid pixels, or null
    indices_clear        the same over clear pixels only; null without a cloud mask
    cloud_mask           {method: "s2cloudless", resolution_m, threshold, average_over, dilation_size}
                         | {method: "landsat-qa", layout, resolution_m} | null
    model_version        "crop-health/2; s2cloudless-1.7.3 lightGBM-v0.1; fc-mlp-1.0"

With field boundaries (``AnalysisRequest.fields``) the statistics above are per field instead (docs/analysis.md,
"Field statistics")::

    fields_window        [column, row, width, height]: the fields' bounding box on the scene's grid (the quicklook's)
    fields               [{id, area_ha, pixel_count, output, valid_fraction, cloud_fraction, ..., indices,
                           indices_clear, properties?}]: each field's pixels (pixel-centre rule), area geodesic,
                           ``output`` the key of its clip (``field_<n>_cog``, n its 1-based position) or null

Files: ``ndvi_cog`` (float32, NaN nodata), ``cloud_mask_cog`` (uint8 0 clear / 1 cloud / 255 nodata, when there
is a mask), ``cover_cog`` (uint8 percent bare / green / non-green over clear land, 255 elsewhere, when the bands
allow), ``quicklook_png``. With fields, instead of the three COGs: ``field_<n>_cog`` per field, one float32 COG over its
pixel box, NaN outside the polygon, bands ndvi, cloud (0 / 1), bare / green / non-green cover percent
(:mod:`products`). ``model:<name>`` (:mod:`model_analysis`) returns ``class_histogram`` or ``means`` and
``class_map_cog`` or ``model_output_cog``.
"""

from gpu_worker.analysis.analyzer import Analyzer
from gpu_worker.analysis.device import select_device
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest, Input

__all__ = ["AnalysisOutput", "AnalysisRequest", "Analyzer", "Input", "select_device"]
