"""Images that travel by reference (issue 12, the Claim-Check pattern): a direct upload or an ``image_url``.

A job's input is one of

* ``upload``: ``images/uploads/{upload_id}/input.tif``, written by the client with the write-only SAS URL of
  ``POST /api/uploads``;
* ``blob``: a blob of the deployment's own images container, named by its URL (any SAS on it is ignored);
* ``url``: a public https file (a COG) on a host of ``IMAGE_URL_ALLOWED_HOSTS``.

:class:`Reference` is what the job records (``params["input"]``): where, the ETag the file had when its header was
checked at submit, and its size. The worker never downloads such an input, and checks its ETag and size first
(:class:`InputChanged`, the job fails ``input_changed``). The analysis reads an account's blob through GDAL's
``/vsicurl/`` with ranged reads (:func:`gdal_path`) from a short-lived read SAS URL, and an outside URL through
:mod:`shared.http_range` only (rasterio's opener), never ``/vsicurl/``. An upload or a blob is the job's
``input_blob`` itself (so the reconciler's existence check means what it says); a URL's job stores a small reference
document instead (``{job_id}/input.json``).

The SSRF guard for ``url`` (:func:`check_url`): https only, no credentials, the host on the allow-list, and every
address it resolves to public (:func:`shared.webhooks.resolve_target`); every read then goes to the address that was
checked, redirects never followed (:mod:`shared.http_range`).

How a failed read of an input by reference fails the job (:func:`read_error`): a 404 or 410 is ``input_missing``,
a 412 ``input_changed``; a 5xx, 408, 429 or no answer is the transient ``image_unreachable``; any other answer of an
outside host (401, 403, another 4xx, a 200 to a range request) is ``input_refused``, permanent, while a 401 or 403 of
the account's own storage is transient (our side: a role assignment still propagating). A host no longer allowed, or
now resolving to a non-public address, is ``image_url_not_allowed`` (:class:`InputNotAllowed`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit
from uuid import UUID

from shared.errors import CropAIError, InputMissing, PermanentError, TransientError
from shared.rejection import Rejected

Kind = Literal["upload", "blob", "url"]
UPLOAD_PREFIX = "uploads/"
MAX_URL_LENGTH = 2048
_UUID = re.compile(r"^[0-9a-fA-F-]{32,36}$")
# /vsicurl/ options for one file (not process-wide): no directory listing on open, a few retries of transient HTTP
# errors. GDAL reads what the analysis asks for in ranged GETs (16 KiB chunks merged, CPL_VSIL_CURL_CHUNK_SIZE).
_VSICURL_OPTIONS = "list_dir=no&empty_dir=yes&max_retry=3&retry_delay=1"


class InputChanged(PermanentError):
    """The input is no longer the file the job was accepted with (its ETag changed)."""

    code = "input_changed"


class SourceUnavailable(TransientError):
    """An input by reference cannot be read right now: an outside image_url's host does not answer, or a ranged read
    of the analysis failed on the network (an HTTP 5xx or 429 after GDAL's retries, a timeout, a reset connection).
    The attempt is retried."""

    code = "image_unreachable"


class InputNotAllowed(PermanentError):
    """An outside image_url may not be read any more: its host left IMAGE_URL_ALLOWED_HOSTS, or it now resolves to
    a non-public address (the SSRF guard)."""

    code = "image_url_not_allowed"


class InputRefused(PermanentError):
    """An outside image_url's host refuses to serve it as it did at submit: a 4xx other than 404, 408, 410, 412 and
    429 (401, 403: the file is no longer public), or no ranged read (a 200, no ETag)."""

    code = "input_refused"


def read_error(status: int | None, detail: str, *, own: bool = False) -> CropAIError:
    """The error a failed read of an input by reference fails the attempt with: ``status`` the HTTP status (``None``:
    no answer, a short body); ``own``: a read of the account's own storage (a 401 or 403 is then ours, transient)."""
    if status in (404, 410):
        return InputMissing(f"the input is gone: {detail}")
    if status == 412:
        return InputChanged(f"the input changed: {detail}")
    if status is None or status >= 500 or status in (408, 429) or (own and status in (401, 403)):
        return SourceUnavailable(detail)
    return InputRefused(detail)


def upload_blob_name(upload_id: UUID) -> str:
    return f"{UPLOAD_PREFIX}{upload_id}/input.tif"


def reference_blob_name(job_id: UUID) -> str:
    """Where a ``url`` job's reference document is stored (the reconciler finds the job's input there)."""
    return f"{job_id}/input.json"


@dataclass(frozen=True)
class Reference:
    kind: Kind
    location: str  # the blob name in the images container, or the URL
    etag: str
    size: int

    def params(self) -> dict[str, Any]:
        """``params["input"]`` of the job."""
        return {"kind": self.kind, "location": self.location, "etag": self.etag, "size": self.size}

    @property
    def digest(self) -> str:
        """The job's ``input_sha256``: of the reference (where + ETag), not of the file. Two submits of the same
        key name the same file in the same version iff their digests are equal."""
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()

    def document(self) -> bytes:
        return json.dumps(self.params(), sort_keys=True).encode()

    @classmethod
    def of(cls, params: dict[str, Any]) -> Reference | None:
        """The job's reference, or ``None`` for a job whose image was sent in the request."""
        value = params.get("input")
        if not isinstance(value, dict):
            return None
        return cls(value["kind"], value["location"], value["etag"], int(value["size"]))


def parse_upload_id(value: object) -> UUID:
    if not isinstance(value, str) or not _UUID.match(value):
        raise Rejected("invalid_upload_id", "upload_id must be the id POST /api/uploads answered with")
    try:
        return UUID(value)
    except ValueError as e:
        raise Rejected("invalid_upload_id", "upload_id must be the id POST /api/uploads answered with") from e


def check_url(value: object, allowed_hosts: tuple[str, ...]) -> str:
    """``image_url`` as given, if it may be read from outside the account: https, no credentials, no fragment, the
    host on the allow-list. Its addresses are checked when it is read (:func:`shared.http_range.open_url`)."""
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LENGTH:
        raise Rejected("invalid_image_url", f"image_url must be an absolute URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as e:
        raise Rejected("invalid_image_url", f"image_url is not a valid URL ({e})") from e
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme.lower() not in ("https", "http") or not host or any(c.isspace() for c in value):
        raise Rejected("invalid_image_url", "image_url must be an absolute http(s) URL")
    if parts.scheme.lower() != "https":
        raise Rejected("image_url_not_allowed", "an image_url outside the deployment's storage must use https")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise Rejected("image_url_not_allowed", "image_url must not carry credentials (user@) or a fragment")
    if not host_allowed(host, allowed_hosts):
        raise Rejected(
            "image_url_not_allowed",
            f"host {host!r} is not among the hosts images may be read from (IMAGE_URL_ALLOWED_HOSTS)",
        )
    return value


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in allowed)


def gdal_path(url: str, *, header_file: Path | None = None, etag: str | None = None) -> Path:
    """The GDAL path that reads ``url`` through ``/vsicurl/`` with this file's options (and the HTTP headers in
    ``header_file``, sent with every request). The URL is percent-encoded in the ``url=`` option, so the path has
    no ``//`` that :class:`~pathlib.Path` would fold. ``etag``: added to the URL as a query parameter the service
    ignores, so that GDAL's process-wide ``/vsicurl/`` cache (keyed by URL) never serves one version's bytes for
    another's."""
    if etag is not None:
        url += ("&" if "?" in url else "?") + "etag=" + quote(etag, safe="")
    options = _VSICURL_OPTIONS
    if header_file is not None:
        options += f"&header_file={quote(str(header_file), safe='')}"
    return Path(f"/vsicurl?{options}&url={quote(url, safe='')}")
