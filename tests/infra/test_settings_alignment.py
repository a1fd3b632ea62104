"""infra/bicep agrees with the app and the local stack: the queue's properties, the lifecycle settings, and the names
of every app setting / container variable."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter

from shared.settings import Settings
from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import Expr

# The jobs queue, as infra/bicep and local/servicebus.config.json must both declare it. The app reads none of these
# (a job's attempts are bounded by JOB_MAX_ATTEMPTS, not by the delivery count), so the expected values live here:
# ARM property -> (main.bicep parameter, servicebus.config.json property, value).
QUEUE: dict[str, tuple[str, str, Any]] = {
    # The worker renews the lock while it works (for JOB_TIMEOUT + grace + JOB_LEASE, computed in code).
    "lockDuration": ("queueLockDuration", "LockDuration", timedelta(minutes=1)),
    # Deliveries are spent only on crashes and outages (a claim completes its message); past this many the broker
    # dead-letters the message and the reconciler re-drives a still-queued job.
    "maxDeliveryCount": ("queueMaxDeliveryCount", "MaxDeliveryCount", 5),
    # An expired message is dead-lettered (TTLExpiredException): the reconciler fails its job message_expired.
    "deadLetteringOnMessageExpiration": (
        "queueDeadLetteringOnMessageExpiration",
        "DeadLetteringOnMessageExpiration",
        True,
    ),
    # Message id {job_id}:{generation}: a retried send of one generation is dropped, a new generation never is.
    "requiresDuplicateDetection": ("queueRequiresDuplicateDetection", "RequiresDuplicateDetection", True),
    "duplicateDetectionHistoryTimeWindow": (
        "queueDuplicateDetectionHistoryTimeWindow",
        "DuplicateDetectionHistoryTimeWindow",
        timedelta(minutes=10),
    ),
    "defaultMessageTimeToLive": ("queueDefaultMessageTimeToLive", "DefaultMessageTimeToLive", timedelta(days=1)),
}

# The lifecycle settings Bicep sets: Settings alias -> the main.bicep parameter it comes from.
LIFECYCLE = {
    "JOB_MAX_ATTEMPTS": "jobMaxAttempts",
    "JOB_LEASE": "jobLease",
    "JOB_TIMEOUT": "jobTimeout",
    "RETRY_BACKOFF": "retryBackoff",
    "RETRY_BACKOFF_MAX": "retryBackoffMax",
    "RECONCILE_SCHEDULE": "reconcileSchedule",
    "RECONCILE_RESEND_AFTER": "reconcileResendAfter",
    "RECONCILE_BATCH": "reconcileBatch",
}
# Who reads which: the reconciler runs in the Function App (functions/reconciler.py), attempts in the worker.
READS = {
    "functions": {"JOB_MAX_ATTEMPTS", "RECONCILE_SCHEDULE", "RECONCILE_RESEND_AFTER", "RECONCILE_BATCH"},
    "worker": {"JOB_MAX_ATTEMPTS", "JOB_LEASE", "JOB_TIMEOUT", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX"},
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
    """A Bicep/JSON literal converted to the type of the value it is compared with."""
    if isinstance(like, timedelta):
        return TypeAdapter(timedelta).validate_python(raw)  # ISO 8601 durations: PT1M, P1D
    return raw


def _emulator_queue() -> dict[str, Any]:
    config = json.loads((bt.REPO / "local" / "servicebus.config.json").read_text())
    (namespace,) = config["UserConfig"]["Namespaces"]
    (queue,) = [q for q in namespace["Queues"] if q["Name"] == Settings.model_fields["jobs_queue"].default]
    properties: dict[str, Any] = queue["Properties"]
    return properties


@pytest.mark.parametrize("arm_name", sorted(QUEUE))
def test_queue_properties_agree_everywhere(arm_name: str) -> None:
    main_param, emulator_name, expected = QUEUE[arm_name]
    sources = {
        "modules/servicebus.bicep default": bt.module("servicebus").params[arm_name].value,
        "main.bicep default": bt.main().params[main_param].value,
        "main.bicepparam": bt.bicepparam().variables[main_param].value,
        "local/servicebus.config.json": _emulator_queue()[emulator_name],
    }
    assert {where: _as_python(raw, expected) for where, raw in sources.items()} == dict.fromkeys(sources, expected)


def test_the_queue_resource_and_main_wire_the_parameters_through() -> None:
    queue = bt.module("servicebus").resources_of_type("Microsoft.ServiceBus/namespaces/queues")[0].value
    passed = bt.main().modules["serviceBus"].value["params"]
    for arm_name, (main_param, _, _) in QUEUE.items():
        assert queue["properties"][arm_name] == Expr(arm_name)
        assert passed[arm_name] == Expr(main_param)
    declared = {name for name in bt.module("servicebus").params if name in queue["properties"]}
    assert declared == set(QUEUE), "every queue property parameter is checked against the emulator's config"


def test_queue_name_agrees() -> None:
    default = Settings.model_fields["jobs_queue"].default
    assert bt.module("servicebus").params["queueName"].value == default
    assert bt.main().params["queueName"].value == default
    assert bt.bicepparam().variables["queueName"].value == default


def function_app_settings() -> dict[str, Any]:
    site = bt.module("functionapp").resources_of_type("Microsoft.Web/sites")[0].value
    return {s["name"]: s["value"] for s in bt.dig(site, "properties", "siteConfig", "appSettings")}


def function_app_setting_names() -> list[str]:
    site = bt.module("functionapp").resources_of_type("Microsoft.Web/sites")[0].value
    return [s["name"] for s in bt.dig(site, "properties", "siteConfig", "appSettings")]


def worker_environment() -> dict[str, Any]:
    return dict(bt.module("gpu-vmss").variables["workerEnvironment"].value)


def worker_environment_names() -> list[str]:
    return list(worker_environment())


def unknown_setting_names(names: list[str]) -> list[str]:
    aliases = {f.alias or name for name, f in Settings.model_fields.items()}
    return [n for n in names if n not in aliases and n not in PLATFORM_SETTINGS]


# (environment, its Bicep module file, its module declaration in main.bicep)
ENVIRONMENTS = {
    "functions": (function_app_settings, "functionapp", "functionApp"),
    "worker": (worker_environment, "gpu-vmss", "gpuWorkers"),
}


def main_parameter_behind(environment: str, alias: str) -> str:
    """The main.bicep parameter that ``alias`` in ``environment`` is set from, through its module's parameter of the
    same name, which has no default of its own (so main.bicep's value is the one deployed)."""
    values, module_file, module_name = ENVIRONMENTS[environment]
    value = values()[alias]
    assert isinstance(value, Expr), f"{environment} {alias} is a literal, not a parameter: {value!r}"
    match = re.fullmatch(r"(?:string\((\w+)\)|(\w+))", value.text)
    assert match, f"{environment} {alias} = {value.text}: not a parameter"
    param = match[1] or match[2]
    declared = bt.module(module_file).params
    assert param in declared, f"{module_file}: {param} is not a parameter"
    assert declared[param].value is None, f"{module_file}: no default of its own for {param}"
    passed = bt.main().modules[module_name].value["params"][param]
    assert isinstance(passed, Expr), f"main.bicep passes {module_name} a literal {param}"
    assert passed.text in bt.main().params, f"main.bicep passes {module_name}.{param} = {passed.text}, not a parameter"
    return passed.text


@pytest.mark.parametrize("environment", sorted(READS))
def test_lifecycle_settings_are_set_where_they_are_read(environment: str) -> None:
    values = ENVIRONMENTS[environment][0]()
    assert READS[environment] <= set(values)
    for alias in READS[environment]:
        assert main_parameter_behind(environment, alias) == LIFECYCLE[alias], alias


def test_job_max_attempts_comes_from_one_parameter_for_the_worker_and_the_reconciler() -> None:
    """The worker fails the last attempt and the reconciler exhausts a job past it: they must count to one number."""
    sources = {environment: main_parameter_behind(environment, "JOB_MAX_ATTEMPTS") for environment in ENVIRONMENTS}
    assert sources == dict.fromkeys(ENVIRONMENTS, "jobMaxAttempts")
    assert bt.main().params["jobMaxAttempts"].decorators["minValue"] == [1]


@pytest.mark.parametrize("alias", sorted(LIFECYCLE))
def test_lifecycle_defaults_are_the_apps(alias: str) -> None:
    field = next(f for f in Settings.model_fields.values() if f.alias == alias)
    default = bt.main().params[LIFECYCLE[alias]].value
    assert _as_python(default, field.default) == field.default


def test_the_bicep_defaults_make_valid_lifecycle_settings() -> None:
    """Settings' own checks (JOB_TIMEOUT longer than JOB_LEASE, at least one attempt) hold for the Bicep defaults."""
    env = {alias: str(bt.main().params[param].value) for alias, param in LIFECYCLE.items()}
    settings = Settings.from_env({**env, "DATABASE_URL": "x", "ServiceBusConnection": "x", "AzureWebJobsStorage": "x"})
    assert settings.lock_renewal_limit > settings.job_timeout > settings.job_lease


def _timer_setting_references() -> set[str]:
    """%NAME% app-setting references in the timer triggers of functions/*.py (the host resolves them at indexing)."""
    found: set[str] = set()
    for path in sorted((bt.REPO / "functions").glob("*.py")):
        for schedule in re.findall(r"timer_trigger\([^)]*?schedule=\"([^\"]+)\"", path.read_text()):
            found |= set(re.findall(r"%([^%]+)%", schedule))
    return found


def test_every_timer_schedule_setting_is_an_app_setting() -> None:
    """The host cannot index a timer function whose schedule names a missing app setting."""
    references = _timer_setting_references()
    assert "RECONCILE_SCHEDULE" in references
    assert references <= set(function_app_setting_names())


@pytest.mark.parametrize("names", [function_app_setting_names, worker_environment_names], ids=["functions", "worker"])
def test_every_setting_name_is_a_settings_alias_or_a_platform_setting(names: Any) -> None:
    found = names()
    assert len(found) == len(set(found)), "a setting is defined twice"
    assert unknown_setting_names(found) == []


@pytest.mark.parametrize("names", [function_app_setting_names, worker_environment_names], ids=["functions", "worker"])
def test_the_environment_builds_valid_settings(names: Any) -> None:
    """With placeholder values the names alone must satisfy Settings' one-way-to-each-backend rule, keyless."""
    env = dict.fromkeys(names(), "x")
    env.update({alias: str(bt.main().params[param].value) for alias, param in LIFECYCLE.items() if alias in env})
    typed = ("MAX_", "WORKER_")  # numbers and flags: their defaults are fine here
    settings = Settings.from_env({k: v for k, v in env.items() if not k.startswith(typed)})
    assert settings.servicebus_connection_string is None
    assert settings.storage_connection_string is None
    assert settings.database_url is None


def test_the_alias_check_catches_a_typo() -> None:
    assert unknown_setting_names(["ServiceBusConnection__fullyQualifiedNamespace", "POSTGRES_HOSTNAME"]) == [
        "POSTGRES_HOSTNAME"
    ]
