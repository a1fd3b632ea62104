from __future__ import annotations

import os
from datetime import timedelta

import pytest
from pydantic import ValidationError

from local.services import worker_env
from shared.settings import Settings

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
            "JOB_MAX_ATTEMPTS": "8",
        }
    )
    assert settings.servicebus_namespace == "ns.servicebus.windows.net"
    assert settings.database_url is None
    assert settings.jobs_queue == "jobs-prod"
    assert settings.job_max_attempts == 8


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


REMOVED = [
    "QUEUE_MAX_DELIVERY_COUNT",
    "WORKER_MAX_LOCK_RENEWAL",
    "WORKER_SWEEP_INTERVAL",
    "WORKER_SWEEP_AGE",
    "WORKER_DEADLETTER_POLL_INTERVAL",
    "WORKER_MAX_MESSAGE_COUNT",  # one message per receive
]


def test_lifecycle_defaults() -> None:
    settings = Settings.from_env(LOCAL)
    assert settings.job_max_attempts == 5
    assert settings.job_lease == timedelta(minutes=2)
    assert settings.job_timeout == timedelta(hours=1)
    assert settings.retry_backoff == timedelta(seconds=10)
    assert settings.retry_backoff_max == timedelta(minutes=5)
    assert settings.reconcile_resend_after == timedelta(minutes=2)
    assert settings.reconcile_batch == 100
    assert settings.reconcile_schedule == "0 */1 * * * *"
    assert settings.worker_probe_max_interval == 30.0


def test_lifecycle_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {**LOCAL, "JOB_MAX_ATTEMPTS": "3", "JOB_LEASE": "PT30S", "JOB_TIMEOUT": "02:00:00", "RETRY_BACKOFF": "PT1S",
         "RETRY_BACKOFF_MAX": "PT1M", "RECONCILE_RESEND_AFTER": "PT5M", "RECONCILE_BATCH": "7",
         "RECONCILE_SCHEDULE": "*/30 * * * * *", "BUS_SEND_TIMEOUT": "2.5", "STORAGE_RETRY_TOTAL": "0",
         "WORKER_PROBE_MAX_INTERVAL": "4"}
    )  # fmt: skip
    assert (settings.job_max_attempts, settings.job_lease, settings.job_timeout) == (
        3, timedelta(seconds=30), timedelta(hours=2),
    )  # fmt: skip
    assert (settings.retry_backoff, settings.retry_backoff_max) == (timedelta(seconds=1), timedelta(minutes=1))
    assert (settings.reconcile_resend_after, settings.reconcile_batch) == (timedelta(minutes=5), 7)
    assert settings.reconcile_schedule == "*/30 * * * * *"
    assert (settings.bus_send_timeout, settings.storage_retry_total, settings.worker_probe_max_interval) == (
        2.5, 0, 4.0,
    )  # fmt: skip


@pytest.mark.parametrize(("timeout", "lease"), [("PT2M", "PT2M"), ("PT1M", "PT2M")])
def test_the_time_limit_must_be_longer_than_the_lease(timeout: str, lease: str) -> None:
    with pytest.raises(ValidationError, match="JOB_TIMEOUT must be longer than JOB_LEASE"):
        Settings.from_env({**LOCAL, "JOB_TIMEOUT": timeout, "JOB_LEASE": lease})


@pytest.mark.parametrize(
    ("name", "value"),
    [("JOB_MAX_ATTEMPTS", "0"), ("JOB_MAX_ATTEMPTS", "many"), ("RECONCILE_BATCH", "0"), ("JOB_LEASE", "120"),
     ("RETRY_BACKOFF", "soon")],
)  # fmt: skip
def test_bad_lifecycle_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings.from_env({**LOCAL, name: value})


def test_removed_settings_are_gone_and_ignored() -> None:
    aliases = {field.alias for field in Settings.model_fields.values()}
    assert aliases.isdisjoint(REMOVED)
    settings = Settings.from_env({**LOCAL, **dict.fromkeys(REMOVED, "9")})
    assert settings == Settings.from_env(LOCAL)


def test_analysis_threads_share_the_cpus_among_the_worker_processes() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert Settings.from_env(LOCAL).analysis_threads == cpus
    assert Settings.from_env({**LOCAL, "WORKER_PROCESSES": str(cpus * 4)}).analysis_threads == 1
    assert Settings.from_env({**LOCAL, "WORKER_THREADS": "3", "WORKER_PROCESSES": "8"}).analysis_threads == 3
    # The local stack runner tells each of its workers how many share the machine, and sizes OpenMP to match.
    env = worker_env(LOCAL, 2)
    assert env["WORKER_PROCESSES"] == "2"
    assert env["OMP_NUM_THREADS"] == str(Settings.from_env(env).analysis_threads)
    assert worker_env({**LOCAL, "WORKER_THREADS": "5"}, 2)["OMP_NUM_THREADS"] == "5"


def test_analyses_at_once_default_by_device_and_never_exceed_the_messages_in_flight() -> None:
    from gpu_worker.app import analyses

    settings = Settings.from_env(LOCAL)
    assert (analyses(settings, "cpu"), analyses(settings, "cuda:0 (NVIDIA H100)")) == (1, 2)
    one = Settings.from_env({**LOCAL, "WORKER_JOBS_IN_FLIGHT": "1"})
    assert analyses(one, "cuda:0 (NVIDIA H100)") == 1
    assert analyses(Settings.from_env({**LOCAL, "WORKER_ANALYSES": "3", "WORKER_JOBS_IN_FLIGHT": "4"}), "cpu") == 3
    with pytest.raises(ValidationError, match="WORKER_ANALYSES must be at most WORKER_JOBS_IN_FLIGHT"):
        Settings.from_env({**LOCAL, "WORKER_ANALYSES": "3"})
    assert Settings.from_env(LOCAL).analysis_batching is None
    assert Settings.from_env({**LOCAL, "ANALYSIS_BATCHING": "true"}).analysis_batching is True


def test_mixed_precision_is_off_by_default_and_takes_a_half_precision_dtype() -> None:
    assert Settings.from_env(LOCAL).analysis_mixed_precision == ""
    assert Settings.from_env({**LOCAL, "ANALYSIS_MIXED_PRECISION": "bfloat16"}).analysis_mixed_precision == "bfloat16"
    with pytest.raises(ValidationError):
        Settings.from_env({**LOCAL, "ANALYSIS_MIXED_PRECISION": "int8"})
