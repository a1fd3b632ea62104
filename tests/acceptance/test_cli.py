"""The installed ``crop-ai`` command against the running stack, as a user runs it: ``submit --wait`` to a succeeded
job and ``download`` of its outputs, ``status``/``list``/``stats``/``health`` whose ``--json`` parses with the server's
models, ``cancel`` of a queued job, and a problem answer as a non-zero exit with its code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from cli.errors import ExitCode
from local.processes import Service
from local.stack import REPO_ROOT
from shared.health import Health
from shared.stats import Stats
from shared.status import JobPage, JobView
from shared.submission import Accepted
from tests import geotiffs
from tests.acceptance.client import submit
from tests.acceptance.harness import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]


def crop_ai(stack: Stack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``crop-ai ARGS``: the console script ``make install`` puts beside the interpreter (the module without it)."""
    script = Path(sys.executable).parent / "crop-ai"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    env = {**os.environ, "CROP_AI_API_URL": stack.api_url}
    env.pop("CROP_AI_FUNCTION_KEY", None)
    return subprocess.run(
        [*argv, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_submit_wait_reaches_succeeded_and_download_saves_the_outputs(
    stack: Stack, worker: Service, tmp_path: Path
) -> None:
    done = crop_ai(stack, "submit", str(geotiffs.RGBN), "--wait", "--json", "--poll", "0.5", "--priority", "high")
    assert done.returncode == ExitCode.OK, done.stderr
    job = JobView.model_validate_json(done.stdout)
    assert job.status == "succeeded"
    assert job.priority == "high"
    assert job.result is not None
    assert "succeeded" in done.stderr  # the progress lines (not a terminal)

    saved = crop_ai(stack, "download", str(job.job_id), str(tmp_path), "--json")
    assert saved.returncode == ExitCode.OK, saved.stderr
    files = json.loads(saved.stdout)["files"]
    assert set(files) == set(job.result["outputs"])
    assert all(Path(path).stat().st_size > 0 for path in files.values())

    status = crop_ai(stack, "status", str(job.job_id), "--json")
    assert status.returncode == ExitCode.OK
    assert JobView.model_validate_json(status.stdout).job_id == job.job_id
    shown = crop_ai(stack, "status", str(job.job_id))
    assert "succeeded" in shown.stdout
    assert "NDVI" in shown.stdout


def test_list_stats_and_health_json_parse_with_the_servers_models(stack: Stack, api: httpx.Client) -> None:
    accepted = Accepted.model_validate_json(submit(api, geotiffs.crafted()).text)
    listed = crop_ai(stack, "--json", "list", "--limit", "5")
    assert listed.returncode == ExitCode.OK, listed.stderr
    page = JobPage.model_validate_json(listed.stdout)
    assert accepted.job_id in {job.job_id for job in page.jobs}

    stats = crop_ai(stack, "stats", "--json")
    assert stats.returncode == ExitCode.OK, stats.stderr
    assert sum(Stats.model_validate_json(stats.stdout).jobs.model_dump().values()) >= 1
    table = crop_ai(stack, "stats")
    assert "throughput" in table.stdout

    health = crop_ai(stack, "health", "--json")
    assert health.returncode == ExitCode.OK, health.stderr
    assert Health.model_validate_json(health.stdout).status == "ok"


def test_cancel_of_a_queued_job(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()  # nobody claims it: it stays queued until cancelled
    accepted = Accepted.model_validate_json(submit(api, geotiffs.crafted()).text)
    cancelled = crop_ai(stack, "cancel", str(accepted.job_id), "--json")
    assert cancelled.returncode == ExitCode.OK, cancelled.stderr
    view = JobView.model_validate_json(cancelled.stdout)
    assert (view.job_id, view.status) == (accepted.job_id, "cancelled")

    again = crop_ai(stack, "cancel", str(accepted.job_id))
    assert again.returncode == ExitCode.OK  # idempotent
    assert "cancelled" in again.stdout


def test_a_problem_answer_exits_non_zero_with_its_code(stack: Stack) -> None:
    missing = str(uuid.uuid4())
    done = crop_ai(stack, "status", missing)
    assert done.returncode == ExitCode.REJECTED
    assert f"404 job_not_found: there is no job {missing}" in done.stderr
    assert done.stdout == ""

    as_json = crop_ai(stack, "retry", missing, "--json")
    assert as_json.returncode == ExitCode.REJECTED
    assert json.loads(as_json.stdout)["code"] == "job_not_found"

    bad = crop_ai(stack, "submit", str(geotiffs.RGBN), "--analysis", "not an analysis")
    assert bad.returncode == ExitCode.REJECTED
    assert "400 invalid_analysis" in bad.stderr


def test_an_unreachable_api_exits_5(stack: Stack) -> None:
    done = crop_ai(stack, "--api-url", "http://127.0.0.1:9", "health", timeout=60)
    assert done.returncode == ExitCode.UNREACHABLE
    assert "cannot reach" in done.stderr
