"""The operators' workbook (modules/workbook.bicep + workbook.json) and the log search alerts (modules/alerts.bicep).

Whether their queries name what the code emits is tests/unit/test_metrics.py's job; here, the structure: the JSON is
a Notebook/1.0 workbook with the panels docs/monitoring.md describes, its placeholders are the ones the module
replaces, main.bicep wires it with the App Insights and Service Bus ids, and the log alerts are scoped and
parameterised as documented.
"""

from __future__ import annotations

import json
from typing import Any

from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import Expr

WORKBOOK = json.loads((bt.MODULES_DIR / "workbook.json").read_text())
PANELS = {
    "backlog",
    "dead-letters",
    "throughput",
    "in-flight",
    "run-duration",
    "queue-wait",
    "stages",
    "failures",
    "workers",
    "gpu-utilization",
    "gpu-memory",
    "slowest",
}


def items(kind: int) -> list[dict[str, Any]]:
    return [item for item in WORKBOOK["items"] if item["type"] == kind]


def test_the_workbook_has_every_panel_once() -> None:
    assert WORKBOOK["version"] == "Notebook/1.0"
    names = [item["name"] for item in WORKBOOK["items"]]
    assert len(names) == len(set(names))
    assert set(names) >= PANELS


def test_queries_run_on_app_insights_and_metrics_on_service_bus_over_the_chosen_time_range() -> None:
    for item in items(3):
        content = item["content"]
        assert content["resourceType"] == "microsoft.insights/components", item["name"]
        assert content["crossComponentResources"] == ["__APP_INSIGHTS_ID__"], item["name"]
        assert content["timeContextFromParameter"] == "TimeRange", item["name"]
        assert "{TimeRange}" in content["query"], item["name"]
    for item in items(10):
        content = item["content"]
        assert content["resourceIds"] == ["__SERVICE_BUS_ID__"], item["name"]
        assert [m["metric"] for m in content["metrics"]] in (
            ["microsoft.servicebus/namespaces--ActiveMessages"],
            ["microsoft.servicebus/namespaces--DeadletteredMessages"],
        )
        assert all(m["splitBy"] == "EntityName" for m in content["metrics"])
    (parameters,) = items(9)
    assert [p["name"] for p in parameters["content"]["parameters"]] == ["TimeRange"]


def test_percentiles_come_from_the_per_job_span_not_from_custom_metrics() -> None:
    """customMetrics holds a histogram as sum/count/min/max per interval: a percentile of it would be wrong."""
    for item in items(3):
        query = item["content"]["query"]
        if "percentile" in query:
            assert query.startswith("requests\n"), item["name"]


def test_the_slowest_jobs_link_to_their_end_to_end_trace() -> None:
    (slowest,) = [i for i in items(3) if i["name"] == "slowest"]
    query = slowest["content"]["query"]
    assert "operation_Id" in query
    assert "AppInsightsExtension/DetailsV2Blade" in query
    (link,) = slowest["content"]["gridSettings"]["formatters"]
    assert (link["columnMatch"], link["formatOptions"]["linkTarget"]) == ("trace", "Url")


def test_the_module_fills_the_placeholders_and_main_wires_it() -> None:
    module = bt.module("workbook")
    (workbook,) = module.resources_of_type("Microsoft.Insights/workbooks")
    props = workbook.value["properties"]
    assert (workbook.value["kind"], props["category"]) == ("shared", "workbook")
    assert props["sourceId"] == Expr("appInsightsId")
    text = (bt.MODULES_DIR / "workbook.bicep").read_text()
    placeholders = {"__APP_INSIGHTS_ID__": "appInsightsId", "__SERVICE_BUS_ID__": "serviceBusNamespaceId"}
    for placeholder, param in placeholders.items():
        assert f"'{placeholder}', {param})" in text
    assert "loadTextContent('workbook.json')" in text
    params = bt.main().modules["workbook"].value["params"]
    assert params["appInsightsId"] == Expr("monitoring.outputs.appInsightsId")
    assert params["serviceBusNamespaceId"] == Expr("serviceBus.outputs.namespaceId")


def test_log_search_alerts_watch_duration_liveness_and_failures() -> None:
    alerts = bt.module("alerts")
    rules = {r.name: r.value["properties"] for r in alerts.resources_of_type("Microsoft.Insights/scheduledQueryRules")}
    assert set(rules) == {"durationP95", "workersSilent", "failureRate"}
    for props in rules.values():
        assert props["scopes"] == [Expr("appInsightsId")]
        assert props["actions"] == Expr("logAlertActions")
        assert props["autoMitigate"] is True
    threshold = {name: props["criteria"]["allOf"][0]["threshold"] for name, props in rules.items()}
    assert threshold == {
        "durationP95": Expr("durationP95ThresholdSeconds"),
        "workersSilent": 0,
        "failureRate": Expr("failureRateThresholdPercent"),
    }
    assert rules["durationP95"]["criteria"]["allOf"][0]["metricMeasureColumn"] == "p95_s"
    assert {"durationP95ThresholdSeconds", "failureRateThresholdPercent", "location"} <= set(alerts.params)
