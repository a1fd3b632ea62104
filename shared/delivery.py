"""One webhook delivery attempt: from a job-events message to the POST, its record, and what follows.

:meth:`Deliverer.handle` takes the message ``{event_id, attempt}`` (the Service Bus-triggered function
``deliver_webhook`` calls it) and:

1. loads the event with its job's callback; an event already delivered, a job without a callback, or a message of
   an attempt older than the last one recorded (a stale copy) ends there: the message is completed, nothing is sent;
   a redelivery of the last attempt recorded (its next attempt's message may not have been sent) POSTs nothing and
   sends that message again (the queue drops it if the first send went through: the same message id);
2. resolves and checks the target (:func:`shared.webhooks.resolve_target`), builds the body and signs it, POSTs;
3. records the attempt (status, error, and the next attempt's due time) and follows :func:`shared.webhooks.decide`:

   * a 2xx: delivered;
   * 410 Gone, or a target the SSRF guard refuses: given up, the message completed (no attempt can help);
   * another failure with attempts left: the next attempt is a **new message** ``{event_id}:{attempt + 1}``
     scheduled after :func:`shared.webhooks.backoff`, and this one is completed: backoff costs time, not deliveries;
   * the failure of attempt ``WEBHOOK_MAX_ATTEMPTS``: given up, and :class:`GaveUp` is raised so the host abandons
     the message; each redelivery POSTs once more, and after the queue's ``MaxDeliveryCount`` the broker
     dead-letters it (the final dead letter, kept for an operator).

While the database is down, the attempt is put off: the same attempt as a new message ``{event_id}:{attempt}:p{n}``
scheduled after the backoff (doubled per postponement), so an outage costs time, not the message's deliveries.

A crash between the POST and its record redelivers the message and POSTs again (so does a database that fails
between the two): delivery is at least once, and receivers deduplicate on ``webhook-id`` (the event id). A bus that
fails the next attempt's send after the record makes :meth:`Deliverer.handle` raise: the host abandons the message
and its redelivery sends the next attempt's message again, without a POST. A message that is lost all the same
(dead-lettered after ``MaxDeliveryCount`` such failures) leaves the event pending with its ``next_attempt_at`` past:
the reconciler sends it again (:meth:`shared.events.OutboxNotifier.resume`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from shared.errors import DatabaseUnavailable, StorageUnavailable
from shared.events import Delivery, EventMessage, EventSender
from shared.settings import Settings
from shared.status import UrlSigner
from shared.webhooks import (
    Outcome,
    Refused,
    Resolver,
    Target,
    Verdict,
    backoff,
    decide,
    getaddrinfo_resolver,
    payload,
    post,
    resolve_target,
    signed_headers,
)

log = logging.getLogger(__name__)

Poster = Callable[[Target, bytes, dict[str, str], float], Outcome]


class GaveUp(Exception):
    """The last attempt failed: raised so the host abandons the message (dead-lettered after MaxDeliveryCount)."""


class DeliveryStore(Protocol):
    def delivery(self, event_id: UUID) -> Delivery | None: ...
    def record_attempt(
        self,
        event_id: UUID,
        attempt: int,
        *,
        status: int | None,
        error: str | None,
        delivered: bool,
        gave_up: bool,
        next_at: datetime | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class WebhookPolicy:
    max_attempts: int
    backoff: timedelta
    backoff_max: timedelta
    timeout: float
    allow_private: bool
    result_url_ttl: timedelta  # output URLs in a job.succeeded payload are read URLs valid this long

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(
            max_attempts=settings.webhook_max_attempts,
            backoff=settings.webhook_backoff,
            backoff_max=settings.webhook_backoff_max,
            timeout=settings.webhook_timeout,
            allow_private=settings.webhook_allow_private,
            result_url_ttl=settings.result_sas_ttl,
        )


class Deliverer:
    def __init__(
        self,
        events: DeliveryStore,
        sender: EventSender,
        policy: WebhookPolicy,
        *,
        signer: UrlSigner | None = None,
        poster: Poster = post,
        resolver: Resolver = getaddrinfo_resolver,
    ) -> None:
        self._events = events
        self._sender = sender
        self._policy = policy
        self._signer = signer
        self._post = poster
        self._resolver = resolver

    def handle(self, message: EventMessage, *, delivery_count: int = 1) -> Verdict | None:
        """Make attempt ``message.attempt`` of its event; ``None`` when there was nothing to do, or when the database
        is down: the same attempt is then put off, as a new message scheduled after a backoff (an abandon would spend
        the message's deliveries within seconds). Raises :class:`GaveUp` after the last attempt failed, and
        :class:`~shared.errors.BusUnavailable` when a message cannot be sent (this one is then redelivered)."""
        extra: dict[str, Any] = {"message_id": message.message_id, "delivery_count": delivery_count}
        try:
            return self._handle(message, extra)
        except DatabaseUnavailable as e:
            later = message.model_copy(update={"postponed": message.postponed + 1})
            delay = backoff(later.postponed, self._policy.backoff, self._policy.backoff_max)
            self._sender.send(later, at=datetime.now(UTC) + delay)
            extra |= {"action": "webhook_postponed", "next_message_id": later.message_id}
            log.warning("webhook %s put off for %s: %s", message.message_id, delay, e.message, extra=extra)
            return None

    def _handle(self, message: EventMessage, extra: dict[str, Any]) -> Verdict | None:
        delivery = self._events.delivery(message.event_id)
        skip = _skip_reason(delivery, message, self._policy.max_attempts)
        if skip is not None or delivery is None:
            log.info("webhook %s not sent: %s", message.message_id, skip, extra={**extra, "action": "webhook_skipped"})
            return None
        extra["job_id"] = str(delivery.job_id)
        if _recorded(delivery, message, self._policy.max_attempts):
            due = delivery.next_attempt_at
            self._send_next(message, due if due is not None and due > datetime.now(UTC) else None)
            extra["action"] = "webhook_next_resent"
            log.warning("webhook %s: attempt %d was made; its next attempt's message sent again", message.message_id,
                        message.attempt, extra=extra)  # fmt: skip
            return None
        outcome = self._attempt(delivery)
        verdict = decide(outcome, message.attempt, self._policy.max_attempts)
        next_at = None
        if verdict is Verdict.RETRY:
            next_at = datetime.now(UTC) + backoff(message.attempt, self._policy.backoff, self._policy.backoff_max)
        self._events.record_attempt(
            message.event_id,
            message.attempt,
            status=outcome.status,
            error=outcome.error,
            delivered=verdict is Verdict.DELIVERED,
            gave_up=verdict in (Verdict.GIVE_UP, Verdict.ABANDON),
            next_at=next_at,
        )
        extra |= {"action": f"webhook_{verdict.value}", "status": outcome.status}
        level = logging.INFO if verdict is Verdict.DELIVERED else logging.WARNING
        log.log(level, "webhook %s (%s) attempt %d: %s (%s)", message.message_id, delivery.type, message.attempt,
                verdict.value, outcome.error or outcome.status, extra=extra)  # fmt: skip
        if next_at is not None:
            self._send_next(message, next_at)
        elif verdict is Verdict.ABANDON:
            raise GaveUp(f"webhook {message.message_id}: the last attempt failed ({outcome.error})")
        return verdict

    def _send_next(self, message: EventMessage, at: datetime | None) -> None:
        """The next attempt's message, due ``at`` (``None``: now); raises :class:`~shared.errors.BusUnavailable`."""
        self._sender.send(EventMessage(event_id=message.event_id, attempt=message.attempt + 1), at=at)

    def _attempt(self, delivery: Delivery) -> Outcome:
        assert delivery.callback_url is not None, "by _skip_reason"
        assert delivery.webhook_secret is not None, "by _skip_reason"
        try:
            target = resolve_target(delivery.callback_url, allow_private=self._policy.allow_private,
                                    resolver=self._resolver)  # fmt: skip
        except Refused as e:
            return Outcome(None, f"refused: {e}", final=True)
        except (OSError, UnicodeError) as e:  # the name does not resolve now
            return Outcome(None, f"cannot resolve the callback host: {e}"[:500])
        body = json.dumps(payload(delivery, self._result(delivery)), separators=(",", ":"))
        headers = signed_headers(delivery.webhook_secret, str(delivery.event_id), datetime.now(UTC), body)
        return self._post(target, body.encode("utf-8"), headers, self._policy.timeout)

    def _result(self, delivery: Delivery) -> dict[str, Any] | None:
        """The stored result, its output files as read URLs valid for ``result_url_ttl`` (unsigned when signing
        fails: the delivery goes on, as the status view does)."""
        result = delivery.result
        outputs = result.get("outputs") if result else None
        if result is None or self._signer is None or not isinstance(outputs, dict):
            return result
        signed = {}
        for key, url in outputs.items():
            try:
                signed[key] = self._signer.read_url(url, self._policy.result_url_ttl) if isinstance(url, str) else url
            except StorageUnavailable as e:
                log.warning("job %s: cannot sign %s for the webhook: %s", delivery.job_id, url, e.message,
                            extra={"job_id": str(delivery.job_id), "action": "sign_url_failed"})  # fmt: skip
                signed[key] = url
        return {**result, "outputs": signed}


def _skip_reason(delivery: Delivery | None, message: EventMessage, max_attempts: int) -> str | None:
    """Why ``message`` needs nothing done, or ``None``. The last attempt's message is never stale: each redelivery of
    it (after :class:`GaveUp`) tries once more."""
    if delivery is None:
        return "no such event"
    if delivery.callback_url is None or delivery.webhook_secret is None:
        return "the job has no callback"
    if delivery.delivered_at is not None:
        return "already delivered"
    last = message.attempt >= max_attempts
    if delivery.gave_up_at is not None and not last:
        return "given up"
    if message.attempt < delivery.next_attempt - 1 and not last:
        return f"stale: attempt {delivery.next_attempt - 1} was made"
    return None


def _recorded(delivery: Delivery, message: EventMessage, max_attempts: int) -> bool:
    """Whether ``message``'s attempt is the last one recorded, with a next attempt to come: a redelivery after the
    next attempt's send failed (or a copy), which sends that message again instead of POSTing."""
    return message.attempt == delivery.next_attempt - 1 and message.attempt < max_attempts
