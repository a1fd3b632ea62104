"""The settlement decision table: every outcome x first / middle / last delivery."""

from __future__ import annotations

import pytest
from azure.servicebus.exceptions import ServiceBusServerBusyError

from gpu_worker.settlement import DESCRIPTION_LIMIT, Action, Decision, Interrupted, decide
from shared.errors import (
    BusUnavailable,
    DatabaseUnavailable,
    InputMissing,
    InvalidImage,
    InvalidMessage,
    StorageUnavailable,
    UnknownAnalysis,
)

MAX = 5
PERMANENT = [
    InvalidMessage("bad envelope"),
    InvalidImage("not a TIFF"),
    InputMissing("blob gone"),
    UnknownAnalysis("model:nope"),
]
TRANSIENT = [
    DatabaseUnavailable("db down"),
    StorageUnavailable("storage throttled"),
    BusUnavailable("bus down"),
    ServiceBusServerBusyError(message="server busy"),
]
DELIVERIES = [0, 2, MAX - 1]  # the SDK's delivery_count: earlier failed deliveries; MAX - 1 is the last allowed


@pytest.mark.parametrize("delivery_count", [*DELIVERIES, None])
def test_success_completes(delivery_count: int | None) -> None:
    assert decide(None, delivery_count, MAX) == Decision(Action.COMPLETE)


@pytest.mark.parametrize("delivery_count", DELIVERIES)
@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent_errors_dead_letter_at_once_and_fail_the_job(error: Exception, delivery_count: int) -> None:
    decision = decide(error, delivery_count, MAX)
    assert decision.action is Action.DEAD_LETTER
    assert decision.reason == type(error).__name__
    assert decision.description == str(error)
    assert decision.fail_code == getattr(error, "code", None)
    assert not decision.unexpected


@pytest.mark.parametrize("delivery_count", [0, 1, MAX - 2, None])
@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_abandon_before_the_last_delivery(error: Exception, delivery_count: int | None) -> None:
    decision = decide(error, delivery_count, MAX)
    assert decision.action is Action.ABANDON
    assert decision.reason == type(error).__name__
    assert decision.fail_code is None
    assert not decision.unexpected


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_error_on_the_last_delivery_fails_the_job_and_dead_letters(error: Exception) -> None:
    decision = decide(error, MAX - 1, MAX)
    assert decision.action is Action.DEAD_LETTER
    assert decision.reason == "RetriesExhausted"
    assert decision.fail_code == "retries_exhausted"
    assert decision.description is not None
    assert f"all {MAX} deliveries" in decision.description


@pytest.mark.parametrize(
    ("delivery_count", "action"),
    [(0, Action.ABANDON), (MAX - 2, Action.ABANDON), (MAX - 1, Action.DEAD_LETTER)],
)
def test_unexpected_exception_is_transient_but_flagged(delivery_count: int, action: Action) -> None:
    decision = decide(ZeroDivisionError("bug"), delivery_count, MAX)
    assert decision.action is action
    assert decision.unexpected
    assert decision.description is not None
    assert "ZeroDivisionError: bug" in decision.description


@pytest.mark.parametrize("delivery_count", DELIVERIES)
@pytest.mark.parametrize(
    "error", [Interrupted("grace over"), KeyboardInterrupt(), SystemExit(1)], ids=lambda e: type(e).__name__
)
def test_shutdown_abandons_even_on_the_last_delivery(error: BaseException, delivery_count: int) -> None:
    decision = decide(error, delivery_count, MAX)
    assert decision.action is Action.ABANDON
    assert decision.reason == "Shutdown"
    assert decision.fail_code is None


@pytest.mark.parametrize(
    ("error", "fail_code"),
    [(None, None), (InvalidImage("x"), "invalid_image"), (DatabaseUnavailable("x"), None)],
    ids=["success", "permanent", "transient"],
)
def test_lock_lost_never_settles_but_still_fails_permanent_jobs(error: Exception | None, fail_code: str | None) -> None:
    decision = decide(error, 0, MAX, lock_lost=True)
    assert decision.action is Action.LEAVE
    assert decision.fail_code == fail_code


def test_lock_lost_on_the_last_delivery_still_fails_the_job() -> None:
    decision = decide(DatabaseUnavailable("x"), MAX - 1, MAX, lock_lost=True)
    assert (decision.action, decision.fail_code) == (Action.LEAVE, "retries_exhausted")


def test_max_delivery_count_of_one_makes_the_first_delivery_the_last() -> None:
    assert decide(StorageUnavailable("x"), 0, 1).action is Action.DEAD_LETTER


def test_descriptions_are_bounded() -> None:
    for error in (InvalidImage("x" * 10_000), DatabaseUnavailable("y" * 10_000)):
        description = decide(error, MAX - 1, MAX).description
        assert description is not None
        assert len(description) <= DESCRIPTION_LIMIT
