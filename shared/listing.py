"""``GET /api/jobs``: the query (filters, page size, the keyset cursor) and the page it answers.

Pages are newest first, by ``(created_at, job_id)``; the cursor is the last row's key, so a page costs one index
range scan however deep it is, and rows inserted meanwhile never shift a page (keyset pagination, no ``OFFSET``).
The cursor is opaque to clients: urlsafe base64 (no padding) of the JSON ``[created_at ISO 8601, job_id]``.
A client passes the same filters with each ``next``; a cursor never widens them.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from shared.jobs import Job, JobFilter, JobStatus, JobStore
from shared.rejection import Rejected
from shared.status import JobPage, JobSummary

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ANALYSIS_LENGTH = 200
MAX_CURSOR_LENGTH = 200  # a cursor is about 110 characters
# "...T12:00:00 01:00": a "+" the client did not percent-encode arrives as a space; nothing else puts one there.
_UNENCODED_PLUS = re.compile(r"(?<=\d) (?=\d\d(:?\d\d)?$)")
_DIGITS = re.compile(r"[0-9]{1,4}")
_STATUSES = tuple(s.value for s in JobStatus)


@dataclass(frozen=True)
class ListQuery:
    where: JobFilter
    limit: int


def parse_query(params: Mapping[str, str]) -> ListQuery:
    """The query string of ``GET /api/jobs``; :class:`Rejected` ``invalid_filter`` (naming the parameter) or
    ``invalid_cursor``. Unknown parameters are ignored (``code``, the function key, is one)."""
    status = params.get("status")
    if status is not None and status not in _STATUSES:
        raise Rejected("invalid_filter", f"status must be one of {', '.join(_STATUSES)}, not {status[:32]!r}")
    analysis = params.get("analysis")
    if analysis is not None and not 0 < len(analysis) <= MAX_ANALYSIS_LENGTH:
        raise Rejected("invalid_filter", f"analysis must be 1 to {MAX_ANALYSIS_LENGTH} characters")
    cursor = params.get("next")
    where = JobFilter(
        status=JobStatus(status) if status is not None else None,
        analysis=analysis,
        created_after=_timestamp(params, "created_after"),
        created_before=_timestamp(params, "created_before"),
        batch_id=_batch_id(params.get("batch_id")),
        after=decode_cursor(cursor) if cursor is not None else None,
    )
    return ListQuery(where, _limit(params.get("limit")))


def list_jobs(jobs: JobStore, query: ListQuery) -> JobPage:
    """One page: one row more than asked says whether there is a next page."""
    found = jobs.find(query.where, query.limit + 1)
    page = found[: query.limit]
    following = encode_cursor(page[-1]) if len(found) > query.limit else None
    return JobPage(jobs=[JobSummary.of(job) for job in page], next=following)


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.job_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, UUID]:
    """The key a cursor carries; :class:`Rejected` ``invalid_cursor`` for anything this module did not write."""
    try:
        if len(text) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not (isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key)):
            raise ValueError("not [created_at, job_id]")
        created_at, job_id = datetime.fromisoformat(key[0]), UUID(key[1])
        if created_at.tzinfo is None:
            raise ValueError("no UTC offset")
    except ValueError as e:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise Rejected("invalid_cursor", "next is not a cursor this API returned; start again without it") from e
    return created_at, job_id


def _timestamp(params: Mapping[str, str], name: str) -> datetime | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(_UNENCODED_PLUS.sub("+", text.strip()))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise Rejected(
            "invalid_filter",
            f"{name} must be an ISO 8601 time with a UTC offset, such as 2025-01-31T12:00:00Z, not {text[:40]!r}",
        )
    return value


def _batch_id(text: str | None) -> UUID | None:
    if text is None:
        return None
    try:
        batch_id = UUID(text)
    except ValueError:
        batch_id = None
    if batch_id is None or str(batch_id) != text.lower():
        raise Rejected("invalid_filter", f"batch_id must be a UUID such as {UUID(int=0)}, not {text[:40]!r}")
    return batch_id


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    limit = int(text) if _DIGITS.fullmatch(text) else 0
    if not 1 <= limit <= MAX_LIMIT:
        raise Rejected("invalid_filter", f"limit must be an integer from 1 to {MAX_LIMIT}, not {text[:20]!r}")
    return limit
