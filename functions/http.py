"""What the job API's handlers share about HTTP: the files of a form field, and the URLs of the resources they
answer with (``Location`` and ``status_url``, under the route prefix the request came in by)."""

from __future__ import annotations

from urllib.parse import urlsplit

import azure.functions as func

from shared.rejection import Rejected


def submit_options(req: func.HttpRequest) -> dict[str, str | None]:
    """What a submit (of one image or of a batch) takes from the query and the headers, as received."""
    return {
        "bands": req.params.get("bands"),
        "scale": req.params.get("scale"),
        "analysis": req.params.get("analysis"),
        "idempotency_key": req.headers.get("Idempotency-Key"),
        "priority": req.params.get("priority"),
        "callback_url": req.params.get("callback_url"),
        "callback_events": req.params.get("callback_events"),
    }


def form_files(req: func.HttpRequest, field: str) -> list[bytes]:
    """The contents of every file in form field ``field``, in the form's order."""
    try:
        files = req.files
    except ValueError as e:  # werkzeug: a boundary missing or malformed
        raise Rejected("invalid_multipart", f"the multipart body cannot be parsed: {e}") from e
    try:
        return [part.read() for part in files.getlist(field)]
    finally:
        for _, part in files.items(multi=True):
            part.close()  # large parts are spooled to temporary files


def resource_url(req: func.HttpRequest, path: str, *, depth: int = 1) -> tuple[str, str]:
    """``(location, absolute URL)`` of ``path`` (``jobs/{id}``, ``batches/{id}``): the request's path without its
    last ``depth`` segments (the route's own: 1 for ``jobs``, 3 for ``jobs/{id}/retry``), then ``path``."""
    url = urlsplit(req.url)
    root = url.path.rstrip("/").rsplit("/", depth)[0]
    location = f"{root}/{path}"
    return location, f"{url.scheme}://{url.netloc}{location}" if url.netloc else location
