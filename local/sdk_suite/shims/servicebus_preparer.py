"""The SDK tests import ``servicebus_preparer``: the emulator's preparers (local/sdk_suite/preparers.py)."""

from local.sdk_suite.preparers import (
    SERVICEBUS_ENDPOINT_SUFFIX,
    CachedServiceBusNamespacePreparer,
    CachedServiceBusQueuePreparer,
    CachedServiceBusResourceGroupPreparer,
    ServiceBusNamespacePreparer,
    ServiceBusQueuePreparer,
    ServiceBusResourceGroupPreparer,
)

__all__ = [
    "SERVICEBUS_ENDPOINT_SUFFIX",
    "CachedServiceBusNamespacePreparer",
    "CachedServiceBusQueuePreparer",
    "CachedServiceBusResourceGroupPreparer",
    "ServiceBusNamespacePreparer",
    "ServiceBusQueuePreparer",
    "ServiceBusResourceGroupPreparer",
]
