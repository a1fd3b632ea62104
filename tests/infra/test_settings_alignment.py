"""infra/bicep agrees with the app and the local stack: the queues' names and properties, the settings an operator
tunes in main.bicep, the other settings Bicep sets, and the names of every app setting / container variable."""

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

# The jobs queues (jobs and jobs-high, from the same parameters), as infra/bicep and local/servicebus.config.json must
# both declare them. The app reads none of these (a job's attempts are bounded by JOB_MAX_ATTEMPTS, not by the delivery
# count), so the expected values live here: ARM property -> (main.bicep parameter, servicebus.config.json property,
# value). modules/servicebus.bicep's parameter has the ARM property's name.
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

# The job-events queue (webhook delivery events): ARM property -> (modules/servicebus.bicep parameter,
# servicebus.config.json property, value). Webhook attempts are bounded by WEBHOOK_MAX_ATTEMPTS; the delivery count
# only by crashes of the delivery Function.
EVENTS_QUEUE: dict[str, tuple[str, str, Any]] = {
    "lockDuration": ("eventsLockDuration", "LockDuration", timedelta(minutes=1)),
    "maxDeliveryCount": ("eventsMaxDeliveryCount", "MaxDeliveryCount", 3),
    "deadLetteringOnMessageExpiration": (
        "eventsDeadLetteringOnMessageExpiration",
        "DeadLetteringOnMessageExpiration",
        True,
    ),
    "requiresDuplicateDetection": ("eventsRequiresDuplicateDetection", "RequiresDuplicateDetection", True),
    "duplicateDetectionHistoryTimeWindow": (
        "eventsDuplicateDetectionHistoryTimeWindow",
        "DuplicateDetectionHistoryTimeWindow",
        timedelta(minutes=10),
    ),
    "defaultMessageTimeToLive": ("eventsDefaultMessageTimeToLive", "DefaultMessageTimeToLive", timedelta(days=1)),
}

# Every queue: Settings alias of its name -> (modules/servicebus.bicep name parameter and output, its properties as
# {ARM property: the servicebus.bicep parameter it is set from}, the expected values).
QUEUES: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {
    "JOBS_QUEUE_NAME": ("queueName", {arm: arm for arm in QUEUE}, {arm: v for arm, (_, _, v) in QUEUE.items()}),
    "JOBS_HIGH_QUEUE_NAME": (  # the same parameters as jobs: the two can never drift apart
        "highPriorityQueueName",
        {arm: arm for arm in QUEUE},
        {arm: v for arm, (_, _, v) in QUEUE.items()},
    ),
    "JOB_EVENTS_QUEUE_NAME": (
        "eventsQueueName",
        {arm: param for arm, (param, _, _) in EVENTS_QUEUE.items()},
        {arm: v for arm, (_, _, v) in EVENTS_QUEUE.items()},
    ),
}
EMULATOR_NAMES = {arm: emulator for arm, (_, emulator, _) in QUEUE.items()}  # the same spelling for every queue

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
# The job API's settings an operator tunes (issue 9): Settings alias -> the main.bicep parameter it comes from.
JOB_API = {
    "MAX_BACKLOG": "maxBacklog",
    "WEBHOOK_TIMEOUT": "webhookTimeoutSeconds",
    "WEBHOOK_MAX_ATTEMPTS": "webhookMaxAttempts",
    "WEBHOOK_BACKOFF": "webhookBackoff",
    "WEBHOOK_BACKOFF_MAX": "webhookBackoffMax",
    "WORKER_HIGH_PRIORITY_BURST": "workerHighPriorityBurst",
    "IMAGE_URL_ALLOWED_HOSTS": "imageUrlAllowedHosts",  # submit checks it; the worker again before a read
}
FROM_MAIN = {**LIFECYCLE, **JOB_API}
# Who reads which: the reconciler, submit and the webhook deliverer run in the Function App, attempts in the worker.
# Each is set exactly where it is read.
READS = {
    "functions": {
        "JOB_MAX_ATTEMPTS",
        "RECONCILE_SCHEDULE",
        "RECONCILE_RESEND_AFTER",
        "RECONCILE_BATCH",
        "MAX_BACKLOG",
        "WEBHOOK_TIMEOUT",
        "WEBHOOK_MAX_ATTEMPTS",
        "WEBHOOK_BACKOFF",
        "WEBHOOK_BACKOFF_MAX",
        "IMAGE_URL_ALLOWED_HOSTS",
    },
    "worker": {
        "JOB_MAX_ATTEMPTS",
        "JOB_LEASE",
        "JOB_TIMEOUT",
        "RETRY_BACKOFF",
        "RETRY_BACKOFF_MAX",
        "WORKER_HIGH_PRIORITY_BURST",
        "IMAGE_URL_ALLOWED_HOSTS",
    },
}
# Settings Bicep sets from a module parameter's own default (nobody tunes them per deployment):
# (environment, alias) -> the module parameter.
MODULE_DEFAULTS = {
    ("functions", "MAX_UPLOAD_BYTES"): "maxUploadBytes",
    ("functions", "MAX_BATCH_SIZE"): "maxBatchSize",
    ("functions", "MAX_INPUT_BYTES"): "maxInputBytes",
    ("worker", "WORKER_REGISTRY_INTERVAL"): "registryIntervalSeconds",
}

# Names in the Function App / worker environment that are not Settings fields, and who reads them.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__credential": "Functions host: identity-based host storage (Flex Consumption)",
    "AzureWebJobsStorage__clientId": "Functions host: which user-assigned identity for host storage",
    "AzureWebJobsStorage__tableServiceUri": "Functions host: diagnostic events in host storage's tables",
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


def settings_default(alias: str) -> Any:
    """The default of the Settings field with this alias (shared/settings.py)."""
    for field in Settings.model_fields.values():
        if field.alias == alias:
            return field.default
    pytest.fail(f"{alias} is not a Settings alias (shared/settings.py)")


def _emulator_queues() -> list[dict[str, Any]]:
    config = json.loads((bt.REPO / "local" / "servicebus.config.json").read_text())
    (namespace,) = config["UserConfig"]["Namespaces"]
    queues: list[dict[str, Any]] = namespace["Queues"]
    return queues


def _emulator_queue(name: str | None = None) -> dict[str, Any]:
    name = name or bt.module("servicebus").params["queueName"].value
    (queue,) = [q for q in _emulator_queues() if q["Name"] == name]
    properties: dict[str, Any] = queue["Properties"]
    return properties


def _queue(name_param: str) -> bt.Declaration:
    """The queue resource of modules/servicebus.bicep named by this parameter."""
    found = [
        r
        for r in bt.module("servicebus").resources_of_type("Microsoft.ServiceBus/namespaces/queues")
        if r.value["name"] == Expr(name_param)
    ]
    assert len(found) == 1, f"one queue named {name_param}, found {len(found)}"
    return found[0]


def _queue_resource(name_param: str) -> dict[str, Any]:
    body: dict[str, Any] = _queue(name_param).value
    return body


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
    queue = _queue_resource("queueName")
    passed = bt.main().modules["serviceBus"].value["params"]
    for arm_name, (main_param, _, _) in QUEUE.items():
        assert queue["properties"][arm_name] == Expr(arm_name)
        assert passed[arm_name] == Expr(main_param)
    declared = {name for name in bt.module("servicebus").params if name in queue["properties"]}
    assert declared == set(QUEUE), "every queue property parameter is checked against the emulator's config"


@pytest.mark.parametrize("alias", sorted(QUEUES))
def test_every_queue_is_set_from_its_parameters(alias: str) -> None:
    name_param, from_params, _ = QUEUES[alias]
    properties = _queue_resource(name_param)["properties"]
    assert {arm: properties[arm] for arm in from_params} == {arm: Expr(p) for arm, p in from_params.items()}
    assert (properties["requiresSession"], properties["enablePartitioning"]) == (False, False)


@pytest.mark.parametrize("alias", sorted(QUEUES))
def test_every_queue_agrees_with_the_emulator(alias: str) -> None:
    """Each queue's Bicep defaults, the emulator's config and the expected values are one set of values."""
    name_param, from_params, expected = QUEUES[alias]
    module = bt.module("servicebus")
    bicep = {arm: _as_python(module.params[p].value, expected[arm]) for arm, p in from_params.items()}
    emulator_properties = _emulator_queue(module.params[name_param].value)
    emulator = {arm: _as_python(emulator_properties[EMULATOR_NAMES[arm]], expected[arm]) for arm in expected}
    assert bicep == expected
    assert emulator == expected


def test_the_events_queue_parameters_are_the_checked_ones() -> None:
    declared = {name for name in bt.module("servicebus").params if name.startswith("events")}
    assert declared == {"eventsQueueName"} | {param for param, _, _ in EVENTS_QUEUE.values()}


def test_the_module_declares_exactly_these_queues_and_the_emulator_too() -> None:
    module = bt.module("servicebus")
    resources = module.resources_of_type("Microsoft.ServiceBus/namespaces/queues")
    assert sorted(r.value["name"].text for r in resources) == sorted(name for name, _, _ in QUEUES.values())
    names = [q["Name"] for q in _emulator_queues()]
    assert names == [module.params[name].value for name, _, _ in QUEUES.values()]
    assert names[0] == "jobs", "the local stack takes the first queue as JOBS_QUEUE_NAME (local/services.py)"


@pytest.mark.parametrize("alias", sorted(QUEUES))
def test_queue_names_agree(alias: str) -> None:
    name_param = QUEUES[alias][0]
    default = settings_default(alias)
    assert bt.module("servicebus").params[name_param].value == default
    assert bt.module("servicebus").outputs[name_param].value == Expr(f"{_queue(name_param).name}.name"), (
        "the output is the deployed name"
    )
    if alias == "JOBS_QUEUE_NAME":
        assert bt.main().params["queueName"].value == default
        assert bt.bicepparam().variables["queueName"].value == default


# Modules that need the queue names, each a parameter of the servicebus.bicep output's name.
QUEUE_CONSUMERS = {
    "functionApp": set(QUEUES),
    "gpuWorkers": set(QUEUES),
    "roles": set(QUEUES),
    "alerts": set(QUEUES),
    "autoscale": {"JOBS_QUEUE_NAME", "JOBS_HIGH_QUEUE_NAME"},
}


@pytest.mark.parametrize("module_name", sorted(QUEUE_CONSUMERS))
def test_main_passes_every_module_the_queue_names_it_needs(module_name: str) -> None:
    passed = bt.main().modules[module_name].value["params"]
    for alias in QUEUE_CONSUMERS[module_name]:
        name_param = QUEUES[alias][0]
        assert passed[name_param] == Expr(f"serviceBus.outputs.{name_param}"), (module_name, name_param)


@pytest.mark.parametrize("environment", ["functions", "worker"])
def test_both_processes_get_every_queue_name(environment: str) -> None:
    values, module_file, _ = ENVIRONMENTS[environment]
    declared = bt.module(module_file).params
    for alias, (name_param, _, _) in QUEUES.items():
        assert values()[alias] == Expr(name_param), (environment, alias)
        assert declared[name_param].value is None, f"{module_file}: {name_param} comes from main.bicep only"


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
def test_operator_settings_are_set_exactly_where_they_are_read(environment: str) -> None:
    values = ENVIRONMENTS[environment][0]()
    assert set(values) & set(FROM_MAIN) == READS[environment]
    for alias in READS[environment]:
        assert main_parameter_behind(environment, alias) == FROM_MAIN[alias], alias


def test_job_max_attempts_comes_from_one_parameter_for_the_worker_and_the_reconciler() -> None:
    """The worker fails the last attempt and the reconciler exhausts a job past it: they must count to one number."""
    sources = {environment: main_parameter_behind(environment, "JOB_MAX_ATTEMPTS") for environment in ENVIRONMENTS}
    assert sources == dict.fromkeys(ENVIRONMENTS, "jobMaxAttempts")
    assert bt.main().params["jobMaxAttempts"].decorators["minValue"] == [1]


@pytest.mark.parametrize("alias", sorted(FROM_MAIN))
def test_main_parameter_defaults_are_the_apps(alias: str) -> None:
    expected = settings_default(alias)
    default = bt.main().params[FROM_MAIN[alias]].value
    assert _as_python(default, expected) == expected


@pytest.mark.parametrize(("environment", "alias"), sorted(MODULE_DEFAULTS))
def test_module_defaults_are_the_apps(environment: str, alias: str) -> None:
    values, module_file, module_name = ENVIRONMENTS[environment]
    param = MODULE_DEFAULTS[environment, alias]
    assert values()[alias] == Expr(f"string({param})")
    assert param not in bt.main().modules[module_name].value["params"], "the module's own default is deployed"
    expected = settings_default(alias)
    assert _as_python(bt.module(module_file).params[param].value, expected) == expected


def test_webhooks_never_reach_private_addresses_in_azure() -> None:
    """WEBHOOK_ALLOW_PRIVATE (http:// and loopback/private targets) is for the local stack only: a literal false in
    the Function App, set nowhere else, and no parameter could turn it on."""
    assert function_app_settings()["WEBHOOK_ALLOW_PRIVATE"] == "false"
    assert "WEBHOOK_ALLOW_PRIVATE" not in worker_environment()
    assert settings_default("WEBHOOK_ALLOW_PRIVATE") is False
    for path in bt.bicep_files():
        assert [p for p in bt.load(path).params if "private" in p.lower()] == [], path.name


def test_the_bicep_defaults_make_valid_lifecycle_settings() -> None:
    """Settings' own checks (JOB_TIMEOUT longer than JOB_LEASE, at least one attempt) hold for the Bicep defaults."""
    env = {alias: str(bt.main().params[param].value) for alias, param in LIFECYCLE.items()}
    settings = Settings.from_env({**env, "DATABASE_URL": "x", "ServiceBusConnection": "x", "AzureWebJobsStorage": "x"})
    assert settings.job_timeout > settings.job_lease


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


def deployed_values(environment: str) -> dict[str, str]:
    """The environment as a default deployment sets it: literals as written, a parameter's value from its default
    (the module's own, else main.bicep's), anything known only at deployment time (host names, ids) as 'x'."""
    values, module_file, module_name = ENVIRONMENTS[environment]
    declared = bt.module(module_file).params
    passed = bt.main().modules[module_name].value["params"]
    env = {}
    for alias, value in values().items():
        if isinstance(value, str):
            env[alias] = value
            continue
        match = re.fullmatch(r"(?:string\((\w+)\)|(\w+))", value.text)
        param = (match[1] or match[2]) if match else None
        default = declared[param].value if param in declared else None
        if default is None and param in passed and isinstance(passed[param], Expr):
            main_param = bt.main().params.get(passed[param].text)
            default = main_param.value if main_param is not None else None
        if isinstance(default, bool):
            env[alias] = str(default).lower()
        elif isinstance(default, (int, str)):
            env[alias] = str(default)
        else:
            env[alias] = "x"
    return env


@pytest.mark.parametrize("environment", sorted(ENVIRONMENTS))
def test_the_deployed_environment_builds_valid_settings(environment: str) -> None:
    """Every value a default deployment sets parses, and the names satisfy Settings' one-way-to-each-backend rule,
    keyless."""
    env = deployed_values(environment)
    assert env["JOB_MAX_ATTEMPTS"] == "5"  # the helper followed main.bicep's parameter
    settings = Settings.from_env(env)
    assert settings.servicebus_connection_string is None
    assert settings.storage_connection_string is None
    assert settings.database_url is None


def test_the_alias_check_catches_a_typo() -> None:
    assert unknown_setting_names(["ServiceBusConnection__fullyQualifiedNamespace", "POSTGRES_HOSTNAME"]) == [
        "POSTGRES_HOSTNAME"
    ]
