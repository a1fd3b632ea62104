"""What the job API's handlers share about HTTP: the parts of a form (files and ``geometry``), and the URLs
of the resources they answer with (``Location`` and ``status_url``, under the route prefix the request came in by)."""

from __future__ import annotations

import json
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


def form_parts(req: func.HttpRequest, field: str) -> tuple[list[bytes], object]:
    """The contents of every file in form field ``field`` (in the form's order), and the parsed JSON of the form's
    ``geometry`` part (a plain field or a file, UTF-8; ``None`` without one): ``invalid_geometry`` for two parts or
    text that is not JSON. Every part is closed before this returns or raises."""
    try:
        form, files = req.form, req.files
    except ValueError as e:  # werkzeug: a boundary missing or malformed
        raise Rejected("invalid_multipart", f"the multipart body cannot be parsed: {e}") from e
    try:
        contents = [part.read() for part in files.getlist(field)]
        geometry: list[str | bytes] = [*form.getlist("geometry"), *(part.read() for part in files.getlist("geometry"))]
    finally:
        for _, part in files.items(multi=True):
            part.close()  # large parts are spooled to temporary files
    return contents, _geometry(geometry)


def _geometry(parts: list[str | bytes]) -> object:
    if not parts:
        return None
    if len(parts) > 1:
        raise Rejected("invalid_geometry", f"the form has {len(parts)} 'geometry' parts: send one GeoJSON object")
    try:
        return json.loads(parts[0])
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected("invalid_geometry", f"the 'geometry' part is not valid JSON (UTF-8): {e}") from e


def resource_url(req: func.HttpRequest, path: str, *, depth: int = 1) -> tuple[str, str]:
    """``(location, absolute URL)`` of ``path`` (``jobs/{id}``, ``batches/{id}``): the request's path without its
    last ``depth`` segments (the route's own: 1 for ``jobs``, 3 for ``jobs/{id}/retry``), then ``path``."""
    url = urlsplit(req.url)
    root = url.path.rstrip("/").rsplit("/", depth)[0]
    location = f"{root}/{path}"
    return location, f"{url.scheme}://{url.netloc}{location}" if url.netloc else location
