"""``deliver_webhook``: the Service Bus-triggered function that makes one webhook delivery attempt per message of the
job-events queue (:class:`shared.delivery.Deliverer` does the work).

The host receives in peek-lock, completes the message when the function returns and abandons it when it raises. So:
an attempt that got through, that was given up (410 Gone, a refused target), or whose next attempt is scheduled as a
new message returns; the failure of the last attempt raises :class:`~shared.delivery.GaveUp` (the broker
dead-letters the message after the queue's ``MaxDeliveryCount``, each redelivery POSTing once more); a body that is
not a job-events message raises :class:`~shared.errors.InvalidMessage` (dead-lettered the same way, no POST). A
database outage puts the attempt off (a new scheduled message) and returns. A bus that cannot take the next
attempt's message raises: the redelivery finds the attempt recorded and only sends that message again (no second
POST); if the message is dead-lettered all the same, the reconciler sends the overdue attempt again.
"""

from __future__ import annotations

import logging

import azure.functions as func
from opentelemetry import trace

from functions import deps
from shared.errors import InvalidMessage
from shared.events import EventMessage
from shared.telemetry import context_from_properties

bp = func.Blueprint()  # type: ignore[no-untyped-call]
log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@bp.function_name("deliver_webhook")
@bp.service_bus_queue_trigger(arg_name="msg", queue_name="%JOB_EVENTS_QUEUE_NAME%", connection="ServiceBusConnection")
def deliver_webhook(msg: func.ServiceBusMessage) -> None:
    extra = {"message_id": msg.message_id, "delivery_count": msg.delivery_count, "action": "webhook_received"}
    try:
        message = EventMessage.decode(msg.get_body())
    except InvalidMessage:
        log.exception("job-events message %s is not an event message", msg.message_id, extra=extra)
        raise
    deliverer = deps.get().deliverer
    context = context_from_properties(msg.application_properties)
    with tracer.start_as_current_span("deliver_webhook", context=context, kind=trace.SpanKind.CONSUMER):
        deliverer.handle(message, delivery_count=msg.delivery_count or 1)
