"""infra/bicep agrees with the app: queue properties and the names of every app setting / container variable."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter

from shared.settings import QueueProperties, Settings
from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import Expr

# QueueProperties field -> (ARM queue property, main.bicep parameter, servicebus.config.json property)
QUEUE_FIELDS = {
    "lock_duration": ("lockDuration", "queueLockDuration", "LockDuration"),
    "max_delivery_count": ("maxDeliveryCount", "queueMaxDeliveryCount", "MaxDeliveryCount"),
    "dead_lettering_on_message_expiration": (
        "deadLetteringOnMessageExpiration",
        "queueDeadLetteringOnMessageExpiration",
        "DeadLetteringOnMessageExpiration",
    ),
    "requires_duplicate_detection": (
        "requiresDuplicateDetection",
        "queueRequiresDuplicateDetection",
        "RequiresDuplicateDetection",
    ),
    "duplicate_detection_history_time_window": (
        "duplicateDetectionHistoryTimeWindow",
        "queueDuplicateDetectionHistoryTimeWindow",
        "DuplicateDetectionHistoryTimeWindow",
    ),
    "default_message_time_to_live": (
        "defaultMessageTimeToLive",
        "queueDefaultMessageTimeToLive",
        "DefaultMessageTimeToLive",
    ),
}

# Names in the Function App / worker environment that are not Settings fields, and who reads them.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__credential": "Functions host: identity-based host storage (Flex Consumption)",
    "AzureWebJobsStorage__clientId": "Functions host: which user-assigned identity for host storage",
    "ServiceBusConnection__credential": "Functions Service Bus extension: identity-based binding connection",
    "ServiceBusConnection__clientId": "Functions Service Bus extension: which user-assigned identity",
    "AZURE_CLIENT_ID": "azure-identity DefaultAzureCredential: which user-assigned identity",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Functions host and azure-monitor exporter: Entra ingestion",
}


def _as_python(raw: Any, like: Any) -> Any:
    """A Bicep/JSON literal converted to the type of the QueueProperties default it is compared with."""
    if isinstance(like, timedelta):
        return TypeAdapter(timedelta).validate_python(raw)  # ISO 8601 durations: PT1M, P1D
    return raw


def _emulator_queue() -> dict[str, Any]:
    config = json.loads((bt.REPO / "local" / "servicebus.config.json").read_text())
    (namespace,) = config["UserConfig"]["Namespaces"]
    (queue,) = [q for q in namespace["Queues"] if q["Name"] == Settings.model_fields["jobs_queue"].default]
    properties: dict[str, Any] = queue["Properties"]
    return properties


@pytest.mark.parametrize("field", sorted(QUEUE_FIELDS))
def test_queue_properties_agree_everywhere(field: str) -> None:
    arm_name, main_param, emulator_name = QUEUE_FIELDS[field]
    expected = getattr(QueueProperties(), field)
    servicebus = bt.module("servicebus")
    sources = {
        "modules/servicebus.bicep default": servicebus.params[arm_name].value,
        "main.bicep default": bt.main().params[main_param].value,
        "main.bicepparam": bt.bicepparam().variables[main_param].value,
        "local/servicebus.config.json": _emulator_queue()[emulator_name],
    }
    assert {where: _as_python(raw, expected) for where, raw in sources.items()} == dict.fromkeys(sources, expected)


def test_the_queue_resource_and_main_wire_the_parameters_through() -> None:
    queue = bt.module("servicebus").resources_of_type("Microsoft.ServiceBus/namespaces/queues")[0].value
    passed = bt.main().modules["serviceBus"].value["params"]
    for arm_name, main_param, _ in QUEUE_FIELDS.values():
        assert queue["properties"][arm_name] == Expr(arm_name)
        assert passed[arm_name] == Expr(main_param)
    assert set(QUEUE_FIELDS) == set(QueueProperties.model_fields)


def test_queue_name_agrees() -> None:
    default = Settings.model_fields["jobs_queue"].default
    assert bt.module("servicebus").params["queueName"].value == default
    assert bt.main().params["queueName"].value == default
    assert bt.bicepparam().variables["queueName"].value == default


def function_app_setting_names() -> list[str]:
    site = bt.module("functionapp").resources_of_type("Microsoft.Web/sites")[0].value
    return [s["name"] for s in bt.dig(site, "properties", "siteConfig", "appSettings")]


def worker_environment_names() -> list[str]:
    return list(bt.module("gpu-vmss").variables["workerEnvironment"].value)


def unknown_setting_names(names: list[str]) -> list[str]:
    aliases = {f.alias or name for name, f in Settings.model_fields.items()} | set(QUEUE_ENVIRONMENT)
    return [n for n in names if n not in aliases and n not in PLATFORM_SETTINGS]


# The QueueProperties the app reads from its environment: alias -> QUEUE_FIELDS key.
QUEUE_ENVIRONMENT = {f.alias: name for name, f in QueueProperties.model_fields.items() if f.alias}


def function_app_settings() -> dict[str, Any]:
    site = bt.module("functionapp").resources_of_type("Microsoft.Web/sites")[0].value
    return {s["name"]: s["value"] for s in bt.dig(site, "properties", "siteConfig", "appSettings")}


def worker_environment() -> dict[str, Any]:
    return dict(bt.module("gpu-vmss").variables["workerEnvironment"].value)


@pytest.mark.parametrize(
    ("module_file", "module_name", "environment"),
    [("functionapp", "functionApp", function_app_settings), ("gpu-vmss", "gpuWorkers", worker_environment)],
    ids=["functions", "worker"],
)
def test_queue_settings_come_from_the_queues_own_parameters(
    module_file: str, module_name: str, environment: Any
) -> None:
    """QUEUE_MAX_DELIVERY_COUNT in each environment is the very parameter the queue's maxDeliveryCount is set from."""
    assert QUEUE_ENVIRONMENT, "the app reads at least QUEUE_MAX_DELIVERY_COUNT"
    env = environment()
    passed = bt.main().modules[module_name].value["params"]
    module_params = bt.module(module_file).params
    for alias, field in QUEUE_ENVIRONMENT.items():
        _, main_param, _ = QUEUE_FIELDS[field]
        assert env[alias] == Expr(f"string({main_param})"), alias
        assert passed[main_param] == Expr(main_param), f"main.bicep passes {main_param} to {module_name}"
        assert module_params[main_param].value is None, f"{module_file}: no default of its own for {main_param}"


@pytest.mark.parametrize("names", [function_app_setting_names, worker_environment_names], ids=["functions", "worker"])
def test_every_setting_name_is_a_settings_alias_or_a_platform_setting(names: Any) -> None:
    found = names()
    assert len(found) == len(set(found)), "a setting is defined twice"
    assert unknown_setting_names(found) == []


@pytest.mark.parametrize("names", [function_app_setting_names, worker_environment_names], ids=["functions", "worker"])
def test_the_environment_builds_valid_settings(names: Any) -> None:
    """With placeholder values the names alone must satisfy Settings' one-way-to-each-backend rule, keyless."""
    env = dict.fromkeys(names(), "x")
    env.update({"POSTGRES_PORT": "5432"})
    settings = Settings.from_env({k: v for k, v in env.items() if not k.startswith(("MAX_", "WORKER_", "QUEUE_"))})
    assert settings.servicebus_connection_string is None
    assert settings.storage_connection_string is None
    assert settings.database_url is None


def test_the_alias_check_catches_a_typo() -> None:
    assert unknown_setting_names(["ServiceBusConnection__fullyQualifiedNamespace", "POSTGRES_HOSTNAME"]) == [
        "POSTGRES_HOSTNAME"
    ]
