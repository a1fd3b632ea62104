"""The lifecycle table, every state x every event, written out independently of shared/lifecycle.py."""

from __future__ import annotations

import pytest

from shared.jobs import JobStatus
from shared.lifecycle import TRANSITIONS, Event, statement, target

COLUMNS = "job_id, status, attempts, callback_url, callback_events, error_code, error_message, progress"

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

# event -> {source status: target status}; every pair not listed is refused.
ALLOWED: dict[Event, dict[JobStatus, JobStatus]] = {
    Event.CONFIRM_SENT: {Q: Q},
    Event.ABORT_SUBMIT: {Q: F},
    Event.RESUBMIT: {F: Q},
    Event.CLAIM: {Q: R, R: R},
    Event.RENEW_LEASE: {R: R},
    Event.SUCCEED: {R: S},
    Event.FAIL: {R: F},
    Event.RELEASE: {R: Q},
    Event.CANCEL: {Q: C},
    Event.RESEND: {Q: Q},
    Event.EXPIRE: {R: Q},
    Event.EXHAUST: {Q: F, R: F},
    Event.REDRIVE: {Q: Q},
    Event.DEAD_LETTERED: {Q: F},
    Event.REQUEST_CANCEL: {R: R},
    Event.STOP: {R: C},
    Event.CANCEL_EXPIRED: {R: C},
    Event.RETRY: {F: Q, C: Q},
    Event.PROGRESS: {R: R},
}


@pytest.mark.parametrize("status", list(JobStatus), ids=str)
@pytest.mark.parametrize("event", list(Event), ids=str)
def test_every_state_and_event(event: Event, status: JobStatus) -> None:
    assert target(status, event) is ALLOWED[event].get(status)


def test_every_event_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(Event) == set(ALLOWED)


def test_succeeded_is_final() -> None:
    assert all(target(S, event) is None for event in Event)


def test_only_a_resubmit_or_a_retry_leaves_failed_or_cancelled() -> None:
    assert [e for e in Event if target(F, e) is not None] == [Event.RESUBMIT, Event.RETRY]
    assert [e for e in Event if target(C, e) is not None] == [Event.RETRY]


@pytest.mark.parametrize("event", list(Event), ids=str)
def test_each_event_is_one_conditional_update_on_its_source_states(event: Event) -> None:
    sql = statement(event, COLUMNS)
    assert sql.startswith("WITH moved AS (UPDATE jobs SET status = ")
    assert f" RETURNING {COLUMNS})" in sql
    results = "stored" if event is Event.SUCCEED else "results"  # a succeed's result: its own INSERT's row
    assert sql.endswith(f" SELECT moved.*, r.result FROM moved LEFT JOIN {results} r USING (job_id)")
    assert sql.count("UPDATE jobs") == 1
    assert "WHERE job_id = %(job_id)s AND status IN (" in sql
    for status in JobStatus:
        assert (f"'{status.value}'" in sql.split("WHERE", 1)[1].split(") AND (", 1)[0]) == (
            status in TRANSITIONS[event].sources
        )
    assert f"status = '{TRANSITIONS[event].target.value}'" in sql


@pytest.mark.parametrize(
    "event", [Event.RENEW_LEASE, Event.SUCCEED, Event.FAIL, Event.RELEASE, Event.PROGRESS, Event.STOP], ids=str
)
def test_attempt_writes_are_fenced(event: Event) -> None:
    assert "attempts = %(attempt)s" in TRANSITIONS[event].guard


@pytest.mark.parametrize(
    "event", [Event.RESUBMIT, Event.RELEASE, Event.RESEND, Event.EXPIRE, Event.REDRIVE, Event.RETRY], ids=str
)
def test_every_deliberate_hand_over_is_a_new_generation(event: Event) -> None:
    assert "generation = generation + 1, sent_at = NULL" in TRANSITIONS[event].assign


def test_a_drain_is_not_charged_and_every_attempt_limit_counts_the_same_way() -> None:
    assert "drains = drains + %(drain)s" in TRANSITIONS[Event.RELEASE].assign
    for event in (Event.CLAIM, Event.EXPIRE, Event.EXHAUST):
        assert "attempts - drains - forgiven" in TRANSITIONS[event].guard


# event -> the webhook event type it emits (every other event emits none)
NOTIFIES = {
    Event.CLAIM: "job.started",
    Event.PROGRESS: "job.progress",
    Event.SUCCEED: "job.succeeded",
    Event.FAIL: "job.failed",
    Event.EXHAUST: "job.failed",
    Event.DEAD_LETTERED: "job.failed",
    Event.CANCEL: "job.cancelled",
    Event.STOP: "job.cancelled",
    Event.CANCEL_EXPIRED: "job.cancelled",
}


@pytest.mark.parametrize("event", list(Event), ids=str)
def test_notifications_are_written_by_the_statement_of_their_event(event: Event) -> None:
    sql = statement(event, COLUMNS)
    if event in NOTIFIES:
        assert f"INSERT INTO job_events (job_id, type, payload) SELECT job_id, '{NOTIFIES[event]}'" in sql
        assert ("%(notify)s" in sql) == (event is Event.PROGRESS)
    else:
        assert "job_events" not in sql


def test_a_cancelling_job_is_never_requeued_nor_succeeded() -> None:
    for event in (Event.CLAIM, Event.SUCCEED, Event.RELEASE, Event.EXPIRE, Event.EXHAUST):
        assert "cancel_requested_at IS NULL" in TRANSITIONS[event].guard


def test_terminal_flags() -> None:
    assert {s for s in JobStatus if s.terminal} == {S, F, C}
