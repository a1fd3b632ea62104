"""The settlement decision table: every outcome x claimed (first, middle, last attempt) or not claimed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from azure.servicebus.exceptions import ServiceBusServerBusyError

from gpu_worker.settlement import (
    DESCRIPTION_LIMIT,
    Action,
    AttemptLost,
    Decision,
    Interrupted,
    RetryPolicy,
    TimedOut,
    decide,
)
from shared.errors import (
    BusUnavailable,
    DatabaseUnavailable,
    GeometryOutsideScene,
    InputMissing,
    InvalidImage,
    InvalidMessage,
    PermanentError,
    StorageUnavailable,
    UnknownAnalysis,
)
from shared.inputs import InputChanged, InputNotAllowed, InputRefused

MAX = 5
POLICY = RetryPolicy(max_attempts=MAX, backoff=timedelta(seconds=10), backoff_max=timedelta(minutes=5))
CLAIMED = [1, 3, MAX]  # the claimed attempt's number: first, middle, last
ANY_ATTEMPT = [None, *CLAIMED]  # None: the message claimed nothing (undecodable, not claimable, claim failed)
PERMANENT = [
    InvalidMessage("bad envelope"),
    InvalidImage("not a TIFF"),
    InputMissing("blob gone"),
    InputChanged("the blob's ETag changed"),
    InputRefused("the host answered 403"),
    InputNotAllowed("the host left IMAGE_URL_ALLOWED_HOSTS"),
    GeometryOutsideScene("no field intersects the image"),
    UnknownAnalysis("model:nope"),
]
RETRYABLE = [
    DatabaseUnavailable("db down"),
    StorageUnavailable("storage throttled"),
    BusUnavailable("bus down"),
    ServiceBusServerBusyError(message="server busy"),
    ValueError("a bug"),
    SystemExit(1),  # a library calling sys.exit(): a bug, charged like one (then re-raised by the consumer)
    KeyboardInterrupt(),
]
SHUTDOWN = [Interrupted("grace over")]


def name(value: object) -> str:
    return type(value).__name__


def test_every_permanent_error_of_the_hierarchy_is_in_the_table() -> None:
    hierarchy = {cls for cls in PermanentError.__subclasses__() if cls.__module__.startswith("shared.")}
    assert {type(e) for e in PERMANENT} == hierarchy


@pytest.mark.parametrize("attempt", ANY_ATTEMPT)
def test_success_completes(attempt: int | None) -> None:
    assert decide(None, attempt, POLICY) == Decision(Action.COMPLETE)


@pytest.mark.parametrize("attempt", ANY_ATTEMPT)
def test_a_lost_attempt_completes_and_touches_nothing(attempt: int | None) -> None:
    decision = decide(AttemptLost("taken over"), attempt, POLICY)
    assert decision == Decision(Action.COMPLETE, "AttemptLost")


@pytest.mark.parametrize("attempt", ANY_ATTEMPT)
def test_timed_out_dead_letters_and_fails_the_job(attempt: int | None) -> None:
    decision = decide(TimedOut("ran past 3600 s"), attempt, POLICY)
    assert decision.action is Action.DEAD_LETTER
    assert (decision.reason, decision.fail_code) == ("TimedOut", "timed_out")
    assert decision.description == "TimedOut: ran past 3600 s"
    assert decision.delay is None


@pytest.mark.parametrize("attempt", CLAIMED)
@pytest.mark.parametrize("error", SHUTDOWN, ids=name)
def test_shutdown_of_a_claimed_attempt_retries_at_once_even_on_the_last_attempt(
    error: BaseException, attempt: int
) -> None:
    decision = decide(error, attempt, POLICY)
    assert decision.action is Action.RETRY
    assert (decision.reason, decision.delay, decision.fail_code) == ("Shutdown", timedelta(0), None)
    assert not decision.unexpected


@pytest.mark.parametrize("error", SHUTDOWN, ids=name)
def test_shutdown_before_a_claim_abandons(error: BaseException) -> None:
    decision = decide(error, None, POLICY)
    assert decision.action is Action.ABANDON
    assert (decision.reason, decision.fail_code, decision.delay) == ("Shutdown", None, None)


@pytest.mark.parametrize("attempt", CLAIMED)
@pytest.mark.parametrize("error", PERMANENT, ids=name)
def test_permanent_errors_of_a_claimed_attempt_dead_letter_at_once_and_fail_the_job(
    error: PermanentError, attempt: int
) -> None:
    decision = decide(error, attempt, POLICY)
    assert decision == Decision(Action.DEAD_LETTER, name(error), error.message, fail_code=error.code)


@pytest.mark.parametrize("error", PERMANENT, ids=name)
def test_permanent_errors_without_a_claim_dead_letter_and_leave_the_job_to_the_reconciler(
    error: PermanentError,
) -> None:
    assert decide(error, None, POLICY) == Decision(Action.DEAD_LETTER, name(error), error.message)


@pytest.mark.parametrize("attempt", [1, 2, MAX - 1])
@pytest.mark.parametrize("error", RETRYABLE, ids=name)
def test_transient_errors_and_bugs_before_the_last_attempt_retry_after_the_backoff(
    error: Exception, attempt: int
) -> None:
    decision = decide(error, attempt, POLICY)
    assert decision.action is Action.RETRY
    assert decision.reason == name(error)
    assert decision.delay == POLICY.delay(attempt) == timedelta(seconds=10 * 2 ** (attempt - 1))
    assert decision.fail_code is None
    assert decision.unexpected is isinstance(error, ValueError | SystemExit | KeyboardInterrupt)


@pytest.mark.parametrize("attempt", [MAX, MAX + 1])  # MAX + 1: JOB_MAX_ATTEMPTS lowered meanwhile
@pytest.mark.parametrize("error", RETRYABLE, ids=name)
def test_transient_errors_and_bugs_on_the_last_attempt_dead_letter_and_fail_the_job(
    error: Exception, attempt: int
) -> None:
    decision = decide(error, attempt, POLICY)
    assert decision.action is Action.DEAD_LETTER
    assert (decision.reason, decision.fail_code, decision.delay) == ("RetriesExhausted", "retries_exhausted", None)
    assert decision.description is not None
    assert decision.description.startswith(f"failed on all {MAX} attempts; last error: ")
    assert decision.unexpected is isinstance(error, ValueError | SystemExit | KeyboardInterrupt)


@pytest.mark.parametrize("error", RETRYABLE, ids=name)
def test_transient_errors_and_bugs_without_a_claim_abandon(error: Exception) -> None:
    decision = decide(error, None, POLICY)
    assert decision.action is Action.ABANDON
    assert (decision.reason, decision.fail_code, decision.delay) == (name(error), None, None)
    assert decision.unexpected is isinstance(error, ValueError | SystemExit | KeyboardInterrupt)


def test_a_bugs_description_names_its_class() -> None:
    assert decide(ValueError("bad band"), 1, POLICY).description == "ValueError: bad band"
    assert decide(DatabaseUnavailable("db down"), 1, POLICY).description == "db down"


def test_a_single_attempt_policy_makes_the_first_attempt_the_last() -> None:
    policy = RetryPolicy(max_attempts=1, backoff=timedelta(seconds=1), backoff_max=timedelta(seconds=1))
    assert decide(StorageUnavailable("x"), 1, policy).action is Action.DEAD_LETTER


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(0, 10), (1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (7, 300), (20, 300)],
)
def test_the_backoff_doubles_per_attempt_up_to_its_cap(attempt: int, seconds: int) -> None:
    assert POLICY.delay(attempt) == timedelta(seconds=seconds)


def test_the_backoff_cap_holds_for_any_attempt() -> None:
    """backoff * 2 ** (attempt - 1) overflowed timedelta from attempt 44 (10 s backoff) before the cap applied."""
    policy = RetryPolicy(max_attempts=100, backoff=timedelta(seconds=10), backoff_max=timedelta(minutes=5))
    assert policy.delay(44) == timedelta(minutes=5)
    assert policy.delay(10**6) == timedelta(minutes=5)
    assert decide(DatabaseUnavailable("x"), 50, policy).delay == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("error", "attempt"),
    [(InvalidImage("x" * 10_000), 1), (ValueError("y" * 10_000), 1), (DatabaseUnavailable("z" * 10_000), MAX),
     (TimedOut("t" * 10_000), 1), (Interrupted("i" * 10_000), 1)],
    ids=["permanent", "bug-retry", "retries-exhausted", "timed-out", "shutdown"],
)  # fmt: skip
def test_descriptions_are_truncated(error: BaseException, attempt: int) -> None:
    description = decide(error, attempt, POLICY).description
    assert description is not None
    assert len(description) == DESCRIPTION_LIMIT


@pytest.mark.parametrize("attempt", [1, 5, 50])
def test_an_outage_the_probes_confirm_is_retried_uncharged_even_on_the_last_attempt(attempt: int) -> None:
    decision = decide(StorageUnavailable("connection refused"), attempt, POLICY, outage=True)
    assert (decision.action, decision.drain, decision.fail_code) == (Action.RETRY, True, None)
    assert decision.delay == POLICY.delay(attempt)
