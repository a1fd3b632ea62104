"""What the SDK tests' ``servicebus_preparer`` provides, with emulator queues instead of ARM resources.

The tests import it as ``servicebus_preparer`` (``shims/servicebus_preparer.py`` re-exports this module).

Upstream, each preparer creates a resource group, a namespace or a queue through Azure Resource Manager and passes
it to the test as keyword arguments. Here the namespace is the running emulator (``127.0.0.1:<port>``, set by the
plugin before any test runs) and each queue preparer registers a queue of its own, with the properties it was
given, in :data:`QUEUES` when the test module is imported; the plugin writes them all into the emulator's
configuration before starting it. Cached and uncached preparers alike get their own queue, so no test sees
another's leftovers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EMULATOR",
    "QUEUES",
    "SERVICEBUS_ENDPOINT_SUFFIX",
    "CachedServiceBusNamespacePreparer",
    "CachedServiceBusQueuePreparer",
    "CachedServiceBusResourceGroupPreparer",
    "Namespace",
    "ServiceBusNamespacePreparer",
    "ServiceBusQueuePreparer",
    "ServiceBusResourceGroupPreparer",
]

# The tests build ``f"{servicebus_namespace.name}{SERVICEBUS_ENDPOINT_SUFFIX}"``: the name already has the port.
SERVICEBUS_ENDPOINT_SUFFIX = ""
QUEUES: dict[str, dict[str, Any]] = {}  # queue name -> Config.json Properties


@dataclass(frozen=True)
class FakeResource:
    name: str
    id: str


@dataclass
class Namespace:
    """Where the emulator listens; the plugin fills it in at session start."""

    host: str = ""
    port: int = 0
    connection_string: str = ""


EMULATOR = Namespace()


class _Preparer:
    """A decorator that passes keyword arguments, computed when the test runs, to the test function."""

    def kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await fn(*args, **{**self.kwargs(), **kwargs})

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **{**self.kwargs(), **kwargs})

        return run


class ServiceBusResourceGroupPreparer(_Preparer):
    def __init__(self, name_prefix: str = "", **_: Any) -> None:
        self._group = FakeResource(name=f"rg-{name_prefix}emulator", id="emulator")

    def kwargs(self) -> dict[str, Any]:
        return {"resource_group": self._group, "location": "local"}


class ServiceBusNamespacePreparer(_Preparer):
    def __init__(self, name_prefix: str = "", **_: Any) -> None:
        pass

    def kwargs(self) -> dict[str, Any]:
        name = f"{EMULATOR.host}:{EMULATOR.port}"
        return {
            "servicebus_namespace": FakeResource(name=name, id=name),
            "servicebus_namespace_connection_string": EMULATOR.connection_string,
            "servicebus_namespace_key_name": "RootManageSharedAccessKey",
            "servicebus_namespace_primary_key": "SAS_KEY_VALUE",
        }


class ServiceBusQueuePreparer(_Preparer):
    """One queue per decorated test, with the ARM preparer's defaults (``PT30S`` locks, no dead-lettering on
    expiry, no duplicate detection). ``requires_session`` is passed through to the configuration, which refuses
    it: a test that needs a session queue fails at start-up instead of running wrongly."""

    def __init__(
        self,
        name_prefix: str = "",
        use_cache: bool = False,
        requires_duplicate_detection: bool = False,
        dead_lettering_on_message_expiration: bool = False,
        requires_session: bool = False,
        lock_duration: str = "PT30S",
        **_: Any,
    ) -> None:
        del use_cache
        self.name = f"{name_prefix or 'queue'}{len(QUEUES)}"
        properties: dict[str, Any] = {
            "LockDuration": lock_duration,
            "RequiresDuplicateDetection": requires_duplicate_detection,
            "DeadLetteringOnMessageExpiration": dead_lettering_on_message_expiration,
            "MaxDeliveryCount": 10,
        }
        if requires_session:
            properties["RequiresSession"] = True
        QUEUES[self.name] = properties
        self._queue = FakeResource(name=self.name, id=self.name)

    def kwargs(self) -> dict[str, Any]:
        return {"servicebus_queue": self._queue}


CachedServiceBusResourceGroupPreparer = ServiceBusResourceGroupPreparer
CachedServiceBusNamespacePreparer = ServiceBusNamespacePreparer
CachedServiceBusQueuePreparer = ServiceBusQueuePreparer
