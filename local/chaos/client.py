"""What a good client of ``POST /api/jobs`` does, timed: each job has its own ``Idempotency-Key`` and is submitted
at its time; a 5xx or a lost connection is retried with the *same* key (after ``Retry-After`` for a 503) until the
API accepts it (202, or 200 for a replay) or the job's deadline passes. Any other answer is final. With a
``reference`` (the URL of a blob of the stack's images container), every ``every``-th job is submitted by reference
(``{"image_url"}``) instead of as bytes: the worker checks that blob's ETag and copies it before the analysis.

Every request is recorded (status or exception, problem code, seconds), and :attr:`Submitter.in_flight` says how
many requests are under way right now (the host-kill fault waits for one).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)

ACCEPTED = (200, 202)


@dataclass(frozen=True)
class Request:
    key: str
    at: float  # seconds after the chaos phase started
    seconds: float
    status: int | None  # None: no answer (connection refused or reset, timeout)
    code: str | None  # the problem's code, or the exception's class when there was no answer


class Submitter:
    def __init__(
        self,
        api_url: str,
        image: bytes,
        bands: str,
        *,
        run_id: str,
        started: float,
        stop: threading.Event,
        deadline: float,
        reference: str | None = None,
        every: int = 0,
    ) -> None:
        self._url = f"{api_url}/jobs"
        self._reference, self._every = reference, every
        self._image = image
        self._bands = bands
        self.run_id = run_id
        self._started = started  # time.monotonic() of the chaos phase's start
        self._stop = stop
        self._deadline = deadline  # seconds a job is retried for
        self._lock = threading.Lock()
        self._in_flight = 0
        self._rng = random.Random(0)
        self.accepted: dict[str, str] = {}  # Idempotency-Key -> job id
        self.given_up: dict[str, str] = {}  # Idempotency-Key -> the last answer
        self.requests: list[Request] = []
        self.by_reference: set[str] = set()  # the Idempotency-Keys of the jobs submitted by reference

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def key(self, index: int) -> str:
        return f"chaos-{self.run_id}-{index:04d}"

    def run(self, times: list[float]) -> None:
        """Submit job ``i`` at ``times[i]`` (seconds after the start), each in its own thread; return when every
        job was accepted or given up."""
        limits = httpx.Limits(max_connections=len(times) + 8, max_keepalive_connections=32)
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0), limits=limits) as client:
            threads = []
            for index, at in enumerate(times):
                if self._stop.wait(max(0.0, self._started + at - time.monotonic())):
                    break
                args = (client, self.key(index), self._by_reference(index))
                thread = threading.Thread(target=self._submit, args=args, daemon=True)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()

    def _by_reference(self, index: int) -> bool:
        return self._reference is not None and self._every > 0 and index % self._every == self._every - 1

    def _submit(self, client: httpx.Client, key: str, by_reference: bool) -> None:
        if by_reference:
            with self._lock:
                self.by_reference.add(key)
        try:
            self._retry_until_accepted(client, key, by_reference)
        except Exception as e:  # a bug here must show in the report, not end a thread silently
            logger.exception("submit %s failed", key)
            with self._lock:
                self.given_up[key] = f"harness error {type(e).__name__}"

    def _retry_until_accepted(self, client: httpx.Client, key: str, by_reference: bool) -> None:
        deadline = time.monotonic() + self._deadline
        failures = 0
        while True:
            request, job_id, retry_after = self._post(client, key, by_reference)
            if job_id is not None:
                with self._lock:
                    self.accepted[key] = job_id
                return
            failures += 1
            outcome = f"{request.status or 'no answer'} {request.code or ''}".strip()
            if retry_after is None:  # a final answer: a client error for a valid image
                logger.error("submit %s: %s; not retried", key, outcome, extra={"action": "submit_refused"})
            if retry_after is None or time.monotonic() + retry_after > deadline:
                with self._lock:
                    self.given_up[key] = outcome
                return
            if self._stop.wait(retry_after * self._rng.uniform(0.8, 1.2)):
                return

    def _post(self, client: httpx.Client, key: str, by_reference: bool) -> tuple[Request, str | None, float | None]:
        """One request: (its record, the job id when accepted, the seconds to wait before a retry or None)."""
        with self._lock:
            self._in_flight += 1
        started = time.monotonic()
        try:
            if by_reference:
                body = {"image_url": self._reference, "bands": self._bands}
                response = client.post(self._url, json=body, headers={"Idempotency-Key": key})
            else:
                headers = {"Content-Type": "image/tiff", "Idempotency-Key": key}
                response = client.post(self._url, params={"bands": self._bands}, content=self._image, headers=headers)
        except httpx.TransportError as e:
            request = self._record(key, started, None, type(e).__name__)
            return request, None, 1.0
        finally:
            with self._lock:
                self._in_flight -= 1
        code = _problem_code(response)
        request = self._record(key, started, response.status_code, code)
        if response.status_code in ACCEPTED:
            return request, str(response.json()["job_id"]), None
        if response.status_code >= 500:
            return request, None, min(float(response.headers.get("Retry-After", "2")), 10.0)
        return request, None, None

    def _record(self, key: str, started: float, status: int | None, code: str | None) -> Request:
        now = time.monotonic()
        request = Request(key, round(started - self._started, 3), now - started, status, code)
        with self._lock:
            self.requests.append(request)
        return request


def _problem_code(response: httpx.Response) -> str | None:
    if response.status_code in ACCEPTED:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return str(body.get("code")) if isinstance(body, dict) and body.get("code") else None
