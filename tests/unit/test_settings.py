from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from shared.settings import QueueProperties, Settings

LOCAL = {
    "ServiceBusConnection": "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;"
    "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/cropai",
}


def test_local_connection_strings() -> None:
    settings = Settings.from_env(LOCAL)
    assert settings.servicebus_connection_string == LOCAL["ServiceBusConnection"]
    assert settings.jobs_queue == "jobs"
    assert settings.max_upload_bytes == 100 * 1024 * 1024


def test_keyless_azure_names() -> None:
    settings = Settings.from_env(
        {
            "ServiceBusConnection__fullyQualifiedNamespace": "ns.servicebus.windows.net",
            "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net",
            "POSTGRES_HOST": "pg.postgres.database.azure.com",
            "POSTGRES_USER": "id-crop-ai-func",
            "JOBS_QUEUE_NAME": "jobs-prod",
            "WORKER_MAX_MESSAGE_COUNT": "8",
        }
    )
    assert settings.servicebus_namespace == "ns.servicebus.windows.net"
    assert settings.database_url is None
    assert settings.jobs_queue == "jobs-prod"
    assert settings.worker_max_message_count == 8


@pytest.mark.parametrize(
    ("missing", "fragment"),
    [("ServiceBusConnection", "ServiceBusConnection"), ("AzureWebJobsStorage", "AzureWebJobsStorage"),
     ("DATABASE_URL", "DATABASE_URL")],
)  # fmt: skip
def test_each_backend_must_be_configured(missing: str, fragment: str) -> None:
    env = {k: v for k, v in LOCAL.items() if k != missing}
    with pytest.raises(ValidationError, match=fragment):
        Settings.from_env(env)


def test_bad_number_names_the_setting() -> None:
    with pytest.raises(ValidationError, match="MAX_UPLOAD_BYTES"):
        Settings.from_env({**LOCAL, "MAX_UPLOAD_BYTES": "lots"})


def test_queue_defaults() -> None:
    queue = QueueProperties()
    assert queue.lock_duration == timedelta(minutes=1)
    assert queue.max_delivery_count == 5
    assert queue.requires_duplicate_detection


def test_queue_max_delivery_count_from_the_environment() -> None:
    assert Settings.from_env(LOCAL).queue.max_delivery_count == 5
    settings = Settings.from_env({**LOCAL, "QUEUE_MAX_DELIVERY_COUNT": "9"})
    assert settings.queue.max_delivery_count == 9
    assert settings.queue.lock_duration == QueueProperties().lock_duration  # the rest keep their defaults


@pytest.mark.parametrize("value", ["0", "many"])
def test_bad_queue_max_delivery_count_names_the_setting(value: str) -> None:
    with pytest.raises(ValidationError, match="QUEUE_MAX_DELIVERY_COUNT"):
        Settings.from_env({**LOCAL, "QUEUE_MAX_DELIVERY_COUNT": value})
