"""The lifecycle table, every state x every event, written out independently of shared/lifecycle.py."""

from __future__ import annotations

import pytest

from shared.jobs import JobStatus
from shared.lifecycle import TRANSITIONS, Event, statement, target

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
    Event.CANCEL: {Q: C, R: C},
    Event.RESEND: {Q: Q},
    Event.EXPIRE: {R: Q},
    Event.EXHAUST: {Q: F, R: F},
    Event.REDRIVE: {Q: Q},
    Event.DEAD_LETTERED: {Q: F},
}


@pytest.mark.parametrize("status", list(JobStatus), ids=str)
@pytest.mark.parametrize("event", list(Event), ids=str)
def test_every_state_and_event(event: Event, status: JobStatus) -> None:
    assert target(status, event) is ALLOWED[event].get(status)


def test_every_event_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(Event) == set(ALLOWED)


@pytest.mark.parametrize("status", [S, C], ids=str)
def test_succeeded_and_cancelled_are_final(status: JobStatus) -> None:
    assert all(target(status, event) is None for event in Event)


def test_only_resubmit_leaves_failed() -> None:
    assert [e for e in Event if target(F, e) is not None] == [Event.RESUBMIT]


@pytest.mark.parametrize("event", list(Event), ids=str)
def test_each_event_is_one_conditional_update_on_its_source_states(event: Event) -> None:
    sql = statement(event)
    assert sql.startswith("UPDATE jobs SET status = ")
    assert sql.count("UPDATE") == 1
    assert "WHERE job_id = %(job_id)s AND status IN (" in sql
    for status in JobStatus:
        assert (f"'{status.value}'" in sql.split("WHERE", 1)[1].split(") AND (", 1)[0]) == (
            status in TRANSITIONS[event].sources
        )
    assert f"status = '{TRANSITIONS[event].target.value}'" in sql


@pytest.mark.parametrize("event", [Event.RENEW_LEASE, Event.SUCCEED, Event.FAIL, Event.RELEASE], ids=str)
def test_attempt_writes_are_fenced(event: Event) -> None:
    assert "attempts = %(attempt)s" in TRANSITIONS[event].guard


@pytest.mark.parametrize("event", [Event.RESUBMIT, Event.RELEASE, Event.RESEND, Event.EXPIRE, Event.REDRIVE], ids=str)
def test_every_deliberate_hand_over_is_a_new_generation(event: Event) -> None:
    assert "generation = generation + 1, sent_at = NULL" in TRANSITIONS[event].assign


def test_a_drain_is_not_charged_and_every_attempt_limit_counts_the_same_way() -> None:
    assert "drains = drains + %(drain)s" in TRANSITIONS[Event.RELEASE].assign
    for event in (Event.CLAIM, Event.EXPIRE, Event.EXHAUST):
        assert "attempts - drains" in TRANSITIONS[event].guard


def test_terminal_flags() -> None:
    assert {s for s in JobStatus if s.terminal} == {S, F, C}
