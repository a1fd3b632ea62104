"""Submit by reference: find the image a JSON submit names and check its header with ranged reads.

``{"upload_id": ...}`` names ``images/uploads/{id}/input.tif``; ``{"image_url": ...}`` a blob of the deployment's own
images container (by its URL) or, if ``IMAGE_URL_ALLOWED_HOSTS`` allows the host, a public https file. Either way the
file's header is read by ranges pinned to the ETag it has now (:func:`shared.ranged.inspect_source`: the same codes
as an image in the body), and the job records a :class:`~shared.inputs.Reference` to that version. Nothing of the
file is copied. Codes of its own: ``invalid_upload_id``, ``upload_not_found`` (never uploaded, not committed, or
expired), ``invalid_image_url``, ``image_url_not_allowed``, ``image_unreachable`` (a 404, a host that does not
answer ranged reads, a file that changed while its header was read).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InputMissing
from shared.geotiff import ImageHeader, Limits
from shared.http_range import connection_pool, open_url
from shared.inputs import InputChanged, Reference, check_url, parse_upload_id, upload_blob_name
from shared.ranged import RangeSource, inspect_source
from shared.rejection import Rejected

# An upload must be submitted within this long of its last write (UPLOAD_MAX_AGE): the lifecycle rule deletes it
# inputRetentionDays after that write, and its job (and retries) must find it.
UPLOAD_MAX_AGE = timedelta(hours=24)

log = logging.getLogger(__name__)


class SubmitByReference(BaseModel):
    """The JSON body of ``POST /api/jobs`` (``Content-Type: application/json``): the image by reference, exactly
    one of ``upload_id`` and ``image_url``, and the options of a submit (a query parameter fills in a member left
    out). Documentation of what ``functions.submit.by_reference`` reads: it refuses with the codes of a submit."""

    model_config = ConfigDict(extra="forbid")

    upload_id: UUID | None = Field(None, description="the upload_id of POST /api/uploads, once the file is uploaded")
    image_url: str | None = Field(
        None,
        max_length=2048,
        description="a blob of the deployment's images container, or an https file on a host IMAGE_URL_ALLOWED_HOSTS "
        "names (a cloud-optimised GeoTIFF: it is read by ranges)",
    )
    bands: str | list[str] | None = Field(None, description="band names in file order (a list or comma-separated)")
    scale: float | None = Field(None, gt=0, description="reflectance = DN / scale")
    analysis: str | None = Field(None, pattern=r"^(crop-health|model:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
    priority: Literal["high", "normal"] | None = None
    callback_url: str | None = Field(None, max_length=2048, description="webhook target (https)")
    callback_events: str | list[Literal["started", "progress", "completed"]] | None = None
    geometry: dict[str, Any] | None = Field(
        None, description="field boundaries (GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection)"
    )


class StoredSource(RangeSource, Protocol):
    """A blob read by ranges, with when it was last written and whether it is a block blob."""

    modified: datetime
    block_blob: bool


class InputSource(Protocol):
    """What this needs of :class:`shared.storage.BlobStore`."""

    def open_input(self, blob_name: str, etag: str | None = None) -> StoredSource: ...

    def blob_name(self, url: str) -> str | None: ...


@dataclass(frozen=True)
class Found:
    reference: Reference
    header: ImageHeader
    read_bytes: int  # what the header check read of the file
    requests: int


def find(
    upload_id: object,
    image_url: object,
    store: InputSource,
    limits: Limits,
    allowed: tuple[str, ...],
    max_upload_age: timedelta = UPLOAD_MAX_AGE,
) -> Found:
    """The image a JSON submit names (exactly one of ``upload_id`` and ``image_url``), its header checked; an upload
    must have been written at most ``max_upload_age`` ago (UPLOAD_MAX_AGE)."""
    if (upload_id is None) == (image_url is None):
        raise Rejected("invalid_request_body", "give exactly one of upload_id and image_url")
    started = time.perf_counter()
    if upload_id is not None:
        name = upload_blob_name(parse_upload_id(upload_id))
        found = _blob("upload", name, store, limits, "upload_not_found", "no upload with this id was committed",
                      max_upload_age)  # fmt: skip
    else:
        try:
            own = store.blob_name(image_url) if isinstance(image_url, str) else None
        except ValueError as e:
            raise Rejected("invalid_image_url", str(e)) from e
        if own is not None:
            found = _blob("blob", own, store, limits, "image_unreachable", f"there is no blob {own!r}")
        else:
            found = _external(check_url(image_url, allowed), limits)
    extra = {"action": "inspect_reference", "kind": found.reference.kind, "read_bytes": found.read_bytes,
             "size": found.reference.size, "requests": found.requests}  # fmt: skip
    log.info("%s input checked by %d ranged reads (%d of %d bytes) in %.3f s", found.reference.kind, found.requests,
             found.read_bytes, found.reference.size, time.perf_counter() - started, extra=extra)  # fmt: skip
    return found


def _blob(
    kind: str,
    name: str,
    store: InputSource,
    limits: Limits,
    missing: str,
    detail: str,
    max_age: timedelta | None = None,
) -> Found:
    try:
        source = store.open_input(name)
        if max_age is not None:
            _check_upload(source, max_age)
        header, chunks = inspect_source(source, limits)
    except InputMissing as e:
        raise Rejected(missing, detail) from e
    except InputChanged as e:
        raise Rejected("image_unreachable", "the blob changed while its header was read; submit again") from e
    reference = Reference("upload" if kind == "upload" else "blob", name, source.etag, source.size)
    return Found(reference, header, chunks.fetched, chunks.requests)


def _check_upload(source: StoredSource, max_age: timedelta) -> None:
    """An upload is read in place and expires by the images container's lifecycle rule (``inputRetentionDays`` after
    its last write): one submitted long after it was written could be deleted before its job, or a retry, reads it.
    Only a recent block blob is taken (the write SAS would let a client create an append or page blob)."""
    if not source.block_blob:
        raise Rejected(
            "upload_not_found", "the upload is not a block blob: upload it in blocks (x-ms-blob-type: BlockBlob)"
        )
    age = datetime.now(UTC) - source.modified
    if age > max_age:
        hours = max_age.total_seconds() / 3600
        raise Rejected("upload_expired", f"the upload was written more than {hours:g} h ago: upload the image again")


def _external(url: str, limits: Limits) -> Found:
    with connection_pool() as pool:
        source, _ = open_url(url, pool)
        try:
            header, chunks = inspect_source(source, limits)
        except InputChanged as e:
            raise Rejected("image_unreachable", "image_url changed while its header was read; submit again") from e
    return Found(Reference("url", url, source.etag, source.size), header, chunks.fetched, chunks.requests)
