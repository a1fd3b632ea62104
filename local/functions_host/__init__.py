"""A local Azure Functions host for the HTTP, timer and Service Bus queue triggers of a v2-model ``FunctionApp``.

Functions Core Tools cannot be installed offline, so ``python -m local.functions_host --app function_app:app`` serves
the app's HTTP functions the way the Functions host does: routes from each function's ``httpTrigger`` binding under
the route prefix from ``host.json`` (``extensions.http.routePrefix``, default ``api``), route constraints
(``{id:guid}``, ``{n:int}``, optional ``{x?}``, catch-all ``{*rest}``), the 100 MB request body limit
(``FUNCTIONS_REQUEST_BODY_SIZE_LIMIT`` overrides), and, like Core Tools, function keys not enforced unless
``FUNCTIONS_HOST_ENFORCE_KEYS=true`` (then ``FUNCTIONS_HOST_KEY`` via ``?code=`` or ``x-functions-key``).

It also runs the functions with a ``timerTrigger`` binding on their schedules, as the host's timer extension does:
NCRONTAB (``{second} {minute} {hour} {day} {month} {day-of-week}``, in UTC) or TimeSpan schedules, ``%NAME%`` app
setting references, ``run_on_startup``, one invocation at a time per function, and
``AzureWebJobs.<function>.Disabled=true`` to keep one from running. Given a state directory (``--state-dir`` or
``FUNCTIONS_HOST_STATE_DIR``), it runs the schedule monitor (``use_monitor``) as the host does: each timer's status is
kept in a file, and an occurrence missed while the host was stopped is run once at startup with ``past_due`` True.
Without one, ``past_due`` is always False and missed occurrences are not replayed.

And it runs the functions with a ``serviceBusTrigger`` binding on a queue, as the host's Service Bus extension (5.x)
does, through the real SDK (locally against the emulator): ``%NAME%`` in the queue name, the connection named by
``connection`` (a connection string, or ``<connection>__fullyQualifiedNamespace`` with ``DefaultAzureCredential``),
``AzureWebJobs.<function>.Disabled``; peek-lock, one message per free slot, at most ``maxConcurrentCalls`` at once per
function, locks renewed for ``maxAutoLockRenewalDuration``, complete on return (``autoCompleteMessages``), abandon on
an exception, so the queue's ``MaxDeliveryCount`` dead-letters a message that keeps failing. The function gets the
``func.ServiceBusMessage`` the Python worker builds (``delivery_count`` 1 on the first delivery, naive UTC datetimes,
``metadata``). A listener reconnects after a failure, forever; on stop, running invocations finish within a few
seconds or their messages are abandoned. Topics, sessions and batches are not supported.

Its HTTP layer answers as the host in Azure does where the two could differ (``server``'s docstring lists how): a
chunked body reaches the function empty, empty query values are dropped and repeated ones joined with ``,``, a path
or method no function serves is an empty 404; and it holds up against hostile clients: bounded reads, a 400 for
ambiguous framing, problem+json for every error it detects itself.

Modules: ``routes`` (the route table), ``invoke`` (HttpRequest in, HttpResponse out), ``server`` (the HTTP server),
``framing`` (request body framing), ``deadline`` (bounded reads),
``ncrontab`` (schedule expressions), ``timers`` (the timer functions of an app), ``scheduler`` (running them),
``monitor`` (the schedule monitor's decisions), ``status_files`` (where it keeps each timer's status),
``servicebus`` (the Service Bus functions of an app and their connections), ``servicebus_options`` (host.json's
``extensions.serviceBus``), ``servicebus_message`` (the message as the worker builds it), ``servicebus_listener``
(receiving, invoking, settling).
"""

from local.functions_host.monitor import ScheduleStatus
from local.functions_host.routes import Route, RouteTable, load_route_prefix
from local.functions_host.scheduler import TimerScheduler
from local.functions_host.server import FunctionsHost, HostConfig
from local.functions_host.servicebus import ServiceBusFunction, servicebus_functions_of
from local.functions_host.servicebus_listener import ServiceBusListener
from local.functions_host.servicebus_options import ServiceBusOptions, load_servicebus_options
from local.functions_host.status_files import StatusFiles
from local.functions_host.timers import TimerFunction, timers_of

__all__ = [
    "FunctionsHost",
    "HostConfig",
    "Route",
    "RouteTable",
    "ScheduleStatus",
    "ServiceBusFunction",
    "ServiceBusListener",
    "ServiceBusOptions",
    "StatusFiles",
    "TimerFunction",
    "TimerScheduler",
    "load_route_prefix",
    "load_servicebus_options",
    "servicebus_functions_of",
    "timers_of",
]
