"""The HTTP client of the API: one ``httpx.Client`` with the base URL and the function key, and one method per
endpoint. Every method returns the response when it is a success; a problem (any 4xx/5xx) raises
:class:`~cli.errors.ProblemResponse`, a connection failure :class:`~cli.errors.Unreachable`. Parsing the bodies
into the API's models is the caller's (:mod:`cli.commands`), so that ``--json`` can print them exactly as they came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import ValidationError

from cli.errors import ProblemResponse, UnexpectedResponse, Unreachable
from cli.upload import put_blocks
from shared.openapi import Problem

DEFAULT_API_URL = "http://127.0.0.1:7071"
KEY_HEADER = "x-functions-key"
PROBLEM_TYPE = "application/problem+json"
USER_AGENT = "crop-ai-cli"


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/api`` → the URL the endpoints hang below (``.../api``)."""
    url = url.rstrip("/")
    return url if url.endswith("/api") else f"{url}/api"


class Api:
    def __init__(
        self,
        api_url: str,
        function_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,  # tests
    ) -> None:
        headers = {"User-Agent": USER_AGENT}
        if function_key:
            headers[KEY_HEADER] = function_key
        self.base_url = api_base(api_url)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        # Output files are signed URLs on storage: no function key goes there.
        self._plain = httpx.Client(
            headers={"User-Agent": USER_AGENT}, timeout=timeout, follow_redirects=True, transport=transport
        )

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._plain.close()

    # Jobs
    def submit(self, image: Path, params: Mapping[str, str], idempotency_key: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "image/tiff", **_idempotency(idempotency_key)}
        return self._call("POST", "/jobs", params=params, content=image.read_bytes(), headers=headers)

    def submit_reference(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> httpx.Response:
        """A submit by reference (``{"upload_id"}`` or ``{"image_url"}`` and the options)."""
        return self._call("POST", "/jobs", json=dict(body), headers=_idempotency(idempotency_key))

    def upload(self, image: Path) -> str:
        """Upload ``image`` straight to storage (:mod:`cli.upload`); its ``upload_id`` to submit."""
        ticket = self._call("POST", "/uploads").json()
        try:
            put_blocks(self._plain, ticket["upload_url"], image)
        except httpx.TransportError as e:
            raise Unreachable(f"upload of {image}: cannot reach storage ({e})") from e
        return str(ticket["upload_id"])

    def submit_batch(
        self, images: Sequence[Path], params: Mapping[str, str], idempotency_key: str | None = None
    ) -> httpx.Response:
        files = [("image", (path.name, path.read_bytes(), "image/tiff")) for path in images]
        return self._call("POST", "/batches", params=params, files=files, headers=_idempotency(idempotency_key))

    def job(self, job_id: str) -> httpx.Response:
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, params: Mapping[str, str]) -> httpx.Response:
        return self._call("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> httpx.Response:
        return self._call("DELETE", f"/jobs/{job_id}")

    def retry(self, job_id: str) -> httpx.Response:
        return self._call("POST", f"/jobs/{job_id}/retry")

    def batch(self, batch_id: str) -> httpx.Response:
        return self._call("GET", f"/batches/{batch_id}")

    # Operations
    def stats(self) -> httpx.Response:
        return self._call("GET", "/stats")

    def health(self) -> httpx.Response:
        """The health document, also when it says 503 (the body then tells which check failed)."""
        return self._call("GET", "/health", accept={503})

    def dead_letters(self, params: Mapping[str, str]) -> httpx.Response:
        return self._call("GET", "/dead-letters", params=params)

    def replay(self, body: Mapping[str, Any]) -> httpx.Response:
        return self._call("POST", "/dead-letters/replay", json=dict(body))

    def download(self, url: str) -> httpx.Response:
        """GET an output file's signed URL (absolute; a relative one is taken against the API's origin)."""
        absolute = httpx.URL(self.base_url).join(url)
        return self._send(self._plain, "GET", str(absolute), accept=frozenset())

    def _call(
        self, method: str, path: str, *, accept: set[int] | frozenset[int] = frozenset(), **kw: Any
    ) -> httpx.Response:
        return self._send(self._http, method, path, accept=accept, **kw)

    @staticmethod
    def _send(
        client: httpx.Client, method: str, url: str, *, accept: set[int] | frozenset[int], **kw: Any
    ) -> httpx.Response:
        try:
            response = client.request(method, url, **kw)
        except httpx.TimeoutException as e:
            raise Unreachable(f"{method} {url}: no answer in time ({e.__class__.__name__})") from e
        except httpx.TransportError as e:
            raise Unreachable(f"{method} {url}: cannot reach {client.base_url or url} ({e})") from e
        if response.is_success or response.status_code in accept:
            return response
        raise ProblemResponse(problem_of(response), response.text)


def problem_of(response: httpx.Response) -> Problem:
    """The problem an error response carries; one made up from the status line when it carries none (a bare 401
    from the platform, a proxy's HTML page)."""
    media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type in (PROBLEM_TYPE, "application/json"):
        try:
            return Problem.model_validate_json(response.content)
        except ValidationError as e:
            if media_type == PROBLEM_TYPE:
                raise UnexpectedResponse(f"a malformed problem answer ({response.status_code}): {e}") from e
    return Problem(
        type="about:blank",
        title=response.reason_phrase or "Error",
        status=response.status_code,
        detail=response.text.strip()[:200] or response.reason_phrase or "no detail",
        code=f"http_{response.status_code}",
    )


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}
