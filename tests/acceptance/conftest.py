"""The acceptance tier: the whole stack started once per session from the repository (``local.stack.up``) in a
temporary directory, on free ports, with the real entrypoints as subprocesses.

The stack starts without workers; tests get them from ``stack.ensure_worker()`` (through the ``worker`` fixture) or
start, SIGTERM and SIGKILL their own. The jobs queue has a 5 s lock so that a killed worker's message comes back
quickly; live workers renew their locks. Workers get ``MODELS_DIR = ROOT/models`` holding the test model of
:mod:`tests.acceptance.models` (written before any worker starts: workers read the folder at start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local.processes import Service
from local.services import Launcher
from local.stack import REPO_ROOT, StackConfig, StackError, down, up
from tests.acceptance.harness import Stack
from tests.acceptance.models import write_models
from tests.fixtures.backends import unavailable

LOCK_DURATION = "PT5S"
SERVICE_ENV = {
    "RETRY_AFTER_SECONDS": "1",
    "WORKER_SHUTDOWN_GRACE": "30",
    "WORKER_MAX_WAIT_TIME": "1",
    "RECONCILE_SCHEDULE": "*/2 * * * * *",  # every 2 s: the tests wait for the timer Function
    "RECONCILE_RESEND_AFTER": "PT3S",
    "JOB_LEASE": "PT6S",  # a killed worker's attempt is taken over within seconds
}


def _servicebus_config(root: Path) -> Path:
    config = json.loads((REPO_ROOT / "local" / "servicebus.config.json").read_text())
    for queue in config["UserConfig"]["Namespaces"][0]["Queues"]:
        queue["Properties"]["LockDuration"] = LOCK_DURATION
    path = root / "servicebus.config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not tmp_path_factory: PostgreSQL runs as `nobody` when we are root and must reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="cropai-acceptance-"))
    root.chmod(0o755)
    config = StackConfig(
        root=root,
        postgres_port=0,
        azurite_port=0,
        servicebus_port=0,
        api_port=0,
        servicebus_config=_servicebus_config(root),
        workers=0,
        env=SERVICE_ENV,
        models_dir=write_models(root / "models"),
    )
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    try:
        state = up(config, environ)
    except StackError as e:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"the local stack did not start: {e}")
        raise
    stack = Stack(root=root, state=state, launcher=Launcher(root, REPO_ROOT, environ))
    try:
        yield stack
    finally:
        stack.stop_workers()
        down(root)
        if not os.environ.get("KEEP_ACCEPTANCE_STACK"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def worker(stack: Stack) -> Service:
    """A live worker (the same one across tests while it lives)."""
    return stack.ensure_worker()


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[httpx.Client]:
    """A client for the API's origin: paths are ``/api/jobs``, as in the ``Location`` headers."""
    origin = httpx.URL(stack.api_url).copy_with(path="/")
    with httpx.Client(base_url=origin, timeout=60) as client:
        yield client
