"""local.settings.sample.json documents every setting, and its values make valid Settings."""

from __future__ import annotations

import json
from pathlib import Path

from shared.settings import QueueProperties, Settings

SAMPLE = json.loads((Path(__file__).resolve().parents[2] / "local.settings.sample.json").read_text())


def test_every_setting_is_documented() -> None:
    fields = [*Settings.model_fields.values(), *QueueProperties.model_fields.values()]
    aliases = {field.alias for field in fields if field.alias}
    assert "QUEUE_MAX_DELIVERY_COUNT" in aliases
    assert aliases - set(SAMPLE["Documentation"]) == set()


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
