"""Blob Storage: input images (``images/{job_id}/input.tif``), result files (``results/{job_id}/{attempt}/{name}``:
a losing attempt never overwrites the winner's files) and short-lived read URLs for them.

``STORAGE_RETRY_TOTAL`` bounds the SDK's retries, 1 s apart (default 1): a submit while storage is down answers
503 within about 2 s instead of the SDK's default of tens of seconds; the worker retries whole attempts on top.

Locally a connection string (Azurite); in Azure the account's blob endpoint with an Entra credential. Read URLs are
SAS URLs signed with the account key when the client has one, with a user delegation key when it authenticates
with Entra ID (the key is fetched once and reused until close to its expiry), and the plain URL otherwise. SDK
errors become :class:`~shared.errors.InputMissing` only when the service says ``BlobNotFound`` (the blob is gone),
and :class:`~shared.errors.StorageUnavailable` otherwise: a missing container (``ContainerNotFound``) is a
configuration error, and treating it as a permanent per-job failure would dead-letter the whole backlog.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import (
    BlobClient,
    BlobSasPermissions,
    BlobServiceClient,
    BlobType,
    ContentSettings,
    LinearRetry,
    StorageErrorCode,
    UserDelegationKey,
    generate_blob_sas,
)

from shared.errors import InputMissing, StorageUnavailable
from shared.inputs import InputChanged
from shared.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

_CLOCK_SKEW = timedelta(minutes=5)  # SAS start time in the past: clocks disagree
_DELEGATION_KEY_LIFETIME = timedelta(days=1)


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except AzureError as e:  # a missing container too: that is configuration, not the client's input
            raise StorageUnavailable(f"blob storage unavailable: {type(e).__name__}: {e}"[:1000]) from e

    return wrapper


def _blob_not_found(e: ResourceNotFoundError) -> bool:
    """The blob itself is gone (not its container, which is configuration: re-raised, so StorageUnavailable)."""
    return getattr(e, "error_code", None) == StorageErrorCode.BLOB_NOT_FOUND


def _retries(settings: Settings) -> dict[str, Any]:
    policy = LinearRetry(backoff=1, retry_total=settings.storage_retry_total, random_jitter_range=0)
    return {"retry_policy": policy, "connection_timeout": 5}


class BlobStore:
    def __init__(
        self, service: BlobServiceClient, images_container: str = "images", results_container: str = "results"
    ):
        self._service = service
        self.images_container = images_container
        self.results_container = results_container
        self._delegation_key: UserDelegationKey | None = None
        self._delegation_key_expiry = datetime.min.replace(tzinfo=UTC)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, credential: TokenCredential | None = None) -> BlobStore:
        if settings.storage_connection_string:
            service = BlobServiceClient.from_connection_string(settings.storage_connection_string, **_retries(settings))
        else:
            from azure.identity import DefaultAzureCredential

            assert settings.blob_service_uri, "Settings guarantees one of the two"
            service = BlobServiceClient(
                settings.blob_service_uri, credential=credential or DefaultAzureCredential(), **_retries(settings)
            )
        return cls(service, settings.images_container, settings.results_container)

    @_translated
    def ensure_containers(self) -> None:
        for name in (self.images_container, self.results_container):
            with contextlib.suppress(ResourceExistsError):
                self._service.create_container(name)

    @_translated
    def ping(self) -> None:
        """Raise :class:`StorageUnavailable` unless the images container answers."""
        self._service.get_container_client(self.images_container).get_container_properties()

    @_translated
    def put_input(self, job_id: UUID, data: bytes, sha256: str, *, name: str | None = None) -> str:
        """Store a job's image (or, for an image by reference, its reference document ``name``) once. A blob
        already there holds these very bytes (an ``Idempotency-Key`` replay matched their SHA-256), so it is kept:
        overwriting it could break a worker's download in progress."""
        name = name or f"{job_id}/input.tif"
        content_type = "application/json" if name.endswith(".json") else "image/tiff"
        with contextlib.suppress(ResourceExistsError):
            self._service.get_blob_client(self.images_container, name).upload_blob(
                data,
                overwrite=False,
                metadata={"sha256": sha256},
                content_settings=ContentSettings(content_type=content_type),
                max_concurrency=4,
            )
        return name

    @_translated
    def open_input(self, blob_name: str, etag: str | None = None) -> BlobRange:
        """The images container's blob ``blob_name`` for ranged reads, pinned to its ETag now (or to ``etag``:
        :class:`InputChanged` if it is no longer that); :class:`InputMissing` if there is no such blob."""
        blob = self._service.get_blob_client(self.images_container, blob_name)
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError as e:
            if _blob_not_found(e):
                raise InputMissing(f"input blob {blob_name} not found") from e
            raise
        if etag is not None and props.etag != etag:
            raise InputChanged(f"input blob {blob_name} has ETag {props.etag}, the job was accepted with {etag}")
        return BlobRange(blob, props.size, props.etag, props.last_modified, props.blob_type == BlobType.BLOCKBLOB)

    def blob_name(self, url: str) -> str | None:
        """The name in the images container of the blob ``url`` names, when it is one of this account's (its query,
        a SAS say, is ignored: the blob is read with our own identity); else ``None``. ``ValueError`` for a name with
        an empty, ``.`` or ``..`` segment (percent-encoded too): HTTP clients normalise those, so
        ``images/../results/x`` would read another container with the API's account-wide role."""
        base = f"{self._service.url.rstrip('/')}/{self.images_container}/"
        plain = url.split("?", 1)[0].split("#", 1)[0]
        if not plain.startswith(base) or len(plain) == len(base):
            return None
        name = str(BlobClient.from_blob_url(plain).blob_name)
        if any(segment in ("", ".", "..") for segment in name.replace("\\", "/").split("/")):
            raise ValueError(f"the blob name {name!r} has an empty, '.' or '..' path segment")
        return name

    def input_url(self, blob_name: str) -> str:
        return str(self._service.get_blob_client(self.images_container, blob_name).url)

    @_translated
    def upload_url(self, blob_name: str, ttl: timedelta) -> tuple[str, datetime]:
        """A write-only SAS URL (create, write: a block blob in parallel blocks) for the images container's blob
        ``blob_name``, and when it expires. Signed with a user delegation key (Entra ID) or the account key
        (Azurite)."""
        blob = self._service.get_blob_client(self.images_container, blob_name)
        signed = self._signed(str(blob.url), BlobSasPermissions(create=True, write=True), ttl)
        if signed is None:
            raise StorageUnavailable("the storage client has no key to sign an upload URL with")
        return signed

    @_translated
    def download_input(self, blob_name: str, path: Path) -> None:
        blob = self._service.get_blob_client(self.images_container, blob_name)
        try:
            downloader = blob.download_blob(max_concurrency=4)
        except ResourceNotFoundError as e:
            if _blob_not_found(e):
                raise InputMissing(f"input blob {blob_name} not found") from e
            raise
        with path.open("wb") as f:
            downloader.readinto(f)

    @_translated
    def input_sha256(self, blob_name: str) -> str | None:
        """The SHA-256 recorded in the input blob's metadata when it was stored."""
        try:
            props = self._service.get_blob_client(self.images_container, blob_name).get_blob_properties()
        except ResourceNotFoundError as e:
            if _blob_not_found(e):
                raise InputMissing(f"input blob {blob_name} not found") from e
            raise
        return props.metadata.get("sha256")

    @_translated
    def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
        blob = self._service.get_blob_client(self.results_container, f"{job_id}/{attempt}/{name}")
        with path.open("rb") as f:
            blob.upload_blob(f, overwrite=True, content_settings=ContentSettings(content_type=content_type))
        return str(blob.url)

    @_translated
    def delete_results(self, job_id: UUID, attempt: int) -> int:
        """Delete the files of one attempt (``results/{job_id}/{attempt}/``: a cancelled run's); return how many."""
        container = self._service.get_container_client(self.results_container)
        deleted = 0
        for blob in container.list_blobs(name_starts_with=f"{job_id}/{attempt}/"):
            with contextlib.suppress(ResourceNotFoundError):  # deleted meanwhile: gone either way
                container.delete_blob(blob.name)
                deleted += 1
        return deleted

    @_translated
    def read_url(self, blob_url: str, ttl: timedelta) -> str:
        signed = self._signed(blob_url, BlobSasPermissions(read=True), ttl)
        return blob_url if signed is None else signed[0]

    def _signed(self, blob_url: str, permission: BlobSasPermissions, ttl: timedelta) -> tuple[str, datetime] | None:
        """``blob_url`` with a SAS for ``permission`` and its expiry, or ``None`` when there is nothing to sign with
        (not this account's blob, or a credential with no key)."""
        blob = BlobClient.from_blob_url(blob_url)
        if blob.account_name != self._service.account_name or not blob.account_name:
            return None  # not ours to sign
        now = datetime.now(UTC)
        expiry = now + ttl
        account_key: str | None = getattr(self._service.credential, "account_key", None)
        delegation_key: UserDelegationKey | None = None
        if not account_key:
            if not hasattr(self._service.credential, "get_token"):
                return None  # e.g. an account SAS: nothing to sign with
            delegation_key, key_expiry = self._user_delegation_key(now, ttl)
            expiry = min(expiry, key_expiry)
        sas = generate_blob_sas(
            blob.account_name,
            blob.container_name,
            blob.blob_name,
            account_key=account_key,
            user_delegation_key=delegation_key,
            permission=permission,
            start=now - _CLOCK_SKEW,
            expiry=expiry,
        )
        return f"{blob_url.split('?', 1)[0]}?{sas}", expiry

    def _user_delegation_key(self, now: datetime, ttl: timedelta) -> tuple[UserDelegationKey, datetime]:
        with self._lock:
            if self._delegation_key is None or self._delegation_key_expiry - now < ttl:
                expiry = now + min(max(_DELEGATION_KEY_LIFETIME, ttl), timedelta(days=7))  # the service maximum
                self._delegation_key = self._service.get_user_delegation_key(now - _CLOCK_SKEW, expiry)
                self._delegation_key_expiry = expiry
            return self._delegation_key, self._delegation_key_expiry

    def close(self) -> None:
        self._service.close()


class BlobRange:
    """One blob read by ranges (:class:`shared.ranged.RangeSource`), every read conditional on the ETag it had
    when opened: a blob overwritten meanwhile raises :class:`InputChanged`, never mixes two versions."""

    def __init__(self, blob: BlobClient, size: int, etag: str, modified: datetime, block_blob: bool) -> None:
        self._blob = blob
        self.size, self.etag = size, etag
        self.modified, self.block_blob = modified, block_blob  # its last write; a client's SAS may make any type

    @_translated
    def read(self, offset: int, length: int) -> bytes:
        try:
            stream = self._blob.download_blob(
                offset=offset, length=length, etag=self.etag, match_condition=MatchConditions.IfNotModified
            )
            return stream.readall()
        except ResourceModifiedError as e:
            raise InputChanged(f"blob {self._blob.blob_name} changed while it was read") from e
        except ResourceNotFoundError as e:
            if _blob_not_found(e):
                raise InputMissing(f"blob {self._blob.blob_name} was deleted while it was read") from e
            raise
