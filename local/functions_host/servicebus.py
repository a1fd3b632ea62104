"""The Service Bus queue-triggered functions of a v2 ``FunctionApp``, read from each function's ``serviceBusTrigger``
binding, and the connection each one names.

``@app.service_bus_queue_trigger(arg_name=..., queue_name=..., connection=...)`` writes
``{"type": "serviceBusTrigger", "name": arg_name, "queueName": ..., "connection": ...}``. As on the host:

- ``%NAME%`` references in the queue name are replaced by app settings (here: the environment, names matched ignoring
  case); a reference to a setting that is not set puts the function in error;
- ``connection`` names the app setting holding the connection string, looked up as the Service Bus extension does:
  ``<connection>``, then ``AzureWebJobs<connection>``; an empty one means ``ServiceBus`` (so
  ``AzureWebJobsServiceBus``). Where neither holds a string, ``<connection>__fullyQualifiedNamespace`` makes an
  identity-based connection (``DefaultAzureCredential``, as in Azure; it cannot reach the local emulator);
- ``AzureWebJobs.<function>.Disabled`` (or ``AzureWebJobs_<function>_Disabled``) ``true`` or ``1`` disables it; its
  connection is then not looked up (the host resolves it only for a listener it starts).

Topic triggers (``topicName``), sessions (``isSessionsEnabled``) and batches (``cardinality="many"``) are not
supported here (the emulator has neither topics nor sessions): such a function is logged as unsupported and left out.
A function in error or left out does not stop the others, as on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from azure.servicebus import ServiceBusClient

from local.functions_host.bindings import (
    UnresolvedSetting,
    app_setting,
    is_disabled,
    resolve_app_settings,
    trigger_binding,
)

logger = logging.getLogger(__name__)

DEFAULT_CONNECTION = "ServiceBus"  # the extension's name for an empty ``connection``


class BindingError(ValueError):
    """A binding the host could not index or connect: the function is in error."""


@dataclass(frozen=True)
class Connection:
    """Where a function's messages come from: a connection string, or a namespace reached with an Entra identity."""

    setting: str  # the app setting it was read from, for the log (never the secret itself)
    connection_string: str | None = None
    namespace: str | None = None

    def client(self, **options: Any) -> ServiceBusClient:
        if self.connection_string is not None:
            return ServiceBusClient.from_connection_string(self.connection_string, **options)
        from azure.identity import DefaultAzureCredential

        assert self.namespace is not None, "resolve_connection sets one of the two"
        return ServiceBusClient(self.namespace, DefaultAzureCredential(), **options)


@dataclass(frozen=True)
class ServiceBusFunction:
    function_name: str
    declared_queue: str  # the queue name as the binding has it, before %NAME% references are resolved
    queue_name: str
    connection: Connection | None  # None when disabled
    binding_name: str
    disabled: bool
    user_function: Callable[..., Any]


def resolve_names(expression: str, environ: Mapping[str, str]) -> str:
    """``expression`` with each ``%NAME%`` replaced by the app setting ``NAME``, as the host's name resolver does."""
    try:
        return resolve_app_settings(expression, environ)
    except UnresolvedSetting as e:
        if e.name is None:
            raise BindingError(f"{expression!r} has a '%' without its closing '%'") from None
        raise BindingError(f"'%{e.name}%' does not resolve to a value (app setting {e.name!r} is not set)") from None


def resolve_connection(name: str, environ: Mapping[str, str]) -> Connection:
    """The connection the app setting ``name`` describes (``<name>``, then ``AzureWebJobs<name>``)."""
    name = name or DEFAULT_CONNECTION
    for setting in (name, f"AzureWebJobs{name}"):
        value = app_setting(environ, setting)
        if value and value.strip():
            return Connection(setting, connection_string=value.strip())
        namespace = app_setting(environ, f"{setting}__fullyQualifiedNamespace")
        namespace = namespace or app_setting(environ, f"{setting}:fullyQualifiedNamespace")
        if namespace and namespace.strip():
            return Connection(f"{setting}__fullyQualifiedNamespace", namespace=namespace.strip())
    raise BindingError(
        f"Service Bus account connection string '{name}' does not exist. Make sure that it is a defined App Setting."
    )


def _unsupported(trigger: Mapping[str, Any]) -> str | None:
    if trigger.get("topicName") or trigger.get("subscriptionName"):
        return "topic triggers are not supported"
    if trigger.get("isSessionsEnabled"):
        return "sessions (is_sessions_enabled) are not supported"
    if str(trigger.get("cardinality", "one")).lower() == "many":
        return "batches (cardinality=many) are not supported"
    return None


def servicebus_functions_of(app: Any, environ: Mapping[str, str]) -> list[ServiceBusFunction]:
    """The Service Bus queue-triggered functions of a v2 ``FunctionApp`` (other triggers are ignored)."""
    found = []
    for function in app.get_functions():
        trigger = trigger_binding(function, "serviceBusTrigger")
        if trigger is None:
            continue
        name = function.get_function_name()
        if (reason := _unsupported(trigger)) is not None:
            fields = {"action": "servicebus_unsupported", "function": name}
            logger.error("The '%s' function is not run by this host: %s", name, reason, extra=fields)
            continue
        declared = str(trigger.get("queueName", ""))
        disabled = is_disabled(name, environ)
        try:
            queue_name = resolve_names(declared, environ)
            connection = None if disabled else resolve_connection(str(trigger.get("connection") or ""), environ)
        except BindingError as e:
            fields = {"action": "servicebus_invalid", "function": name}
            logger.error("The '%s' function is in error: %s", name, e, extra=fields)
            continue
        found.append(
            ServiceBusFunction(
                function_name=name,
                declared_queue=declared,
                queue_name=queue_name,
                connection=connection,
                binding_name=str(trigger.get("name", "msg")),
                disabled=disabled,
                user_function=function.get_user_function(),
            )
        )
    return found
