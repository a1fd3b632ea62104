"""The heartbeat file and ``python -m gpu_worker --healthcheck``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker.__main__ import main
from gpu_worker.heartbeat import Heartbeat, check


@pytest.mark.parametrize(
    ("busy", "age", "healthy"),
    [
        (False, 1, True),
        (False, 121, False),
        (True, 121, True),  # a long job: the loop does not turn, the job is younger than its time limit
        (True, 7201, False),  # past the attempt's time limit (JOB_TIMEOUT): overrunning until it is stopped
    ],
)
def test_check(tmp_path: Path, busy: bool, age: float, healthy: bool) -> None:
    beat = Heartbeat(tmp_path / "hb")
    beat.busy() if busy else beat.idle()
    ok, why = check(tmp_path / "hb", max_age=120, busy_limit=7200, now=time.time() + age)
    assert ok is healthy, why


@pytest.mark.parametrize("content", [None, "", "not json", json.dumps({"busy_since": None})])
def test_a_missing_or_unreadable_heartbeat_is_unhealthy(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "hb"
    if content is not None:
        path.write_text(content)
    ok, why = check(path, max_age=120, busy_limit=7200)
    assert not ok
    assert str(path) in why


def test_an_unwritable_heartbeat_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Heartbeat(tmp_path / "missing-dir" / "hb").beat()
    assert [getattr(r, "action", None) for r in caplog.records] == ["heartbeat_failed"]


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=v")
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("WORKER_HEARTBEAT_FILE", str(tmp_path / "hb"))
    return tmp_path / "hb"


def test_healthcheck_cli(worker_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--healthcheck"]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: no readable heartbeat")
    Heartbeat(worker_env).beat()
    assert main(["--healthcheck"]) == 0
    assert capsys.readouterr().out.startswith("healthy: last beat")
    assert main(["--healthcheck", "--max-age", "-1"]) == 1


def _stale_busy_heartbeat(path: Path, *, busy_for: float) -> None:
    """A worker busy with one job for ``busy_for`` seconds, its loop not turning meanwhile."""
    then = time.time() - busy_for
    path.write_text(json.dumps({"beat": then, "busy_since": then, "pid": 1}))


@pytest.mark.parametrize(
    ("job_timeout", "healthy"), [("PT1H", True), ("PT5M", False)], ids=["within-JOB_TIMEOUT", "past-JOB_TIMEOUT"]
)
def test_healthcheck_cli_allows_a_busy_worker_up_to_the_job_timeout(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch, job_timeout: str, healthy: bool
) -> None:
    monkeypatch.setenv("JOB_TIMEOUT", job_timeout)
    _stale_busy_heartbeat(worker_env, busy_for=600)  # older than WORKER_HEARTBEAT_MAX_AGE (120 s)
    assert main(["--healthcheck"]) == (0 if healthy else 1)


def test_idle_clears_busy(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "hb")
    beat.busy()
    assert json.loads((tmp_path / "hb").read_text())["busy_since"] is not None
    beat.idle()
    state = json.loads((tmp_path / "hb").read_text())
    assert state["busy_since"] is None
    assert not check(tmp_path / "hb", max_age=120, busy_limit=7200, now=time.time() + 121)[0]


def _in_a_thread(call: Callable[[], object]) -> None:
    thread = threading.Thread(target=call)
    thread.start()
    thread.join()


def test_each_thread_marks_its_own_work_and_the_oldest_one_is_the_busy_since(tmp_path: Path) -> None:
    """The pipeline's threads: one still busy keeps the worker busy when another goes idle."""
    beat = Heartbeat(tmp_path / "hb")
    _in_a_thread(beat.busy)  # the preparing thread's work, still in hand
    first = json.loads((tmp_path / "hb").read_text())["busy_since"]
    beat.busy()  # the main thread's analysis
    beat.idle()
    assert json.loads((tmp_path / "hb").read_text())["busy_since"] == first


def test_work_past_the_time_limit_is_unhealthy_however_fresh_the_last_beat(tmp_path: Path) -> None:
    """Another thread's beats (the receiving loop turns) must not hide an analysis that overruns."""
    now = time.time()
    (tmp_path / "hb").write_text(json.dumps({"beat": now, "busy_since": now - 7201, "pid": 1}))
    ok, why = check(tmp_path / "hb", max_age=120, busy_limit=7200, now=now)
    assert not ok
    assert "busy" in why


def test_a_beat_from_a_busy_thread_renews_its_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for a backend (a probe's tick) is not hanging: the work's start moves on."""
    beat = Heartbeat(tmp_path / "hb")
    clock = iter([1000.0, 1000.0, 5000.0, 5000.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    beat.busy()
    beat.beat()
    assert json.loads((tmp_path / "hb").read_text())["busy_since"] == 5000.0
