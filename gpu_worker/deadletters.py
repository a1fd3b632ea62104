"""Jobs whose messages ended in the dead-letter queue are marked failed, whoever dead-lettered them.

The broker dead-letters on its own (``MaxDeliveryCountExceeded`` when every delivery's lock expired or was
abandoned, ``TTLExpiredException`` when a message waited longer than its time to live); the worker never sees those
messages again, so without this the job would stay ``queued``/``processing`` forever. It is also the backstop for
our own dead-letters when the database was down at that moment.

Design:

* **Peek, never receive.** The DLQ stays intact for operators (and for the Portal alert on DeadletteredMessages);
  the watcher only reads. Each poll peeks the whole ``<queue>/$DeadLetterQueue`` in pages from sequence number 0.
* **No persisted cursor.** A message keeps the sequence number it got in the queue when it is dead-lettered
  (Service Bus changes sequence numbers only for scheduled messages), so DLQ sequence numbers do not grow in the
  order messages arrive there, and a "last seen" cursor would skip a message dead-lettered late. Instead the
  watcher remembers in memory which sequence numbers it has handled, trimmed after each complete scan to the ones
  that scan saw (dead letters that operators removed are forgotten, so memory follows the DLQ's size). After a
  restart it goes over the DLQ once more; a dead letter whose job is already terminal costs a read (``get``),
  never an ``UPDATE``. The cost is one peek round trip per 100 dead letters per interval, and the DLQ is meant to
  stay small (alerted on, drained by operators).
* It runs in the consumer's thread between batches (``poll_if_due``), not in a thread of its own: the SDK's
  clients are not thread-safe, and a poll is short.

The job is failed with a code derived from the dead-letter reason: our own reasons (error class names) map back to
their codes, the broker's to ``max_delivery_count_exceeded`` and ``message_expired``.
"""

from __future__ import annotations

import logging
import time
from uuid import UUID

from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.exceptions import ServiceBusError

from gpu_worker.settlement import RETRIES_EXHAUSTED, RETRIES_EXHAUSTED_CODE
from shared.errors import CropAIError, InputMissing, InvalidImage, InvalidMessage, UnknownAnalysis
from shared.jobs import JobRepository
from shared.messages import decode

logger = logging.getLogger(__name__)

PAGE = 100
CODES = {
    "MaxDeliveryCountExceeded": "max_delivery_count_exceeded",
    "TTLExpiredException": "message_expired",
    RETRIES_EXHAUSTED: RETRIES_EXHAUSTED_CODE,
    **{cls.__name__: cls.code for cls in (InvalidMessage, InvalidImage, InputMissing, UnknownAnalysis)},
}
DEFAULT_CODE = "dead_lettered"


def failure_of(reason: str | None, description: str | None) -> tuple[str, str]:
    """``(code, message)`` for a job whose message was dead-lettered with ``reason`` and ``description``."""
    code = CODES.get(reason or "", DEFAULT_CODE)
    message = f"message dead-lettered ({reason or 'no reason'})"
    return code, f"{message}: {description}" if description else message


def job_id_of(message: ServiceBusReceivedMessage) -> UUID | None:
    try:
        return decode(b"".join(message.body)).job_id
    except (CropAIError, TypeError):  # undecodable: fall back to message_id, which is the job id by contract
        pass
    try:
        return UUID(str(message.message_id))
    except ValueError:
        return None


class DeadLetterWatcher:
    def __init__(self, client: ServiceBusClient, queue_name: str, repo: JobRepository, *, interval: float) -> None:
        self._client = client
        self._queue_name = queue_name
        self._repo = repo
        self._interval = interval
        self._seen: set[int] = set()
        self._next_poll = 0.0

    def poll_if_due(self) -> int:
        """Poll when ``interval`` seconds have passed since the last poll (never when the interval is 0)."""
        if self._interval <= 0 or time.monotonic() < self._next_poll:
            return 0
        self._next_poll = time.monotonic() + self._interval
        try:
            return self.poll()
        except (ServiceBusError, CropAIError) as e:  # the next poll tries again; nothing is lost meanwhile
            logger.warning("dead-letter poll failed: %s", e, extra={"action": "dlq_poll_failed"})
            return 0

    @property
    def remembered(self) -> int:
        """How many dead letters the watcher remembers as handled."""
        return len(self._seen)

    def poll(self) -> int:
        """Peek the whole DLQ; mark failed the jobs of messages not handled before. Return how many were new."""
        new = 0
        seen: set[int] = set()  # what this scan saw and need not handle again
        complete = False
        try:
            with self._client.get_queue_receiver(
                self._queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER
            ) as receiver:
                sequence_number = 0
                while page := receiver.peek_messages(max_message_count=PAGE, sequence_number=sequence_number):
                    for message in page:
                        seq = message.sequence_number
                        if seq is None:
                            continue
                        if seq not in self._seen:
                            self._mark_failed(message)  # raises DatabaseUnavailable first: retried next poll
                            new += 1
                        seen.add(seq)
                    sequence_number = max(m.sequence_number or 0 for m in page) + 1
            complete = True
        finally:  # a complete scan replaces the memory (bounded by the DLQ); an interrupted one only adds to it
            self._seen = seen if complete else self._seen | seen
        return new

    def _mark_failed(self, message: ServiceBusReceivedMessage) -> None:
        reason, description = message.dead_letter_reason, message.dead_letter_error_description
        fields = {"message_id": message.message_id, "delivery_count": message.delivery_count, "reason": reason}
        job_id = job_id_of(message)
        if job_id is None:
            logger.warning("dead letter %s names no job", message.message_id, extra={**fields, "action": "dlq_skip"})
            return
        job = self._repo.get(job_id)  # a read: after a restart most dead letters' jobs are long terminal
        changed = False
        if job is not None and not job.status.terminal:
            code, text = failure_of(reason, description)
            changed = self._repo.fail(job_id, code, text)
        logger.log(
            logging.WARNING if changed else logging.DEBUG,
            "dead letter for job %s (%s): %s",
            job_id,
            reason,
            "job marked failed" if changed else "job already terminal" if job else "job unknown",
            extra={**fields, "job_id": str(job_id), "action": "dlq_job_failed" if changed else "dlq_noop"},
        )
