"""The crop-ai CLI without a server: the command line, how answers are printed (rich, and ``--json`` exactly as the
API wrote them), problems and exit codes. The API's answers are built with the server's own models
(``shared.status.view_of`` and friends) and served by an ``httpx.MockTransport``; tests/acceptance/test_cli.py drives
the installed command against the real stack."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from cli.__main__ import main
from cli.api import DEFAULT_API_URL, KEY_HEADER, api_base, problem_of
from cli.args import build_parser
from cli.commands import Output
from cli.errors import ExitCode
from shared.jobs import JobStatus
from shared.status import view_of
from tests.jobs import job_record

JOB = "0b5e4a8c-93a1-4f27-9a53-1c0f5e2d7a11"
Handler = Callable[[httpx.Request], httpx.Response]


class _Signer:
    def read_url(self, blob_url: str, ttl: timedelta) -> str:
        return blob_url


def job_json(status: JobStatus, **fields: Any) -> dict[str, Any]:
    return view_of(job_record(status, job_id=JOB, **fields), _Signer(), timedelta(minutes=5)).body()


def problem(status: int, code: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": f"urn:crop-ai:problem:{code}", "title": code, "status": status, "detail": detail, "code": code}
    return httpx.Response(status, json={**body, **extra}, headers={"Content-Type": "application/problem+json"})


class Run:
    """``main`` with an in-process API and consoles writing to buffers."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        self.transport = httpx.MockTransport(record)

    def __call__(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        out = Output(
            json=False,
            out=Console(file=stdout, width=160, color_system=None),
            err=Console(file=stderr, width=160, color_system=None),
        )
        code = main(list(argv), env or {}, out=out, transport=self.transport)
        return code, stdout.getvalue(), stderr.getvalue()


# The command line


def test_global_options_go_before_or_after_the_command() -> None:
    parser = build_parser({})
    before = parser.parse_args(["--json", "--api-url", "http://h:1", "status", JOB])
    after = parser.parse_args(["status", JOB, "--json", "--api-url", "http://h:1"])
    for args in (before, after):
        assert (args.json, args.api_url, args.job_id, args.command) == (True, "http://h:1", JOB, "status")
    plain = parser.parse_args(["status", JOB])
    assert (plain.json, plain.api_url, plain.function_key) == (False, DEFAULT_API_URL, None)


def test_environment_gives_the_url_and_the_key() -> None:
    args = build_parser({"CROP_AI_API_URL": "http://api:9", "CROP_AI_FUNCTION_KEY": "k"}).parse_args(["stats"])
    assert (args.api_url, args.function_key) == ("http://api:9", "k")
    args = build_parser({"CROP_AI_FUNCTION_KEY": "k"}).parse_args(["stats", "--function-key", "other"])
    assert args.function_key == "other"


def test_submit_options() -> None:
    args = build_parser({}).parse_args(
        [
            *("submit", "a.tif", "b.tif", "--wait", "--priority", "high"),
            *("--callback-events", "started,progress", "--callback-events", "completed"),
        ]
    )
    assert args.files == [Path("a.tif"), Path("b.tif")]
    assert (args.wait, args.priority, args.callback_events) == (True, "high", ["started", "progress", "completed"])


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["submit"],
        ["submit", "a.tif", "--priority", "urgent"],
        ["submit", "a.tif", "--callback-events", "everything"],
        ["submit", "a.tif", "--callback-events", "started,finished"],
        ["list", "--status", "done"],
        ["list", "--limit", "many"],
        ["dlq"],
        ["dlq", "list", "--action", "burn"],
        ["download", JOB],
    ],
)
def test_a_bad_command_line_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser({}).parse_args(argv)
    assert exited.value.code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("http://127.0.0.1:7071", "http://127.0.0.1:7071/api"),
        ("http://127.0.0.1:7071/", "http://127.0.0.1:7071/api"),
        ("https://x.azurewebsites.net/api", "https://x.azurewebsites.net/api"),
    ],
)
def test_the_api_url_may_name_the_origin_or_the_api(given: str, base: str) -> None:
    assert api_base(given) == base


# Answers


def test_status_prints_the_job_and_json_prints_the_body_unchanged() -> None:
    progress = {"stage": "analyse", "fraction": 0.25, "updated_at": datetime.now(UTC).isoformat()}
    body = json.dumps(job_json(JobStatus.RUNNING, progress=progress), indent=3)  # any spacing: it is passed through
    run = Run(lambda r: httpx.Response(200, text=body, headers={"Content-Type": "application/json"}))
    code, out, _ = run("status", JOB)
    assert code == ExitCode.OK
    assert JOB in out
    assert "running" in out
    assert "analyse 25%" in out
    code, out, _ = run("status", JOB, "--json")
    assert (code, out) == (ExitCode.OK, body + "\n")
    assert run.requests[0].url.path == f"/api/jobs/{JOB}"


def test_a_failed_job_shows_its_error_and_a_succeeded_one_its_result() -> None:
    failed = job_json(JobStatus.FAILED, error_code="invalid_image", error_message="no red band")
    result = {
        "analysis": "crop-health",
        "scene": {"width": 64, "height": 32, "band_count": 4, "crs": "EPSG:32618", "bounds_wgs84": [1, 2, 3, 4]},
        "vegetation_fraction": 0.5,
        "indices": {"ndvi": {"mean": 0.25, "std": 0.1, "p10": 0.0, "p50": 0.2, "p90": 0.5}},
        "outputs": {"ndvi_cog": "http://blob/results/x/1/ndvi.tif"},
    }
    succeeded = job_json(JobStatus.SUCCEEDED, result=result)
    bodies = iter([failed, succeeded])
    run = Run(lambda r: httpx.Response(200, json=next(bodies)))
    _, out, _ = run("status", JOB)
    assert "invalid_image: no red band" in out
    _, out, _ = run("status", JOB)
    assert "64 x 32 px" in out
    assert "NDVI" in out
    assert "0.25" in out
    assert "vegetation 50.0%" in out
    assert "ndvi_cog" in out


def test_a_problem_prints_its_code_and_detail_and_exits_non_zero() -> None:
    run = Run(lambda r: problem(404, "job_not_found", f"there is no job {JOB}"))
    code, out, err = run("status", JOB)
    assert code == ExitCode.REJECTED
    assert out == ""
    assert f"404 job_not_found: there is no job {JOB}" in err
    code, out, _ = run("status", JOB, "--json")
    assert code == ExitCode.REJECTED
    assert json.loads(out)["code"] == "job_not_found"


def test_a_503_exits_4_and_a_refused_connection_5() -> None:
    run = Run(lambda r: problem(503, "database_unavailable", "later", job_id=JOB))
    code, _, err = run("list")
    assert code == ExitCode.UNAVAILABLE
    assert "503 database_unavailable: later, job_id " + JOB in err

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    code, _, err = Run(refuse)("stats")
    assert code == ExitCode.UNREACHABLE
    assert "cannot reach" in err


def test_an_answer_that_is_not_the_api_exits_5() -> None:
    code, _, err = Run(lambda r: httpx.Response(200, json={"hello": "world"}))("status", JOB)
    assert code == ExitCode.UNREACHABLE
    assert "not a JobView" in err


def test_error_answers_without_a_problem_body() -> None:
    bare = problem_of(httpx.Response(401, request=httpx.Request("GET", "http://x")))
    assert (bare.status, bare.code) == (401, "http_401")
    html = problem_of(httpx.Response(502, text="<html>bad gateway</html>", headers={"Content-Type": "text/html"}))
    assert (html.status, html.code, html.detail) == (502, "http_502", "<html>bad gateway</html>")


def test_the_function_key_is_sent_to_the_api() -> None:
    run = Run(lambda r: problem(401, "unauthorized", "a valid function key is required"))
    run("stats", env={"CROP_AI_FUNCTION_KEY": "s3cret"})
    assert run.requests[0].headers[KEY_HEADER] == "s3cret"


def test_list_prints_a_table_and_the_next_cursor() -> None:
    summary = {
        "job_id": JOB,
        "status": "failed",
        "created_at": "2025-01-31T12:00:00+00:00",
        "updated_at": "2025-01-31T12:00:01+00:00",
        "analysis": "crop-health",
        "priority": "high",
        "attempts": 3,
        "batch_id": None,
        "error_code": "retries_exhausted",
    }
    run = Run(lambda r: httpx.Response(200, json={"jobs": [summary], "next": "abc"}))
    code, out, _ = run("list", "--status", "failed", "--limit", "1")
    assert code == ExitCode.OK
    assert "retries_exhausted" in out
    assert "high" in out
    assert "crop-ai list --next abc" in out
    assert dict(run.requests[0].url.params) == {"status": "failed", "limit": "1"}


STATS = {
    "jobs": {"queued": 2, "running": 1, "succeeded": 40, "failed": 3, "cancelled": 1},
    "oldest_queued_age_seconds": 12.5,
    "last_5_minutes": {"submitted": 4, "succeeded": 3, "failed": 0, "cancelled": 0},
    "last_60_minutes": {"submitted": 47, "succeeded": 40, "failed": 3, "cancelled": 1},
    "run_seconds": {"p50": 8.25, "p95": 20.0},
    "queue_wait_seconds": {"p50": 0.5, "p95": None},
    "workers": [
        {
            "worker_id": "w-1",
            "host": "vm0",
            "device": "cuda:0",
            "current_job": JOB,
            "last_beat": "2025-01-31T12:00:00+00:00",
            "alive": True,
        }
    ],
    "queues": [{"name": "jobs", "active": 2, "scheduled": 0, "dead_letter": 1}],
    "queues_error": None,
}


def test_stats_prints_tables() -> None:
    code, out, _ = Run(lambda r: httpx.Response(200, json=STATS))("stats")
    assert code == ExitCode.OK
    for text in ("succeeded", "40", "last 60 min", "8.25", "cuda:0", "w-1", "jobs", "oldest queued job: 12.5 s"):
        assert text in out


def test_health_exits_4_when_a_check_failed() -> None:
    checks = {"database": {"ok": True, "latency_ms": 1.5}, "storage": {"ok": False, "latency_ms": 2000.0}}
    checks["servicebus"] = {"ok": True, "latency_ms": 3.0}
    body = {"status": "unavailable", "checks": checks}
    code, out, _ = Run(lambda r: httpx.Response(503, json=body, headers={"Retry-After": "5"}))("health")
    assert code == ExitCode.UNAVAILABLE
    assert "unavailable" in out
    assert "failed" in out
    assert "2000" in out


def test_cancel_of_a_running_job_says_cancel_requested() -> None:
    running = job_json(JobStatus.RUNNING, cancel_requested_at=datetime.now(UTC))
    run = Run(lambda r: httpx.Response(202, json=running))
    code, out, _ = run("cancel", JOB)
    assert (code, run.requests[0].method) == (ExitCode.OK, "DELETE")
    assert "cancel requested" in out


def test_dlq_replay_sends_the_filter_as_json() -> None:
    run = Run(lambda r: httpx.Response(200, json={"replayed": [JOB], "skipped": 2}))
    code, out, _ = run("dlq", "replay", "--reason", "MaxDeliveryCountExceeded")
    assert code == ExitCode.OK
    assert json.loads(run.requests[0].content) == {"reason": "MaxDeliveryCountExceeded"}
    assert "replayed 1 job(s), skipped 2" in out
    assert JOB in out


def test_download_saves_each_output_without_the_function_key(tmp_path: Path) -> None:
    outputs = {"ndvi_cog": "http://blob:1/results/x/1/ndvi.tif", "quicklook_png": "http://blob:1/results/x/1/q.png"}
    done = job_json(JobStatus.SUCCEEDED, result={"outputs": outputs})

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.host == "blob":
            return httpx.Response(200, content=request.url.path.encode())
        return httpx.Response(200, json=done)

    run = Run(serve)
    code, out, _ = run("download", JOB, str(tmp_path / "out"), "--json", "--function-key", "k")
    assert code == ExitCode.OK
    files = json.loads(out)["files"]
    assert Path(files["ndvi_cog"]).read_bytes() == b"/results/x/1/ndvi.tif"
    assert Path(files["quicklook_png"]).name == "q.png"
    blob_requests = [r for r in run.requests if r.url.host == "blob"]
    assert len(blob_requests) == 2
    assert all(KEY_HEADER not in r.headers for r in blob_requests)


def test_download_of_an_unfinished_job_exits_1(tmp_path: Path) -> None:
    code, _, err = Run(lambda r: httpx.Response(200, json=job_json(JobStatus.QUEUED)))("download", JOB, str(tmp_path))
    assert code == ExitCode.JOB_NOT_SUCCEEDED
    assert "is queued" in err


def test_submit_wait_follows_progress_until_the_job_finishes(tmp_path: Path) -> None:
    image = tmp_path / "scene.tif"
    image.write_bytes(b"II*\x00 not really a tiff: the server is a mock")
    progress = {"stage": "analyse", "fraction": 0.5, "updated_at": datetime.now(UTC).isoformat()}
    views = iter([job_json(JobStatus.RUNNING, progress=progress), job_json(JobStatus.SUCCEEDED, result={})])

    def serve(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            accepted = {"job_id": JOB, "status": "queued", "status_url": f"/api/jobs/{JOB}", "priority": "high"}
            return httpx.Response(202, json=accepted)
        return httpx.Response(200, json=next(views), headers={"Retry-After": "0"})

    run = Run(serve)
    code, out, err = run("submit", str(image), "--wait", "--poll", "0.01", "--priority", "high", "--bands", "B04,B08")
    assert code == ExitCode.OK
    post = run.requests[0]
    assert dict(post.url.params) == {"priority": "high", "bands": "B04,B08"}
    assert post.headers["Content-Type"] == "image/tiff"
    assert post.content == image.read_bytes()
    assert "running (analyse 50%)" in err
    assert "succeeded" in err
    assert "succeeded" in out


def test_submit_wait_exits_1_when_the_job_failed(tmp_path: Path) -> None:
    image = tmp_path / "scene.tif"
    image.write_bytes(b"II*\x00")

    def serve(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"job_id": JOB, "status": "queued", "status_url": "", "priority": "normal"})
        return httpx.Response(200, json=job_json(JobStatus.FAILED, error_code="invalid_image", error_message="x"))

    code, out, _ = Run(serve)("submit", str(image), "--wait", "--json", "--poll", "0.01")
    assert code == ExitCode.JOB_NOT_SUCCEEDED
    assert json.loads(out)["error"]["code"] == "invalid_image"


def test_submit_of_a_missing_file_sends_nothing(tmp_path: Path) -> None:
    run = Run(lambda r: httpx.Response(500))
    code, _, err = run("submit", str(tmp_path / "missing.tif"))
    assert code == ExitCode.USAGE
    assert "no such file" in err
    assert run.requests == []
