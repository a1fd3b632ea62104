"""The settlement decision for a job being cancelled (the rest of the table: tests/unit/test_settlement.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gpu_worker.settlement import Action, AttemptLost, Cancelled, Decision, Interrupted, RetryPolicy, TimedOut, decide
from shared.errors import DatabaseUnavailable, InvalidImage

POLICY = RetryPolicy(max_attempts=3, backoff=timedelta(seconds=10), backoff_max=timedelta(minutes=5))


@pytest.mark.parametrize("attempt", [1, 3])
def test_cancelled_stops_the_attempt_and_completes_the_message(attempt: int) -> None:
    decision = decide(Cancelled("cancellation requested"), attempt, POLICY)
    assert decision == Decision(Action.COMPLETE, "Cancelled", "Cancelled: cancellation requested", stop=True)


@pytest.mark.parametrize(
    "error",
    [DatabaseUnavailable("db down"), InvalidImage("bad"), Interrupted("grace over"), ValueError("a bug"), None],
    ids=["transient", "permanent", "shutdown", "unexpected", "returned"],
)
def test_once_a_cancel_was_seen_any_failure_stops_instead_of_retrying_or_failing(error: Exception | None) -> None:
    decision = decide(error, 3, POLICY, cancelling=True)
    if error is None:  # it succeeded before the cancel could stop it (succeed is refused then: never here)
        assert decision == Decision(Action.COMPLETE)
    else:
        assert (decision.action, decision.stop, decision.fail_code, decision.reason) == (
            Action.COMPLETE, True, None, "Cancelled",
        )  # fmt: skip


def test_a_time_limit_still_fails_a_job_being_cancelled() -> None:
    decision = decide(TimedOut("past 1 h"), 1, POLICY, cancelling=True)
    assert (decision.action, decision.fail_code, decision.stop) == (Action.DEAD_LETTER, "timed_out", False)


def test_a_lost_attempt_stops_nothing_even_when_a_cancel_was_seen() -> None:
    assert decide(AttemptLost("taken over"), 1, POLICY, cancelling=True) == Decision(Action.COMPLETE, "AttemptLost")
