"""Structural checks of infra/bicep: the resource set, keyless settings, scaling, roles, alerts and outputs."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import Expr, dig


def one(module: str, resource_type: str) -> dict[str, Any]:
    found = bt.module(module).resources_of_type(resource_type)
    assert len(found) == 1, f"{module}: expected one {resource_type}, found {len(found)}"
    body = found[0].value
    assert isinstance(body, dict)
    return body


def test_the_resource_set() -> None:
    declared = {r.resource_type for p in bt.bicep_files() for r in bt.load(p).resources.values() if not r.existing}
    assert declared >= {
        "Microsoft.Resources/resourceGroups",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.OperationalInsights/workspaces",
        "Microsoft.Insights/components",
        "Microsoft.Storage/storageAccounts",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Microsoft.Storage/storageAccounts/managementPolicies",
        "Microsoft.ServiceBus/namespaces",
        "Microsoft.ServiceBus/namespaces/queues",
        "Microsoft.DBforPostgreSQL/flexibleServers",
        "Microsoft.DBforPostgreSQL/flexibleServers/databases",
        "Microsoft.DBforPostgreSQL/flexibleServers/administrators",
        "Microsoft.ContainerRegistry/registries",
        "Microsoft.Web/serverfarms",
        "Microsoft.Web/sites",
        "Microsoft.Compute/virtualMachineScaleSets",
        "Microsoft.Insights/autoscalesettings",
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.Insights/metricAlerts",
        "Microsoft.Insights/actionGroups",
    }


@pytest.mark.parametrize("path", bt.bicep_files(), ids=lambda p: p.name)
def test_no_preview_api_versions(path: Path) -> None:
    versions = {r.type for r in bt.load(path).resources.values()}
    assert [v for v in versions if "preview" in v] == []


def test_no_secret_anywhere() -> None:
    text = "\n".join(p.read_text() for p in bt.BICEP_DIR.rglob("*") if p.is_file())
    for forbidden in ("listKeys(", "AccountKey=", "SharedAccessKey", "administratorLoginPassword", "@secure()"):
        assert forbidden not in text


def test_names_come_from_a_unique_string_resource_token() -> None:
    main = bt.main()
    token = main.variables["resourceToken"].value
    assert isinstance(token, Expr)
    assert "uniqueString(subscription().id, environmentName, location)" in token.text
    names = main.variables["names"].value
    assert all(isinstance(n, Expr) and "${resourceToken}" in n.text for n in names.values()), names
    for path in bt.MODULES_DIR.glob("*.bicep"):  # modules name their top-level resources from parameters
        for r in bt.load(path).resources.values():
            if "parent" in r.value:  # child resources have fixed names ('default', 'ftp', ...)
                continue
            name = r.value.get("name")
            assert isinstance(name, Expr), f"{path.name}: {r.name} has a literal name {name!r}"


def test_storage_is_keyless_private_and_expires_inputs() -> None:
    props = one("storage", "Microsoft.Storage/storageAccounts")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["defaultToOAuthAuthentication"] is True
    storage = bt.module("storage")
    containers = {
        c.value["name"].text
        for c in storage.resources_of_type("Microsoft.Storage/storageAccounts/blobServices/containers")
    }
    assert containers >= {"imagesContainerName", "resultsContainerName"}
    assert storage.params["imagesContainerName"].value == "images"
    assert storage.params["resultsContainerName"].value == "results"
    for c in storage.resources_of_type("Microsoft.Storage/storageAccounts/blobServices/containers"):
        assert c.value["properties"]["publicAccess"] == "None"
    policy = one("storage", "Microsoft.Storage/storageAccounts/managementPolicies")
    rule = dig(policy, "properties", "policy", "rules", 0)
    assert dig(rule, "definition", "actions", "baseBlob", "delete", "daysAfterModificationGreaterThan") == Expr(
        "inputRetentionDays"
    )
    assert dig(rule, "definition", "filters", "prefixMatch") == [Expr("'${imagesContainerName}/'")]
    assert bt.main().modules["storage"].value["params"]["inputRetentionDays"] == Expr("inputRetentionDays")


def test_service_bus_has_local_auth_disabled_and_a_tier_parameter() -> None:
    namespace = one("servicebus", "Microsoft.ServiceBus/namespaces")
    assert namespace["properties"]["disableLocalAuth"] is True
    assert namespace["properties"]["minimumTlsVersion"] == "1.2"
    sku = bt.module("servicebus").params["skuName"]
    assert sku.value == "Standard"
    assert sku.decorators["allowed"] == [["Standard", "Premium"]]


def test_postgres_is_entra_only_with_both_identities_registered() -> None:
    server = one("postgres", "Microsoft.DBforPostgreSQL/flexibleServers")
    assert server["properties"]["authConfig"] == {
        "activeDirectoryAuth": "Enabled",
        "passwordAuth": "Disabled",
        "tenantId": Expr("tenantId"),
    }
    assert "administratorLogin" not in server["properties"]
    assert dig(server, "properties", "highAvailability", "mode") == Expr("highAvailability")
    assert dig(server, "properties", "network", "publicNetworkAccess") == Expr("publicNetworkAccess")
    admins = bt.module("postgres").resources["administrators"]
    assert admins.loop
    assert admins.value["properties"]["principalType"] == Expr("principal.type")
    identity_admins = bt.main().variables["identityAdministrators"].value
    assert [a["objectId"] for a in identity_admins] == [
        Expr("identities.outputs.apiPrincipalId"),
        Expr("identities.outputs.workerPrincipalId"),
    ]
    assert {a["type"] for a in identity_admins} == {"ServicePrincipal"}


def test_registry_has_no_admin_user_and_no_anonymous_pull() -> None:
    props = one("registry", "Microsoft.ContainerRegistry/registries")["properties"]
    assert props["adminUserEnabled"] is False
    assert props["anonymousPullEnabled"] is False


def test_function_app_is_flex_consumption_python_311_with_a_user_assigned_identity() -> None:
    plan = one("functionapp", "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    site = one("functionapp", "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    assert list(site["identity"]["userAssignedIdentities"]) == ["'${identityId}'"]
    props = site["properties"]
    assert props["httpsOnly"] is True
    assert dig(props, "functionAppConfig", "runtime") == {"name": "python", "version": "3.11"}
    auth = dig(props, "functionAppConfig", "deployment", "storage", "authentication")
    assert auth == {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": Expr("identityId")}
    settings = {s["name"]: s["value"] for s in dig(props, "siteConfig", "appSettings")}
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == Expr("identityClientId")
    assert settings["AzureWebJobsStorage__blobServiceUri"] == Expr("blobEndpoint")
    assert settings["AzureWebJobsStorage__tableServiceUri"] == Expr("tableEndpoint")  # the host's diagnostic events
    assert settings["AZURE_CLIENT_ID"] == Expr("identityClientId")
    assert settings["POSTGRES_USER"] == Expr("identityName")
    assert {
        "ServiceBusConnection__fullyQualifiedNamespace",
        "AzureWebJobsStorage__blobServiceUri",
        "POSTGRES_HOST",
        "POSTGRES_DATABASE",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "JOBS_QUEUE_NAME",
    } <= set(settings)
    assert not {"DATABASE_URL", "ServiceBusConnection", "AzureWebJobsStorage"} & set(settings)
    basic_auth = bt.module("functionapp").resources_of_type("Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    assert sorted(p.value["name"] for p in basic_auth) == ["ftp", "scm"]
    assert all(p.value["properties"]["allow"] is False for p in basic_auth)


def test_gpu_scale_set() -> None:
    vmss_module = bt.module("gpu-vmss")
    params = vmss_module.params
    assert params["vmSku"].value.startswith("Standard_NC")
    assert params["spotEvictionPolicy"].decorators["allowed"] == [["Delete", "Deallocate"]]
    vmss = one("gpu-vmss", "Microsoft.Compute/virtualMachineScaleSets")
    assert vmss["sku"]["name"] == Expr("vmSku")
    assert vmss["identity"]["type"] == "UserAssigned"
    profile = vmss["properties"]["virtualMachineProfile"]
    assert profile["priority"] == Expr("useSpot ? 'Spot' : 'Regular'")
    assert profile["evictionPolicy"] == Expr("useSpot ? spotEvictionPolicy : null")
    assert dig(profile, "scheduledEventsProfile", "terminateNotificationProfile", "enable") is True
    assert dig(profile, "osProfile", "customData") == Expr("base64(cloudInit)")
    assert dig(profile, "osProfile", "linuxConfiguration", "disablePasswordAuthentication") is True
    extensions = {e["properties"]["type"]: e["properties"] for e in dig(profile, "extensionProfile", "extensions")}
    health = extensions["ApplicationHealthLinux"]
    assert health["publisher"] == "Microsoft.ManagedServices"
    assert health["settings"]["requestPath"] == "/health"
    assert "NvidiaGpuDriverLinux" in extensions


def test_cloud_init_runs_the_worker_image_on_the_gpus() -> None:
    text = (bt.MODULES_DIR / "gpu-worker.cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    assert "nvidia-container-toolkit" in text
    assert "nvidia-ctk runtime configure --runtime=docker" in text
    run = next(line for line in text.splitlines() if "ExecStart=/usr/bin/docker run" in line)
    assert "--gpus all" in run
    assert "--env-file /etc/crop-ai/worker.env" in run
    assert "__IMAGE__" in run
    replaced = set(re.findall(r"'(__[A-Z0-9_]+__)'", vmss_source := bt.module("gpu-vmss").source.decode()))
    assert set(re.findall(r"__[A-Z0-9_]+__", text)) == replaced, "every placeholder is filled in, none left over"
    assert "base64(string(workerEnvironment))" in vmss_source


def test_autoscale_follows_the_backlog_of_both_jobs_queues() -> None:
    """One profile, a scale-out and a scale-in rule per jobs queue. Azure Monitor autoscale scales out when any
    scale-out rule is met and in only when all scale-in rules are (autoscale-understanding-settings): so out when either
    queue's backlog is above its threshold, in only when both are at or below theirs."""
    module = bt.module("autoscale")
    autoscale = one("autoscale", "Microsoft.Insights/autoscalesettings")["properties"]
    assert autoscale["targetResourceUri"] == Expr("vmssId")
    (profile,) = autoscale["profiles"]
    assert profile["capacity"] == {
        "minimum": Expr("string(minInstances)"),
        "maximum": Expr("string(maxInstances)"),
        "default": Expr("string(defaultInstances)"),
    }
    rules = {(r["scaleAction"]["direction"], r["metricTrigger"]["dimensions"].text): r for r in profile["rules"]}
    assert len(rules) == len(profile["rules"]) == 4
    expected = {  # (direction, queue filter) -> (operator, threshold, window, cooldown)
        ("Increase", "queueFilter"): ("GreaterThan", "scaleOutThreshold", "scaleOutWindow", "scaleOutCooldown"),
        ("Increase", "highPriorityQueueFilter"): (
            "GreaterThan",
            "highPriorityScaleOutThreshold",
            "scaleOutWindow",
            "scaleOutCooldown",
        ),
        ("Decrease", "queueFilter"): ("LessThanOrEqual", "scaleInThreshold", "scaleInWindow", "scaleInCooldown"),
        ("Decrease", "highPriorityQueueFilter"): (
            "LessThanOrEqual",
            "highPriorityScaleInThreshold",
            "scaleInWindow",
            "scaleInCooldown",
        ),
    }
    assert set(rules) == set(expected)
    for key, (operator, threshold, window, cooldown) in expected.items():
        trigger, action = rules[key]["metricTrigger"], rules[key]["scaleAction"]
        assert trigger["metricName"] == "ActiveMessages"
        assert trigger["metricNamespace"] == "Microsoft.ServiceBus/namespaces"
        assert trigger["metricResourceUri"] == Expr("serviceBusNamespaceId")
        assert (trigger["statistic"], trigger["timeAggregation"]) == ("Average", "Average")
        assert (trigger["operator"], trigger["threshold"], trigger["timeWindow"]) == (
            operator,
            Expr(threshold),
            Expr(window),
        )
        assert (action["type"], action["cooldown"]) == ("ChangeCount", Expr(cooldown))
    for variable, queue in (("queueFilter", "queueName"), ("highPriorityQueueFilter", "highPriorityQueueName")):
        assert module.variables[variable].value == [
            {"DimensionName": "EntityName", "Operator": "Equals", "Values": [Expr(queue)]}
        ]


def test_the_pool_still_scales_to_zero() -> None:
    module = bt.module("autoscale")
    assert module.params["minInstances"].value == 0
    assert module.params["defaultInstances"].value == 0
    passed = bt.main().modules["autoscale"].value["params"]
    assert passed["minInstances"] == passed["defaultInstances"] == Expr("workerMinInstances")
    assert bt.main().params["workerMinInstances"].value == 0
    for threshold in ("scaleInThreshold", "highPriorityScaleInThreshold"):
        assert module.params[threshold].decorators["minValue"] == [0]
        assert passed[threshold] == Expr(threshold)
        assert bt.main().params[threshold].value == 0


ROLE_NAMES = {  # built-in role definition ids, the same in every tenant
    "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39": "Azure Service Bus Data Sender",
    "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0": "Azure Service Bus Data Receiver",
    "090c5cfd-751d-490a-894a-3ce6f1109419": "Azure Service Bus Data Owner",
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
    "db58b8e5-c6ad-4a2a-8342-4190687cbf4a": "Storage Blob Delegator",
    "7f951dda-4ed3-4680-a7ca-43fe172d538d": "AcrPull",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
}


def test_role_ids_are_named_constants() -> None:
    roles = bt.module("roles")
    constants = roles.variables["roles"].value
    assert set(constants.values()) == set(ROLE_NAMES)
    lines = roles.source.decode().splitlines()
    for guid, role in ROLE_NAMES.items():
        assert any(guid in line and line.rstrip().endswith(f"// {role}") for line in lines), role


def granted_roles() -> set[tuple[str, str, str]]:
    """(principal, role name, scope symbol) of every role assignment in roles.bicep."""
    roles = bt.module("roles")
    constants = roles.variables["roles"].value
    granted = set()
    for assignment in roles.resources_of_type("Microsoft.Authorization/roleAssignments"):
        props = assignment.value["properties"]
        role_key = re.fullmatch(r".*, roles\.(\w+)\)", props["roleDefinitionId"].text)
        assert role_key, props["roleDefinitionId"]
        who = props["principalId"].text.removesuffix("PrincipalId")
        scope = assignment.value["scope"].text
        granted.add((who, ROLE_NAMES[constants[role_key.group(1)]], scope))
        assert props["principalType"] == "ServicePrincipal"
        assert assignment.value["name"] == Expr(f"guid({scope}.id, {who}PrincipalId, roles.{role_key.group(1)})")
    return granted


def test_least_privilege_role_assignments() -> None:
    assert granted_roles() == {
        # GET /api/stats reads runtime properties (the queue description: the Manage claim, only in Data Owner), which
        # includes send (submit, the reconciler's re-sends) and receive (the reconciler drains the dead letters).
        ("api", "Azure Service Bus Data Owner", "queue"),
        ("api", "Azure Service Bus Data Owner", "highPriorityQueue"),
        # The API sends webhook retries; its trigger receives and target-scales on the runtime properties.
        ("api", "Azure Service Bus Data Owner", "eventsQueue"),
        # The account is also the Functions host storage: Blob Data Owner is the role the Functions docs name for it
        # (the host creates its own containers), and covers images, results and the deployment package; Table Data
        # Contributor lets the host write its diagnostic events (functions-reference, host storage with an identity).
        ("api", "Storage Blob Data Owner", "storage"),
        ("api", "Storage Table Data Contributor", "storage"),
        ("api", "Monitoring Metrics Publisher", "appInsights"),
        ("worker", "Azure Service Bus Data Receiver", "queue"),
        ("worker", "Azure Service Bus Data Sender", "queue"),  # retries: the next generation, scheduled
        ("worker", "Azure Service Bus Data Receiver", "highPriorityQueue"),
        ("worker", "Azure Service Bus Data Sender", "highPriorityQueue"),
        ("worker", "Azure Service Bus Data Sender", "eventsQueue"),  # webhook events of the jobs it finishes
        ("worker", "Storage Blob Data Reader", "imagesContainer"),
        # A user delegation key (an account-level action) to sign the read SAS GDAL reads an input by reference
        # with; the SAS is bounded by Blob Data Reader on images.
        ("worker", "Storage Blob Delegator", "storage"),
        ("worker", "Storage Blob Data Contributor", "resultsContainer"),
        ("worker", "AcrPull", "registry"),
        ("worker", "Monitoring Metrics Publisher", "appInsights"),
    }


def test_service_bus_roles_are_scoped_per_queue() -> None:
    """No Service Bus role on the namespace: each queue's roles name that queue, whose name comes from main.bicep."""
    roles = bt.module("roles")
    queues = {r.name: r.value for r in roles.resources.values() if r.resource_type.endswith("/queues")}
    assert {symbol: body["name"] for symbol, body in queues.items()} == {
        "queue": Expr("queueName"),
        "highPriorityQueue": Expr("highPriorityQueueName"),
        "eventsQueue": Expr("eventsQueueName"),
    }
    assert all(body["parent"] == Expr("namespace") for body in queues.values())
    service_bus = {(who, scope) for who, role, scope in granted_roles() if role.startswith("Azure Service Bus")}
    assert {scope for _, scope in service_bus} == set(queues), "every Service Bus role names one queue"


def metric_alerts() -> dict[str, dict[str, Any]]:
    """Resource symbol -> properties of every metric alert in alerts.bicep."""
    return {
        a.name: a.value["properties"] for a in bt.module("alerts").resources_of_type("Microsoft.Insights/metricAlerts")
    }


def test_alerts() -> None:
    alerts = bt.module("alerts")
    criteria = {}
    for symbol, props in metric_alerts().items():
        assert props["actions"] == Expr("actions")
        (criterion,) = props["criteria"]["allOf"]
        criteria[symbol] = criterion
    assert {symbol: c["metricName"] for symbol, c in criteria.items()} == {
        "deadLettersNotDrained": "DeadletteredMessages",
        "eventsDeadLettered": "DeadletteredMessages",
        "backlog": "ActiveMessages",
        "workerErrors": "exceptions/count",
    }
    assert criteria["backlog"]["threshold"] == Expr("backlogThreshold")
    assert criteria["backlog"]["dimensions"] == [
        {"name": "EntityName", "operator": "Include", "values": [Expr("queueName"), Expr("highPriorityQueueName")]}
    ]
    assert criteria["workerErrors"]["dimensions"][0]["values"] == [Expr("workerRoleName")]
    assert "actionGroupId" in alerts.params
    assert bt.main().modules["alerts"].value["params"]["actionGroupId"] == Expr("actionGroupId")


def test_every_queue_s_dead_letters_are_watched() -> None:
    watched = [
        value
        for props in metric_alerts().values()
        for criterion in props["criteria"]["allOf"]
        if criterion["metricName"] == "DeadletteredMessages"
        for dimension in criterion["dimensions"]
        if dimension["name"] == "EntityName"
        for value in dimension["values"]
    ]
    assert sorted(v.text for v in watched) == sorted(["queueName", "highPriorityQueueName", "eventsQueueName"])


def test_the_dead_letter_alert_fires_only_on_a_queue_the_reconciler_does_not_drain() -> None:
    """The reconciler empties the dead-letter queues of both jobs queues every minute, so a letter is routine; a queue
    that is never empty (its minimum above 0) for 15 minutes is not. Each queue is its own time series."""
    alert = metric_alerts()["deadLettersNotDrained"]
    (criterion,) = alert["criteria"]["allOf"]
    assert (criterion["timeAggregation"], criterion["operator"], criterion["threshold"]) == (
        "Minimum",
        "GreaterThan",
        0,
    )
    assert criterion["dimensions"] == [
        {"name": "EntityName", "operator": "Include", "values": [Expr("queueName"), Expr("highPriorityQueueName")]}
    ]
    reconcile_every = timedelta(minutes=1)  # RECONCILE_SCHEDULE's default, "0 */1 * * * *"
    assert bt.main().params["reconcileSchedule"].value == "0 */1 * * * *"
    window = TypeAdapter(timedelta).validate_python(alert["windowSize"])
    assert window >= 10 * reconcile_every
    assert TypeAdapter(timedelta).validate_python(alert["evaluationFrequency"]) <= window


def test_a_dead_lettered_webhook_event_fires_at_once() -> None:
    """Nothing drains job-events' dead-letter queue: any letter there is a webhook nobody received."""
    alert = metric_alerts()["eventsDeadLettered"]
    (criterion,) = alert["criteria"]["allOf"]
    assert (criterion["timeAggregation"], criterion["operator"], criterion["threshold"]) == (
        "Maximum",
        "GreaterThan",
        0,
    )
    assert criterion["dimensions"] == [
        {"name": "EntityName", "operator": "Include", "values": [Expr("eventsQueueName")]}
    ]
    assert alert["severity"] == 2


def test_outputs_give_the_api_base_url_and_resource_names() -> None:
    outputs = bt.main().outputs
    assert outputs["API_BASE_URL"].value == Expr("functionApp.outputs.apiBaseUrl")
    api_url = bt.module("functionapp").outputs["apiBaseUrl"].value
    assert api_url == Expr("'https://${functionApp.properties.defaultHostName}/api'")
    assert {
        "FUNCTION_APP_NAME",
        "STORAGE_ACCOUNT_NAME",
        "SERVICEBUS_NAMESPACE",
        "SERVICEBUS_QUEUE_NAME",
        "SERVICEBUS_HIGH_PRIORITY_QUEUE_NAME",
        "SERVICEBUS_EVENTS_QUEUE_NAME",
        "POSTGRES_HOST",
        "AZURE_CONTAINER_REGISTRY_NAME",
        "GPU_VMSS_NAME",
    } <= set(outputs)
