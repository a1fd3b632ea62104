"""The one retry/settlement decision: what happens to a message once the handler returned or raised.

A pure function of the outcome and the delivery count, so the whole table is unit-tested without a broker:

=====================================  =====================  ============================  ===================
handler outcome                        delivery               action                        job
=====================================  =====================  ============================  ===================
returned                               any                    complete                      (as the handler left it)
PermanentError (InvalidMessage, ...)   any                    dead-letter, reason = class   failed, ``error.code``
TransientError / ServiceBusError       before the last        abandon                       (processing)
unexpected exception (a bug)           before the last        abandon, logged with stack    (processing)
transient or unexpected                the last allowed       dead-letter RetriesExhausted  failed, retries_exhausted
shutdown (:class:`Interrupted`, ...)   any                    abandon                       (processing)
lock lost while processing             any                    none: the broker redelivers   as above, if failing
=====================================  =====================  ============================  ===================

Deliveries: the SDK's ``delivery_count`` is the AMQP header's count of *earlier failed* deliveries (0 on the first
delivery; Azure and our emulator agree), and the broker dead-letters a message by itself once that count reaches
``MaxDeliveryCount``. So delivery ``delivery_count + 1`` is the last allowed one when it equals ``MaxDeliveryCount``:
abandoning it would only hand the job to the broker's ``MaxDeliveryCountExceeded``, so we fail it ourselves with a
clearer reason. A shutdown abandons even on the last delivery (it is not the job's fault); the dead-letter watcher
then marks the job failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from azure.servicebus.exceptions import ServiceBusError

from shared.errors import CropAIError

RETRIES_EXHAUSTED = "RetriesExhausted"
RETRIES_EXHAUSTED_CODE = "retries_exhausted"
DESCRIPTION_LIMIT = 1024  # Service Bus keeps the description as a message property; stay well inside its limits


class Interrupted(BaseException):
    """Processing was cut short by a shutdown (second signal or grace period over). Not an ``Exception``, so that
    no ``except Exception`` in a library swallows it."""


class Action(enum.StrEnum):
    COMPLETE = "complete"
    ABANDON = "abandon"
    DEAD_LETTER = "dead_letter"
    LEAVE = "leave"  # the lock is lost: settling would fail; the broker redelivers when it sees fit


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str | None = None  # dead-letter reason (an error class name) or why we abandon
    description: str | None = None  # dead-letter description: the detail
    fail_code: str | None = None  # mark the job failed with this code (and ``description``) before settling
    unexpected: bool = False  # not one of our errors: log with the stack


def _describe(error: BaseException) -> str:
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
    delivery_count: int | None,
    max_delivery_count: int,
    *,
    lock_lost: bool = False,
) -> Decision:
    """Turn the handler's outcome (``error`` is ``None`` when it returned) into a :class:`Decision`."""
    decision = _decide(error, delivery_count or 0, max_delivery_count)
    if lock_lost:
        # Settling needs the lock. The job update (if any) still happens; the redelivery then finds it terminal.
        return Decision(Action.LEAVE, "LockLost", decision.description, decision.fail_code, decision.unexpected)
    return decision


def _decide(error: BaseException | None, delivery_count: int, max_delivery_count: int) -> Decision:
    if error is None:
        return Decision(Action.COMPLETE)
    if isinstance(error, Interrupted) or not isinstance(error, Exception):  # also KeyboardInterrupt, SystemExit
        return Decision(Action.ABANDON, "Shutdown", _describe(error))
    if isinstance(error, CropAIError) and not error.transient:
        return Decision(Action.DEAD_LETTER, type(error).__name__, _describe(error), fail_code=error.code)
    unexpected = not is_transient(error)
    if delivery_count + 1 >= max_delivery_count:
        description = f"failed on all {max_delivery_count} deliveries; last error: {_describe(error)}"
        return Decision(
            Action.DEAD_LETTER,
            RETRIES_EXHAUSTED,
            description[:DESCRIPTION_LIMIT],
            fail_code=RETRIES_EXHAUSTED_CODE,
            unexpected=unexpected,
        )
    return Decision(Action.ABANDON, type(error).__name__, _describe(error), unexpected=unexpected)
