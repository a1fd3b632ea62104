"""Call the Function App's registered functions through azure.functions objects, as the Functions host would."""

from __future__ import annotations

import functools
import json
from typing import Any

import azure.functions as func

from function_app import app
from functions import deps

BASE = "http://127.0.0.1:7071/api"


@functools.cache
def indexed() -> dict[str, Any]:
    """The app's ``Function`` objects by name (their bindings, their user function)."""
    # get_functions() may run only once per app: it refuses to index the same names twice.
    return {str(f.get_function_name()): f for f in app.get_functions()}


def _functions() -> dict[str, Any]:
    return {name: f.get_user_function() for name, f in indexed().items()}


def function(name: str) -> Any:
    return _functions()[name]


def post_job(
    body: bytes,
    *,
    content_type: str | None = "image/tiff",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> func.HttpResponse:
    all_headers = {"Content-Type": content_type} if content_type is not None else {}
    all_headers.update(headers or {})
    req = func.HttpRequest("POST", f"{BASE}/jobs", headers=all_headers, params=params or {}, body=body)
    response: func.HttpResponse = function("submit_job")(req)
    confirmed()
    return response


def confirmed() -> None:
    """Wait until the sends a call queued are recorded (the API records them after answering,
    :mod:`shared.confirmations`), so that a test reads the rows, or reconciles, as they settle within milliseconds."""
    built = deps.current()
    if built is not None and built.confirms is not None:
        assert built.confirms.flush(timeout=10)


def get_job(job_id: str) -> func.HttpResponse:
    req = func.HttpRequest("GET", f"{BASE}/jobs/{job_id}", route_params={"job_id": job_id}, body=b"")
    response: func.HttpResponse = function("job_status")(req)
    return response


def body(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())


def multipart(fields: dict[str, tuple[str, bytes]], boundary: str = "cropaiboundary") -> tuple[bytes, str]:
    """``fields``: name -> (filename, bytes). Returns (body, Content-Type)."""
    parts = []
    for name, (filename, data) in fields.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/tiff\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
