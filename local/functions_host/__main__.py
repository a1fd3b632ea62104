"""``python -m local.functions_host --app function_app:app [--host 127.0.0.1] [--port 7071] [--host-json host.json]
[--state-dir DIR]``.

``--state-dir`` (else ``FUNCTIONS_HOST_STATE_DIR``) is where the host keeps its state: the schedule monitor's status
of each timer function, ``DIR/timers/<function>.json``. There is no default (a test or a second checkout must not
share one by accident): without either, the schedule monitor is off, ``past_due`` is always False and
``schedule_status`` empty. The local stack passes ``<stack root>/functions-host``.

Logs each HTTP route, each timer function (``name: timer "schedule"``) and each Service Bus queue-triggered function
(``name: serviceBusTrigger queue "queue"``), starts the timers and the Service Bus listeners (options from
``host.json``'s ``extensions.serviceBus``), then logs ``Functions host ready: http://HOST:PORT/api`` (with the real
port when ``--port 0``) once it accepts requests. SIGTERM or SIGINT stops it: no new request, timer invocation or
message; running invocations get a few seconds (a message whose invocation is still running then is abandoned).
``AzureWebJobs.<function>.Disabled=true`` keeps a timer or Service Bus function from running. An invalid
``extensions.serviceBus`` option stops the host at startup (exit status 1), as it stops the real one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from local.functions_host.invoke import EventLoopThread
from local.functions_host.routes import RouteTable, load_max_outstanding_requests, load_route_prefix, routes_of
from local.functions_host.scheduler import DEFAULT_STOP_TIMEOUT, TimerScheduler
from local.functions_host.server import DEFAULT_BODY_LIMIT, FunctionsHost, HostConfig
from local.functions_host.servicebus import servicebus_functions_of
from local.functions_host.servicebus_listener import ServiceBusListener
from local.functions_host.servicebus_options import HostJsonError, load_servicebus_options
from local.functions_host.status_files import StatusFiles
from local.functions_host.timers import TimerFunction, timers_of

logger = logging.getLogger("local.functions_host")


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` from the current directory (where function_app.py lives)."""
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_name), attribute or "app")


class IndexedApp:
    """An app's functions, indexed once as the worker does: ``FunctionApp.get_functions()`` refuses a second call."""

    def __init__(self, app: Any) -> None:
        self._functions = list(app.get_functions())

    def get_functions(self) -> list[Any]:
        return self._functions


def config_from(args: argparse.Namespace, environ: dict[str, str]) -> HostConfig:
    return HostConfig(
        host=args.host,
        port=args.port,
        max_connections=load_max_outstanding_requests(args.host_json),
        body_limit=int(environ.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT", DEFAULT_BODY_LIMIT)),
        enforce_keys=environ.get("FUNCTIONS_HOST_ENFORCE_KEYS", "").lower() in ("1", "true", "yes"),
        function_key=environ.get("FUNCTIONS_HOST_KEY"),
    )


def state_dir_from(args: argparse.Namespace, environ: dict[str, str]) -> Path | None:
    """``--state-dir``, else ``FUNCTIONS_HOST_STATE_DIR``, else None (no schedule monitor)."""
    chosen = args.state_dir or environ.get("FUNCTIONS_HOST_STATE_DIR") or None
    return Path(chosen).resolve() if chosen else None


def log_timers(timers: list[TimerFunction], environ: dict[str, str]) -> None:
    for timer in timers:
        resolved = timer.schedule.expression
        shown = f'"{resolved}"' if resolved == timer.declared else f'"{timer.declared}" = "{resolved}"'
        logger.info("%s: timer %s%s", timer.function_name, shown, " (disabled)" if timer.disabled else "")
    if timers and environ.get("WEBSITE_TIME_ZONE"):
        logger.warning("timer schedules run in UTC here: WEBSITE_TIME_ZONE=%s is ignored", environ["WEBSITE_TIME_ZONE"])


def servicebus_listeners(
    app: IndexedApp, environ: dict[str, str], host_json: Path, loop: EventLoopThread
) -> list[ServiceBusListener]:
    """A listener for each enabled Service Bus queue-triggered function; logs each function and the options."""
    functions = servicebus_functions_of(app, environ)
    for function in functions:
        declared, queue = function.declared_queue, function.queue_name
        shown = f'"{queue}"' if queue == declared else f'"{declared}" = "{queue}"'
        source = f" (connection {function.connection.setting})" if function.connection else " (disabled)"
        logger.info("%s: serviceBusTrigger queue %s%s", function.function_name, shown, source)
    enabled = [function for function in functions if not function.disabled]
    if not enabled:
        return []
    options = load_servicebus_options(host_json)
    logger.info(
        "Service Bus options: maxConcurrentCalls=%d, autoCompleteMessages=%s, maxAutoLockRenewalDuration=%s%s",
        options.max_concurrent_calls,
        str(options.auto_complete_messages).lower(),
        options.max_auto_lock_renewal_duration,
        f" (prefetchCount={options.prefetch_count} not used)" if options.prefetch_count else "",
    )
    return [ServiceBusListener(function, options, loop) for function in enabled]


def stop_listeners(listeners: list[ServiceBusListener], deadline: float) -> None:
    """Wait for the listeners asked to stop, until ``deadline`` (monotonic) and a second to close their clients."""
    for listener in listeners:
        if not listener.join(max(0.0, deadline + 1.0 - time.monotonic())):
            logger.warning("Service Bus listener of %s did not close in time", listener.function.function_name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.functions_host", description=__doc__)
    parser.add_argument("--app", default="function_app:app", help="module:attribute of the FunctionApp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--host-json", type=Path, default=Path("host.json"))
    parser.add_argument("--state-dir", help="the host's state (timer statuses); default $FUNCTIONS_HOST_STATE_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The Azure SDKs' level is the app's to set (function_app.py does): in Azure the host cannot filter them either.

    environ = dict(os.environ)
    app = IndexedApp(load_app(args.app))
    table = RouteTable(routes_of(app), load_route_prefix(args.host_json))
    for route in table.routes:
        methods = ",".join(sorted(route.methods))
        logger.info("%s: [%s] /%s/%s", route.function_name, methods, table.prefix, route.template)
    timers = timers_of(app, environ)
    log_timers(timers, environ)
    host = FunctionsHost(config_from(args, environ), table)
    state_dir = state_dir_from(args, environ)
    if state_dir is None and any(timer.use_monitor and not timer.disabled for timer in timers):
        logger.info("no --state-dir or FUNCTIONS_HOST_STATE_DIR: the timers' schedule monitor is off")
    elif state_dir is not None:
        logger.info("timer statuses in %s", state_dir / "timers")
    scheduler = TimerScheduler(timers, host.loop, statuses=StatusFiles(state_dir) if state_dir else None)
    try:
        listeners = servicebus_listeners(app, environ, args.host_json, host.loop)
    except HostJsonError as e:
        logger.error("A host error has occurred during startup: %s", e, extra={"action": "host_error"})
        host.close()
        raise SystemExit(1) from e

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=host.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheduler.start()
    for listener in listeners:
        listener.start()
    logger.info("Functions host ready: %s", host.base_url, extra={"action": "host_ready"})
    try:
        host.serve_forever()
    finally:
        deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT
        for listener in listeners:
            listener.request_stop(DEFAULT_STOP_TIMEOUT)
        scheduler.stop()
        stop_listeners(listeners, deadline)
        host.close()
        logger.info("Functions host stopped", extra={"action": "host_stopped"})


if __name__ == "__main__":
    main()
