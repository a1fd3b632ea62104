"""local.settings.sample.json documents every setting, and only settings, and its values make valid Settings."""

from __future__ import annotations

import json
from pathlib import Path

from shared.settings import Settings

SAMPLE = json.loads((Path(__file__).resolve().parents[2] / "local.settings.sample.json").read_text())
ALIASES = {field.alias for field in Settings.model_fields.values() if field.alias}
# Documented names that are not Settings aliases: the Functions host's own, and the note on the section itself.
HOST_SETTINGS = {"_", "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"}


def test_every_setting_is_documented() -> None:
    assert {"JOB_MAX_ATTEMPTS", "RECONCILE_SCHEDULE"} <= ALIASES
    assert ALIASES - set(SAMPLE["Documentation"]) == set()


def test_nothing_but_settings_is_documented() -> None:
    """A setting removed from Settings goes from the sample too (the app would ignore it)."""
    assert set(SAMPLE["Documentation"]) - ALIASES - HOST_SETTINGS == set()


def test_every_value_is_documented_and_a_string() -> None:
    assert set(SAMPLE["Values"]) <= set(SAMPLE["Documentation"])
    assert all(isinstance(v, str) for v in SAMPLE["Values"].values())


def test_the_values_build_local_settings() -> None:
    settings = Settings.from_env(SAMPLE["Values"])
    assert settings.database_url
    assert settings.servicebus_connection_string
    assert settings.storage_connection_string
    assert "UseDevelopmentEmulator=true" in settings.servicebus_connection_string
    assert "devstoreaccount1" in settings.storage_connection_string
    assert settings.max_upload_bytes == int(SAMPLE["Values"]["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"])


def test_the_values_are_the_defaults_of_the_lifecycle() -> None:
    """The sample runs the lifecycle as deployed; RECONCILE_SCHEDULE must be set for the host to index the timer."""
    values = Settings.from_env(SAMPLE["Values"])
    defaults = Settings.from_env({"DATABASE_URL": "x", "ServiceBusConnection": "x", "AzureWebJobsStorage": "x"})
    lifecycle = {
        name
        for name, field in Settings.model_fields.items()
        if field.alias and field.alias.startswith(("JOB_", "RETRY_BACKOFF", "RECONCILE_"))
    }
    assert {n: getattr(values, n) for n in lifecycle} == {n: getattr(defaults, n) for n in lifecycle}
    assert SAMPLE["Values"]["RECONCILE_SCHEDULE"] == "0 */1 * * * *"
