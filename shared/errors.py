"""The error hierarchy. Every error says whether retrying can help.

    CropAIError
    ├── PermanentError          retrying cannot help: dead-letter at once, mark the job failed
    │   ├── InvalidMessage      the Service Bus envelope does not decode or validate
    │   ├── InvalidImage        the GeoTIFF cannot be read or has unusable bands
    │   │   └── NoValidPixels   it reads, but not one pixel is usable (all nodata, NaN, zero, sparse, or a scale
    │   │                       that under- or overflows every reflectance): its own code, ``no_valid_pixels``
    │   ├── InputMissing        the input blob is gone
    │   ├── InputChanged        an input by reference is no longer the version accepted (its ETag; shared/inputs.py)
    │   ├── InputRefused        an outside image_url's host refuses the reads it served at submit (shared/inputs.py)
    │   ├── InputNotAllowed     an outside image_url may not be read any more: the allow-list or the SSRF guard
    │   ├── GeometryOutsideScene  a field boundary does not intersect the image (or the image has no CRS)
    │   └── UnknownAnalysis     the requested analysis or model does not exist
    └── TransientError          retrying may help: the attempt is released and retried after a backoff,
                                JOB_MAX_ATTEMPTS bounds the retries (gpu_worker/settlement.py)
        ├── DatabaseUnavailable
        ├── StorageUnavailable
        ├── SourceUnavailable   an image_url's host does not answer as it should (shared/inputs.py)
        └── BusUnavailable

Adapters translate SDK and driver errors into these at the edge (``raise StorageUnavailable(...) from e``);
nothing above the adapters catches SDK exceptions.
"""

from __future__ import annotations


class CropAIError(Exception):
    """Base class. ``code`` is the stable machine-readable name stored on failed jobs."""

    code = "internal_error"
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermanentError(CropAIError):
    code = "permanent_error"


class InvalidMessage(PermanentError):
    code = "invalid_message"


class InvalidImage(PermanentError):
    code = "invalid_image"


class NoValidPixels(InvalidImage):
    """Not one pixel is usable: the job would succeed with nothing but nulls. See docs/analysis.md (Validity)."""

    code = "no_valid_pixels"


class InputMissing(PermanentError):
    code = "input_missing"


class GeometryOutsideScene(PermanentError):
    """A requested field lies wholly outside the image, which only the worker could tell (docs/analysis.md)."""

    code = "geometry_outside_scene"


class UnknownAnalysis(PermanentError):
    code = "unknown_analysis"


class TransientError(CropAIError):
    code = "transient_error"
    transient = True


class DatabaseUnavailable(TransientError):
    code = "database_unavailable"


class StorageUnavailable(TransientError):
    code = "storage_unavailable"


class BusUnavailable(TransientError):
    code = "bus_unavailable"
