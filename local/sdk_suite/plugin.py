"""The pytest plugin that runs the SDK's own queue tests against the emulator (``-p local.sdk_suite.plugin``).

- the ARM preparers are replaced by ``preparers.py``; at session start this plugin writes the
  queues they registered into an emulator configuration and starts the emulator on a free port;
- ``ServiceBusClient`` (sync and aio) defaults to ``use_tls=False``, which is what ``UseDevelopmentEmulator=true``
  does for a connection string: the tests build their clients from a namespace and a credential instead;
- the tests in :data:`~local.sdk_suite.exclusions.EXCLUDED` are deselected, and ``--sdk-shard i/n`` keeps every
  n-th of the rest (the runner starts n processes per file, each with its own emulator);
- ``--sdk-report FILE`` receives each test's outcome and duration, and the excluded tests, as JSON.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusClient
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

from local.sdk_suite import preparers
from local.sdk_suite.exclusions import EXCLUDED
from local.servicebus_emulator import start_emulator
from local.servicebus_emulator.process import connection_string

_HOST = "127.0.0.1"
_OUTCOMES: dict[str, dict[str, Any]] = {}
_EXCLUDED_RUN: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sdk-suite")
    group.addoption("--sdk-shard", default="0/1", help="i/n: run every n-th selected test, starting at the i-th")
    group.addoption("--sdk-report", default=None, help="write outcomes as JSON to this file")


def _plain_amqp(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def init_without_tls(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_tls", False)
        init(self, *args, **kwargs)

    return init_without_tls


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("liveTest", "live_test_only", "playback_test_only"):
        config.addinivalue_line("markers", f"{marker}: upstream marker; every test runs against the emulator")
    for client in (ServiceBusClient, AsyncServiceBusClient):
        client.__init__ = _plain_amqp(client.__init__)  # type: ignore[method-assign]


def _key(item: pytest.Item) -> str:
    name = getattr(item, "originalname", item.name)
    return f"{item.path.name}::{name}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    excluded = [item for item in items if _key(item) in EXCLUDED]
    for item in excluded:
        _EXCLUDED_RUN[item.nodeid] = EXCLUDED[_key(item)]
    kept = [item for item in items if _key(item) not in EXCLUDED]
    index, count = (int(part) for part in str(config.getoption("--sdk-shard")).split("/"))
    selected = kept[index::count]
    deselected = [item for item in items if item not in selected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    if index != 0:  # the excluded tests are reported once, by the first shard
        _EXCLUDED_RUN.clear()


@pytest.fixture(scope="session", autouse=True)
def _emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One emulator for the session, with every queue the preparers registered."""
    root = tmp_path_factory.mktemp("servicebus")
    queues = [{"Name": name, "Properties": props} for name, props in preparers.QUEUES.items()]
    document = {"UserConfig": {"Namespaces": [{"Name": "sdk-suite", "Queues": queues, "Topics": []}]}}
    config = root / "config.json"
    config.write_text(json.dumps(document, indent=2), encoding="utf-8")
    process, port = start_emulator(config, root / "data", _HOST, 0)
    preparers.EMULATOR.host, preparers.EMULATOR.port = _HOST, port
    preparers.EMULATOR.connection_string = connection_string(_HOST, port)
    try:
        yield
    finally:
        process.terminate()
        process.wait()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
    entry["duration"] = round(entry["duration"] + report.duration, 2)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--sdk-report")
    if path:
        report = {"tests": _OUTCOMES, "excluded": _EXCLUDED_RUN}
        Path(path).write_text(json.dumps(report, indent=2), encoding="utf-8")
