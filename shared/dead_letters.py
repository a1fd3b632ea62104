"""The dead letters the reconciler drained (the ``dead_letters`` table), and the bulk retry of the jobs they failed.

``GET /api/dead-letters`` reads the table, newest first, with each job's status now. ``POST
/api/dead-letters/replay`` retries, through :func:`shared.control.retry` (the same rules and hand-over as ``POST
/api/jobs/{id}/retry``), each job a dead letter failed (``action = failed``) that is still failed *by that dead
letter*: same generation (a retry starts a new one). Any other job is skipped: it was retried since, cancelled, or
failed again for a reason of its own; a job whose retry loses a race is skipped too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.control import Contended, retry
from shared.jobs import DeadLetterFilter, JobStatus, JobStore, RecordedDeadLetter
from shared.rejection import Rejected
from shared.submission import Publisher

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
MAX_BODY_BYTES = 4096  # a replay's body is {"reason", "limit"}: far less


class DeadLetterQuery(BaseModel):
    """``GET /api/dead-letters``'s query."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    reason: str | None = None
    action: Literal["redrive", "failed", "none"] | None = None


class ReplayRequest(BaseModel):
    """``POST /api/dead-letters/replay``'s JSON body (or query): which dead letters' jobs to retry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str | None = Field(None, description="only dead letters with this reason (e.g. TTLExpiredException)")
    limit: int = Field(100, ge=1, le=MAX_LIMIT, description="dead letters to look at, newest first")


class DeadLetterPage(BaseModel):
    """The body of ``GET /api/dead-letters``: newest first."""

    dead_letters: list[RecordedDeadLetter]


class ReplayResult(BaseModel):
    """The body of ``POST /api/dead-letters/replay``."""

    replayed: list[UUID] = Field(description="the jobs queued again (a new generation each)")
    skipped: int = Field(description="dead letters whose job was not retried (no longer failed by it, or raced)")


def query(params: Mapping[str, str]) -> DeadLetterQuery:
    """The query of ``GET /api/dead-letters`` (other parameters, such as the function key's ``code``, are not
    its), or ``invalid_filter`` naming the parameter."""
    return _validated(DeadLetterQuery, _known(DeadLetterQuery, params))


def replay_request(params: Mapping[str, str], body: bytes) -> ReplayRequest:
    """A replay's parameters: the JSON body's members over the query's, or ``invalid_filter`` (a body that is not
    JSON, nests too deep to parse, or is over :data:`MAX_BODY_BYTES`)."""
    values: dict[str, object] = _known(ReplayRequest, params)
    if len(body) > MAX_BODY_BYTES:
        raise Rejected("invalid_filter", f"the body is over {MAX_BODY_BYTES} bytes")
    if body.strip():
        try:
            members = json.loads(body)
        except ValueError as e:
            raise Rejected("invalid_filter", f"the body is not JSON: {e}") from e
        except RecursionError as e:  # nested deeper than the parser's recursion limit
            raise Rejected("invalid_filter", "the body nests too deep") from e
        if not isinstance(members, dict):
            raise Rejected("invalid_filter", 'the body must be a JSON object such as {"reason": "...", "limit": 100}')
        values.update(members)
    return _validated(ReplayRequest, values)


def dead_letters(jobs: JobStore, where: DeadLetterQuery) -> DeadLetterPage:
    letters = jobs.dead_letter_log(DeadLetterFilter(reason=where.reason, action=where.action), where.limit)
    return DeadLetterPage(dead_letters=letters)


def replay(request: ReplayRequest, *, jobs: JobStore, publisher: Publisher) -> ReplayResult:
    where = DeadLetterFilter(reason=request.reason, action="failed", job_status=JobStatus.FAILED)
    replayed: list[UUID] = []
    skipped = 0
    for letter in jobs.dead_letter_log(where, request.limit):
        if letter.job_id is None or not _still_failed_by(jobs, letter):
            skipped += 1
            continue
        try:
            retry(letter.job_id, jobs=jobs, publisher=publisher)
        except (Rejected, Contended):  # it moved in between
            skipped += 1
            continue
        replayed.append(letter.job_id)
    extra = {"action": "replay_dead_letters", "replayed": len(replayed), "skipped": skipped}
    log.info("dead letters replayed: %d jobs queued again, %d skipped", len(replayed), skipped, extra=extra)
    return ReplayResult(replayed=replayed, skipped=skipped)


def _still_failed_by(jobs: JobStore, letter: RecordedDeadLetter) -> bool:
    job = jobs.get(letter.job_id) if letter.job_id else None
    return job is not None and job.status is JobStatus.FAILED and job.generation == letter.generation


Model = TypeVar("Model", DeadLetterQuery, ReplayRequest)


def _known(model: type[BaseModel], params: Mapping[str, str]) -> dict[str, object]:
    return {name: params[name] for name in model.model_fields if name in params}


def _validated(model: type[Model], values: dict[str, object]) -> Model:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(map(str, first["loc"])) or "body"
        raise Rejected("invalid_filter", f"{name}: {first['msg']}") from e
