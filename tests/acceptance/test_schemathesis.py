"""Schemathesis against the running stack, from the document it serves (``GET /api/openapi.json``): every operation,
with generated valid and invalid parameters and bodies, answers no 5xx, and each answer's status code, content type,
headers and body are the documented ones.

``schemathesis run`` runs as a subprocess (its pytest plugin does not work with pytest 9.2: it sets
``Function._nodeid``, which pytest 9.2 no longer has). This module is also its hooks module
(``SCHEMATHESIS_HOOKS``): raw ``image/tiff`` and ``application/octet-stream`` bodies are drawn from real GeoTIFFs,
so that positive cases reach the queue and not just the header checks (multipart parts stay random); ``callback_url``
is dropped from every case, since the local stack allows private webhook targets and a generated URL must not become
a delivery; every request sent is counted, by operation.

Bounded for a 2-core machine: the examples and coverage phases plus ``MAX_EXAMPLES`` fuzzed cases per operation,
deterministic (the same cases every run), no example database, one worker, ``REQUEST_TIMEOUT`` per request: about
30 s. Jobs the run queued are cancelled afterwards, so that later tests' workers do not inherit them. The coverage
phase's unexpected methods include ``TRACE``: like the Functions host, the local host answers a method no function
serves with an empty 404.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.stack import REPO_ROOT
from tests.acceptance.harness import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

MAX_EXAMPLES = 10  # fuzzed cases per operation (the examples and coverage phases add their own)
REQUEST_TIMEOUT = 30
RUN_TIMEOUT = 300
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
CHECKS += "response_schema_conformance"
CONFIG = """
[phases.coverage]
unexpected-methods = ["get", "put", "post", "delete", "options", "patch", "trace"]
"""
CALLS_ENV = "CROP_AI_SCHEMATHESIS_CALLS"  # where the hooks append one line per request


def test_the_api_conforms_to_its_openapi_document(stack: Stack, api: httpx.Client, tmp_path: Path) -> None:
    started = datetime.now(UTC)
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": __name__, CALLS_ENV: str(calls), "PYTHONPATH": str(REPO_ROOT)}
    argv = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"), "--no-color"),
        *("run", f"{stack.api_url}/openapi.json", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES)),
        *("--phases", "examples,coverage,fuzzing", "--generation-deterministic"),
        *("--workers", "1", "--request-timeout", str(REQUEST_TIMEOUT), "--report", "junit"),
        *("--report-dir", str(tmp_path / "report")),
    ]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    finally:
        _cancel_jobs_created_since(api, started)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]

    sent = Counter(calls.read_text().splitlines()) if calls.exists() else Counter[str]()
    documented = api.get("/api/openapi.json").json()["paths"]
    operations = {f"{method.upper()} {path}" for path, item in documented.items() for method in item}
    operations.discard("GET /openapi.json")  # schemathesis leaves out the operation that served it the document
    assert operations <= set(sent), f"never exercised: {sorted(operations - set(sent))}"
    documented_calls = {op: n for op, n in sorted(sent.items()) if op in operations}
    unexpected = sum(sent.values()) - sum(documented_calls.values())
    print(f"\nschemathesis: {sum(sent.values())} requests, {unexpected} with undocumented methods; {documented_calls}")


def _cancel_jobs_created_since(api: httpx.Client, since: datetime) -> None:
    for status in ("queued", "running"):
        page = api.get("/api/jobs", params={"status": status, "created_after": since.isoformat(), "limit": "1000"})
        for job in page.json().get("jobs", []):
            api.delete(f"/api/jobs/{job['job_id']}")


def _register_hooks() -> None:
    """What ``schemathesis run`` loads through ``SCHEMATHESIS_HOOKS`` (never in the pytest process)."""
    import schemathesis
    from hypothesis import strategies as st

    from tests import geotiffs

    tiffs = [
        geotiffs.crafted(width=16, height=16),  # B02, B03, B04, B08: valid without ?bands=
        geotiffs.crafted(width=8, height=8, descriptions=None),  # valid only with ?bands=
        geotiffs.real(geotiffs.RGBN),
    ]
    schemathesis.openapi.media_type("image/tiff", st.sampled_from(tiffs), aliases=["application/octet-stream"])
    calls = Path(os.environ[CALLS_ENV])

    @schemathesis.hook
    def before_call(context: schemathesis.HookContext, case: schemathesis.Case[Any], kwargs: dict[str, Any]) -> None:
        if isinstance(case.query, dict):
            case.query.pop("callback_url", None)  # never a webhook to a generated address
        with calls.open("a") as f:
            f.write(f"{case.method.upper()} {case.path}\n")


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__ and CALLS_ENV in os.environ:
    _register_hooks()
