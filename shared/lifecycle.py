"""The job's lifecycle: its states, the events that move it, and the one conditional UPDATE of each event.

This module owns every status change. An event is allowed from a set of states and, within them, only when its
guard holds (the attempt still holds the job, the message is of the current generation, the lease ran out...). Each
event is one ``UPDATE jobs ... WHERE job_id = %(job_id)s AND status IN (...) AND <guard>``: of two concurrent
callers exactly one moves the job, and a caller whose view of the job is stale moves nothing. The submit path, the
worker, the reconciler and the API call :class:`shared.jobs.JobStore`'s methods, which run these statements; none of
them writes status SQL of its own.

Two numbers fence the actors:

* ``generation`` counts deliberate hand-overs to the bus. The message of generation *g* has the message id
  ``{job_id}:{g}``, so a retry of the same send is dropped by duplicate detection, while a deliberate re-send (a new
  generation) never is. A message of any generation may claim a queued job (a message is a wake-up; the row decides).
* ``attempts`` counts claims. A worker holds attempt *a* while its lease lasts (renewed as it runs); its progress,
  result and failure writes name *a* and are refused once another claim took the job over. Outputs go under
  ``results/{job_id}/{a}/``, so a losing run never overwrites the winner's files. ``JOB_MAX_ATTEMPTS`` bounds the
  attempts *charged* to the job: ``attempts - drains``, where a drain (a release on SIGTERM or a Spot eviction) is
  not the job's fault. A crash (the lease runs out) is charged: it may be the job that crashes the worker.

::

        create ──► queued ◄──────────────────────────────┐ resend, redrive (new generation)
                    │  │ ▲                                │ confirm_sent (same state)
        claim ──────┘  │ └── release, expire ── running ◄─┘ claim (lease expired), renew_lease, progress,
                       │     (new generation)     │          request_cancel (same state)
                       ├── abort_submit, dead_lettered, exhaust ──► failed ◄── fail, exhaust
                       ├── cancel ──► cancelled ◄── stop, cancel_expired (a running job being cancelled)
                       └────────────────────── succeeded ◄── succeed
        failed (enqueue_failed) ── resubmit ──► queued
        failed (other codes), cancelled ── retry (new generation, past attempts forgiven) ──► queued

Cancelling a running job is two steps: ``request_cancel`` marks it (``cancel_requested_at``); from then on it can
neither succeed, be released, nor be claimed again, and its attempt ``stop``-s at its next checkpoint (or the
reconciler's ``cancel_expired`` ends it once its lease runs out). The events that notify (``Transition.notifies``)
write the webhook outbox row in the same statement (:func:`statement`).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from shared.jobs import JobStatus

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Event(enum.StrEnum):
    CONFIRM_SENT = "confirm_sent"
    ABORT_SUBMIT = "abort_submit"
    RESUBMIT = "resubmit"
    CLAIM = "claim"
    RENEW_LEASE = "renew_lease"
    SUCCEED = "succeed"
    FAIL = "fail"
    RELEASE = "release"
    CANCEL = "cancel"
    RESEND = "resend"
    EXPIRE = "expire"
    EXHAUST = "exhaust"
    REDRIVE = "redrive"
    DEAD_LETTERED = "dead_lettered"
    REQUEST_CANCEL = "request_cancel"
    STOP = "stop"
    CANCEL_EXPIRED = "cancel_expired"
    RETRY = "retry"
    PROGRESS = "progress"


class Notice(enum.StrEnum):
    """The groups of webhook events a job's ``callback_events`` selects (default: ``completed`` only)."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Transition:
    sources: frozenset[JobStatus]
    target: JobStatus
    actor: str  # who may cause it
    guard: str  # SQL, beyond the source states
    assign: str  # SQL SET list, beyond status and updated_at
    meaning: str
    notifies: tuple[str, Notice] | None = None  # the webhook event type (and its group) the event emits


_ATTEMPT = "attempts = %(attempt)s"
# Attempts that count against JOB_MAX_ATTEMPTS: a drain is not the job's fault; a manual retry forgives the past.
_CHARGED = "attempts - drains - forgiven"
_NOT_CANCELLING = "cancel_requested_at IS NULL"
_NEW_GENERATION = "generation = generation + 1, sent_at = NULL"
_FINISHED = "lease_until = NULL, finished_at = now()"
_ERROR = "error_code = %(code)s, error_message = %(message)s"

TRANSITIONS: dict[Event, Transition] = {
    Event.CONFIRM_SENT: Transition(
        frozenset({Q}), Q, "submit, worker, reconciler",
        "generation = %(generation)s AND sent_at IS NULL", "sent_at = now()",
        "the bus accepted the current generation's message",
    ),
    Event.ABORT_SUBMIT: Transition(
        frozenset({Q}), F, "submit, reconciler",
        "generation = %(generation)s AND sent_at IS NULL AND attempts = 0", f"{_ERROR}, finished_at = now()",
        "the image was never stored, so no message can have been sent: nobody can ever run the job",
    ),
    Event.RESUBMIT: Transition(
        frozenset({F}), Q, "submit (the same Idempotency-Key)",
        "error_code = 'enqueue_failed'",
        f"{_NEW_GENERATION}, error_code = NULL, error_message = NULL, finished_at = NULL",
        "the client sends the image again after an aborted submit",
    ),
    Event.CLAIM: Transition(
        frozenset({Q, R}), R, "worker (a delivered message)",
        f"(status = 'queued' OR lease_until < now()) AND {_CHARGED} < %(max_attempts)s AND {_NOT_CANCELLING}",
        "attempts = attempts + 1, worker_id = %(worker_id)s, lease_until = now() + %(lease)s, started_at = now(),"
        " first_started_at = coalesce(first_started_at, now()), sent_at = coalesce(sent_at, now()), progress = NULL",
        "a worker starts a new attempt: the job is queued, or the running attempt's lease ran out",
        ("job.started", Notice.STARTED),
    ),
    Event.RENEW_LEASE: Transition(
        frozenset({R}), R, "worker", _ATTEMPT, "lease_until = now() + %(lease)s",
        "the attempt is still running",
    ),
    Event.SUCCEED: Transition(
        frozenset({R}), S, "worker", f"{_ATTEMPT} AND {_NOT_CANCELLING}", _FINISHED,
        "the attempt stored its result (in the same statement); refused once a cancellation was requested",
        ("job.succeeded", Notice.COMPLETED),
    ),
    Event.FAIL: Transition(
        frozenset({R}), F, "worker", _ATTEMPT, f"{_FINISHED}, {_ERROR}",
        "the attempt failed for good: bad input, time limit, the last attempt's transient error",
        ("job.failed", Notice.COMPLETED),
    ),
    Event.RELEASE: Transition(
        frozenset({R}), Q, "worker", f"{_ATTEMPT} AND {_NOT_CANCELLING}",
        f"{_NEW_GENERATION}, lease_until = NULL, drains = drains + %(drain)s",
        "the attempt gives the job back (transient error; a drain, which is not charged) for a later attempt",
    ),
    Event.PROGRESS: Transition(
        frozenset({R}), R, "worker", _ATTEMPT, "progress = %(progress)s",
        "the attempt reports its stage and fraction (and learns whether a cancellation was requested)",
        ("job.progress", Notice.PROGRESS),  # only when %(notify)s: a new stage, not every fraction
    ),
    Event.CANCEL: Transition(
        frozenset({Q}), C, "API", "TRUE", _FINISHED,
        "a client cancels a job no attempt runs: its message finds it cancelled and is completed",
        ("job.cancelled", Notice.COMPLETED),
    ),
    Event.REQUEST_CANCEL: Transition(
        frozenset({R}), R, "API", _NOT_CANCELLING, "cancel_requested_at = now()",
        "a client cancels a running job: the attempt stops at its next checkpoint; no result of it is stored",
    ),
    Event.STOP: Transition(
        frozenset({R}), C, "worker", f"{_ATTEMPT} AND cancel_requested_at IS NOT NULL", _FINISHED,
        "the attempt saw the cancellation at a checkpoint and stopped",
        ("job.cancelled", Notice.COMPLETED),
    ),
    Event.CANCEL_EXPIRED: Transition(
        frozenset({R}), C, "reconciler", "cancel_requested_at IS NOT NULL AND lease_until < now()", _FINISHED,
        "the attempt of a job being cancelled vanished (its lease ran out) before it stopped",
        ("job.cancelled", Notice.COMPLETED),
    ),
    Event.RETRY: Transition(
        frozenset({F, C}), Q, "API (an operator, a client)",
        "error_code IS DISTINCT FROM 'enqueue_failed' AND (batch_id IS NULL"
        " OR EXISTS (SELECT 1 FROM batches b WHERE b.batch_id = jobs.batch_id AND b.sealed_at IS NOT NULL))",
        f"{_NEW_GENERATION}, forgiven = attempts - drains, retries = retries + 1, error_code = NULL,"
        " error_message = NULL, finished_at = NULL, cancel_requested_at = NULL, progress = NULL",
        "run a failed or cancelled job again: a new generation, its past attempts forgiven (an enqueue_failed job"
        " has no stored image: it is submitted again instead; nothing of a batch still uploading is sent)",
    ),
    Event.RESEND: Transition(
        frozenset({Q}), Q, "reconciler",
        "generation = %(generation)s AND sent_at IS NULL AND updated_at < now() - %(older_than)s", _NEW_GENERATION,
        "the send of a queued job was never confirmed (a submit died, a send was ambiguous): hand it over again",
    ),
    Event.EXPIRE: Transition(
        frozenset({R}), Q, "reconciler",
        f"lease_until < now() AND {_CHARGED} < %(max_attempts)s AND {_NOT_CANCELLING}",
        f"{_NEW_GENERATION}, lease_until = NULL",
        "the attempt's worker vanished (its lease ran out): queue the job again",
    ),
    Event.EXHAUST: Transition(
        frozenset({Q, R}), F, "reconciler",
        f"{_CHARGED} >= %(max_attempts)s AND (status = 'queued' OR (lease_until < now() AND {_NOT_CANCELLING}))",
        f"{_FINISHED}, error_code = 'retries_exhausted', error_message = %(message)s",
        "no attempt is left and none is running",
        ("job.failed", Notice.COMPLETED),
    ),
    Event.REDRIVE: Transition(
        frozenset({Q}), Q, "reconciler", "generation = %(generation)s", _NEW_GENERATION,
        "the broker dead-lettered the current message (MaxDeliveryCountExceeded) before any claim: send a new one",
    ),
    Event.DEAD_LETTERED: Transition(
        frozenset({Q}), F, "reconciler", "generation = %(generation)s", f"{_ERROR}, finished_at = now()",
        "the current message was dead-lettered before any claim and cannot run (expired, undecodable)",
        ("job.failed", Notice.COMPLETED),
    ),
}  # fmt: skip


def target(status: JobStatus, event: Event) -> JobStatus | None:
    """The state ``event`` moves a job in ``status`` to, or ``None`` when the state does not allow it."""
    transition = TRANSITIONS[event]
    return transition.target if status in transition.sources else None


@functools.cache  # built once per event: it runs on every move
def statement(event: Event, columns: str) -> str:
    """The one statement of ``event`` (named parameters; ``job_id`` always), returning the moved job's row as the
    statement left it (``columns`` of ``jobs``, then ``result``, which the statement appends), or no row when the job
    was not in a state (attempt, generation) that allows the event: one round trip for the move and the job's new
    state. ``columns`` must include ``job_id``, ``attempts``, ``status``, ``error_code``, ``error_message``,
    ``progress``, ``callback_url`` and ``callback_events``: the outbox row below reads them.

    Its effects happen together or not at all: the conditional UPDATE; for ``succeed``, the result row (naming the
    attempt); for an event that notifies, the webhook outbox row (``job_events``) when the job has a callback whose
    ``callback_events`` select the event's group (``progress`` only when ``%(notify)s``: a new stage)."""
    transition = TRANSITIONS[event]
    sources = ", ".join(f"'{s.value}'" for s in sorted(transition.sources))
    parts = [
        f"moved AS (UPDATE jobs SET status = '{transition.target.value}', {transition.assign}, updated_at = now()"
        f" WHERE job_id = %(job_id)s AND status IN ({sources}) AND ({transition.guard})"
        f" RETURNING {columns})"
    ]
    if event is Event.SUCCEED:
        # A row already there can only predate this attempt's move (the job was not succeeded): replace it.
        parts.append(
            "stored AS (INSERT INTO results (job_id, attempt, result) SELECT job_id, attempts, %(result)s FROM moved"
            " ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, result = EXCLUDED.result,"
            " created_at = now() RETURNING job_id, result)"
        )
    if transition.notifies is not None:
        kind, group = transition.notifies
        when = " AND %(notify)s" if event is Event.PROGRESS else ""
        parts.append(
            "notified AS (INSERT INTO job_events (job_id, type, payload)"
            f" SELECT job_id, '{kind}', jsonb_build_object('job_id', job_id, 'status', status, 'attempt', attempts,"
            " 'error_code', error_code, 'error_message', error_message, 'progress', progress) FROM moved"
            f" WHERE callback_url IS NOT NULL AND '{group.value}' = ANY(coalesce(callback_events, '{{completed}}'))"
            f"{when})"
        )
    # The main query sees the tables as they were before the statement: the result of a succeed comes from its own
    # INSERT; no other event touches the results table, so theirs is the one already there.
    results = "stored" if event is Event.SUCCEED else "results"
    return "WITH " + ", ".join(parts) + f" SELECT moved.*, r.result FROM moved LEFT JOIN {results} r USING (job_id)"
