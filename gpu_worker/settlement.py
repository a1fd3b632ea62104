"""The one settlement decision: what happens to the message and to the job once an attempt returned or raised.

A pure function of the outcome, whether the job was claimed (and which attempt), so the whole table is unit-tested
without a broker or a database:

======================================  ==========  ===========================================  ===================
outcome                                 claimed     message                                      job (fenced)
======================================  ==========  ===========================================  ===================
returned (succeeded, or nothing to do)  any         complete                                     (as left)
:class:`AttemptLost` (taken over)       yes         complete                                     (another owns it)
:class:`Cancelled` (cancel requested)   yes         complete                                     stop ``cancelled``
any error, once a cancel was seen       yes         complete                                     stop ``cancelled``
:class:`TimedOut` (time limit)          yes         dead-letter ``TimedOut``                     fail ``timed_out``
PermanentError (InvalidImage, ...)      yes         dead-letter, reason = class                  fail ``error.code``
PermanentError (InvalidMessage)         no          dead-letter, reason = class                  (the reconciler)
transient or unexpected                 attempt<max retry: release, schedule a new generation   release
                                                    after the backoff, complete this one
backend outage the probes confirm       any         retry as above                               release, uncharged
transient or unexpected                 attempt=max dead-letter ``RetriesExhausted``              fail
transient or unexpected                 no          abandon (the breaker stops receiving)       (unchanged)
shutdown (:class:`Interrupted`)        yes         retry with no delay                          release, uncharged
shutdown                                no          abandon                                      (unchanged)
SystemExit, KeyboardInterrupt (a bug)   any         as an unexpected error (charged), then re-raised
======================================  ==========  ===========================================  ===================

A cancellation requested while the attempt runs (``request_cancel``) is seen at the attempt's next checkpoint, which
raises :class:`Cancelled`; an attempt that fails or is interrupted after the request was seen is stopped too
(``cancelling``): the client asked for the job to end, so it is neither retried nor failed. A time limit still fails
the job.

A retry never waits on the delivery count: the message is completed and a copy of the next generation is scheduled
(``complete plus a scheduled copy``), so backoff costs time, not deliveries, and the attempt count
(``JOB_MAX_ATTEMPTS``) bounds the retries. When the lock was lost meanwhile, the job's side still happens and the
message is left to the broker (its redelivery finds the job moved on).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from azure.servicebus.exceptions import ServiceBusError

from shared.errors import CropAIError

RETRIES_EXHAUSTED = "RetriesExhausted"
RETRIES_EXHAUSTED_CODE = "retries_exhausted"
TIMED_OUT = "TimedOut"
TIMED_OUT_CODE = "timed_out"
CANCELLED = "Cancelled"
DESCRIPTION_LIMIT = 1024  # Service Bus keeps the description as a message property; stay well inside its limits


class Interrupted(BaseException):
    """Processing was cut short by a shutdown (second signal or grace period over). Not an ``Exception``, so that
    no ``except Exception`` in a library swallows it."""


class TimedOut(Interrupted):
    """The attempt ran past ``JOB_TIMEOUT`` and was stopped."""


class AttemptLost(Exception):  # a state, not an error of ours: another claim or a cancel took the job
    """The attempt no longer holds the job (its lease was taken over, or the job was cancelled)."""


class Cancelled(Exception):  # a state too: the client asked for the job to end
    """A cancellation of the running job was requested; the attempt stopped at a checkpoint."""


class Action(enum.StrEnum):
    COMPLETE = "complete"
    RETRY = "retry"  # release the job, schedule the next generation, complete this message
    ABANDON = "abandon"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str | None = None  # dead-letter reason (an error class name) or why we abandon or retry
    description: str | None = None  # dead-letter description: the detail
    fail_code: str | None = None  # fail the claimed attempt with this code (and ``description``) before settling
    delay: timedelta | None = None  # RETRY: when the next generation is due
    drain: bool = False  # RETRY after a shutdown: the attempt is not charged against JOB_MAX_ATTEMPTS
    stop: bool = False  # stop the claimed attempt of a job being cancelled (``cancelled``) before settling
    unexpected: bool = False  # not one of our errors: log with the stack


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: timedelta
    backoff_max: timedelta

    def delay(self, attempt: int) -> timedelta:
        """Exponential: ``backoff`` after the first attempt, doubled after each, at most ``backoff_max``."""
        exponent = min(max(attempt - 1, 0), 32)  # past 2**32 any backoff is over any cap; timedelta would overflow
        delay: timedelta = self.backoff * 2**exponent
        return min(delay, self.backoff_max)


def describe(error: BaseException) -> str:
    text = error.message if isinstance(error, CropAIError) else f"{type(error).__name__}: {error}"
    return text[:DESCRIPTION_LIMIT]


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help. SDK errors are translated at the adapters; a ``ServiceBusError`` can still reach
    here from a bus call made while processing (throttling, connection loss) and is transient."""
    if isinstance(error, CropAIError):
        return error.transient
    return isinstance(error, ServiceBusError)


def decide(
    error: BaseException | None,
    attempt: int | None,
    policy: RetryPolicy,
    *,
    outage: bool = False,
    cancelling: bool = False,
) -> Decision:
    """Turn an outcome into a :class:`Decision`; ``attempt`` is how many attempts the claimed job has been charged
    (this one included; :attr:`shared.jobs.Job.charged`), ``None`` if unclaimed. ``outage``: the error is a backend
    outage the breaker's probes confirm: the attempt is released uncharged, like a drain (it never exhausts).
    ``cancelling``: the attempt saw that a cancellation of its job was requested."""
    if error is None or isinstance(error, AttemptLost):
        return Decision(Action.COMPLETE, type(error).__name__ if error else None)
    if isinstance(error, TimedOut):
        return Decision(Action.DEAD_LETTER, TIMED_OUT, describe(error), fail_code=TIMED_OUT_CODE)
    if attempt is not None and (cancelling or isinstance(error, Cancelled)):
        return Decision(Action.COMPLETE, CANCELLED, describe(error), stop=True)
    if isinstance(error, Interrupted):  # a drain: not the job's fault, so not charged
        if attempt is None:
            return Decision(Action.ABANDON, "Shutdown", describe(error))
        return Decision(Action.RETRY, "Shutdown", describe(error), delay=timedelta(0), drain=True)
    if isinstance(error, CropAIError) and not error.transient:
        code = error.code if attempt is not None else None
        return Decision(Action.DEAD_LETTER, type(error).__name__, describe(error), fail_code=code)
    unexpected = not is_transient(error)
    if attempt is None:
        return Decision(Action.ABANDON, type(error).__name__, describe(error), unexpected=unexpected)
    if outage:
        return Decision(Action.RETRY, type(error).__name__, describe(error), delay=policy.delay(attempt), drain=True)
    if attempt >= policy.max_attempts:
        description = f"failed on all {policy.max_attempts} attempts; last error: {describe(error)}"
        return Decision(
            Action.DEAD_LETTER,
            RETRIES_EXHAUSTED,
            description[:DESCRIPTION_LIMIT],
            fail_code=RETRIES_EXHAUSTED_CODE,
            unexpected=unexpected,
        )
    return Decision(
        Action.RETRY, type(error).__name__, describe(error), delay=policy.delay(attempt), unexpected=unexpected
    )


def outcome(decision: Decision, error: BaseException | None) -> tuple[str, str]:
    """``(outcome, code)`` of a claimed attempt's settlement, for ``crop_ai.jobs.completed`` (:mod:`shared.metrics`):
    the outcome is one of ``succeeded``, ``lost``, ``cancelled``, ``failed`` (``code``: the job's error code),
    ``retried`` or ``released`` (a drain or an outage, uncharged; ``code``: what ended it), ``abandoned``."""
    if error is None:
        return "succeeded", ""
    if isinstance(error, AttemptLost):
        return "lost", ""
    if decision.stop:
        return "cancelled", ""
    if decision.fail_code is not None:
        return "failed", decision.fail_code
    code = error.code if isinstance(error, CropAIError) else type(error).__name__
    if decision.action is Action.RETRY:
        return ("released" if decision.drain else "retried"), code
    return "abandoned", code
