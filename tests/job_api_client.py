"""Call the job API's control, batch and dead-letter functions through azure.functions objects, as the Functions
host would (:mod:`tests.functions_client` does the same for submit and status)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import azure.functions as func

from tests.functions_client import BASE, confirmed, function


def call(
    name: str,
    method: str,
    path: str,
    *,
    route_params: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> func.HttpResponse:
    req = func.HttpRequest(
        method, f"{BASE}/{path}", route_params=route_params or {}, params=params or {}, body=body, headers=headers or {}
    )
    response: func.HttpResponse = function(name)(req)
    return response


def cancel_job(job_id: object) -> func.HttpResponse:
    return call("cancel_job", "DELETE", f"jobs/{job_id}", route_params={"job_id": str(job_id)})


def retry_job(job_id: object) -> func.HttpResponse:
    return call("retry_job", "POST", f"jobs/{job_id}/retry", route_params={"job_id": str(job_id)})


def post_batch(
    images: Sequence[bytes],
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    field: str = "image",
) -> func.HttpResponse:
    body, content_type = form(images, field=field)
    response = call("submit_batch", "POST", "batches", params=params, body=body,
                    headers={"Content-Type": content_type, **(headers or {})})  # fmt: skip
    confirmed()
    return response


def get_batch(batch_id: object) -> func.HttpResponse:
    return call("batch_status", "GET", f"batches/{batch_id}", route_params={"batch_id": str(batch_id)})


def get_dead_letters(params: dict[str, str] | None = None) -> func.HttpResponse:
    return call("dead_letters", "GET", "dead-letters", params=params)


def replay_dead_letters(body: Any = None, *, params: dict[str, str] | None = None) -> func.HttpResponse:
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return call("replay_dead_letters", "POST", "dead-letters/replay", params=params, body=data,
                headers={"Content-Type": "application/json"})  # fmt: skip


def form(images: Sequence[bytes], *, field: str = "image", boundary: str = "cropaibatch") -> tuple[bytes, str]:
    """A multipart/form-data body with one file per image, all in ``field``; returns (body, Content-Type)."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="scene{i}.tif"\r\n'
        f"Content-Type: image/tiff\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
