"""Direct uploads (issue 12): an upload id and a short-lived, write-only SAS URL for ``images/uploads/{id}/input.tif``.

The client puts the file straight into Blob Storage (a block blob, blocks in parallel: ``azcopy copy`` or the SDK's
``BlobClient.from_blob_url(url).upload_blob(f, max_concurrency=8)``), then submits ``{"upload_id": ...}``
(:mod:`shared.by_reference`). The URL allows create and write on that one blob and nothing else (no read, no list,
no delete), until ``UPLOAD_SAS_TTL``; it is signed with a user delegation key (the API's Entra identity, no account
key) or, locally, with Azurite's account key. An upload never submitted is deleted by the storage account's lifecycle
rule on ``images/`` (``inputRetentionDays``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID

from pydantic import BaseModel, Field

from shared.inputs import upload_blob_name


class UploadSigner(Protocol):
    def upload_url(self, blob_name: str, ttl: timedelta) -> tuple[str, datetime]: ...


class UploadTicket(BaseModel):
    """The body of ``POST /api/uploads`` (201)."""

    upload_id: UUID = Field(description='submit the uploaded file with POST /api/jobs {"upload_id": ...}')
    upload_url: str = Field(description="write-only SAS URL of the blob to put the GeoTIFF in (a block blob)")
    expires_at: datetime = Field(description="the URL is refused after this; the file must be committed before")
    max_bytes: int = Field(description="the largest file a job accepts (MAX_INPUT_BYTES)")
    headers: dict[str, str] = Field(description="headers a plain PUT of the whole file must carry")


def new_upload(signer: UploadSigner, ttl: timedelta, max_bytes: int) -> UploadTicket:
    upload_id = uuid.uuid4()
    url, expires_at = signer.upload_url(upload_blob_name(upload_id), ttl)
    return UploadTicket(
        upload_id=upload_id,
        upload_url=url,
        expires_at=expires_at,
        max_bytes=max_bytes,
        headers={"x-ms-blob-type": "BlockBlob"},
    )
