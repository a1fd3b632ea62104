"""Test configuration shared by every tier.

Backend fixtures live in ``tests/fixtures/`` (one module per backend) and are loaded as plugins here. Each skips
when its backend cannot be started locally, and fails instead when ``CI`` is set.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.backends",
    "tests.fixtures.postgres",
    "tests.fixtures.azurite",
    "tests.fixtures.servicebus",
    "tests.fixtures.signals",
]

# Variables that would make tests talk to something other than the backends they start themselves.
_STRAY = (
    "ServiceBusConnection",
    "ServiceBusConnection__fullyQualifiedNamespace",
    "AzureWebJobsStorage",
    "AzureWebJobsStorage__blobServiceUri",
    "DATABASE_URL",
    "POSTGRES_HOST",
    "POSTGRES_USER",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
)


@pytest.fixture(autouse=True)
def _clear_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _STRAY:
        monkeypatch.delenv(name, raising=False)


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
