"""The local Functions host as a subprocess runs an app's timer functions, honours Disabled, stops on SIGTERM, and
with a state directory replays an occurrence missed while it was stopped, at once and past due."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.fixtures.functions_host import HostProcess

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_APP = """
import json
import os
from pathlib import Path

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.timer_trigger(schedule="%TICK_SCHEDULE%", arg_name="timer", use_monitor=False)
def tick(timer: func.TimerRequest) -> None:
    with open(os.environ["TICK_FILE"], "a") as ticks:
        ticks.write(f"past_due={timer.past_due}\\n")


@app.timer_trigger(schedule="* * * * * *", arg_name="timer", run_on_startup=True)
def muted(timer: func.TimerRequest) -> None:
    Path(os.environ["MUTED_FILE"]).write_text("ran")


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=True)
def yearly(timer: func.TimerRequest) -> None:
    seen = {"past_due": timer.past_due, "schedule_status": timer.schedule_status}
    with open(os.environ["YEARLY_FILE"], "a") as out:
        out.write(json.dumps(seen) + "\\n")


@app.route(route="hello", methods=["GET"])
def hello(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("hello")
"""
NEVER = "0001-01-01T00:00:00+00:00"


class Host(HostProcess):
    """The local Functions host serving the timer test app in ``cwd``."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        super().__init__(cwd, env, "tiny_timer_app:app", *args)


@contextmanager
def running(cwd: Path, env: dict[str, str], *args: str) -> Iterator[Host]:
    host = Host(cwd, env, *args)
    try:
        assert host.ready.wait(20), host.log
        yield host
    finally:
        if host.proc.poll() is None:
            host.proc.kill()
            host.proc.wait()
        if host.proc.stderr is not None:
            host.proc.stderr.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _app_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tiny_timer_app.py").write_text(textwrap.dedent(TINY_APP))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TICK_SCHEDULE": "* * * * * *",
        "TICK_FILE": str(tmp_path / "ticks.txt"),
        "MUTED_FILE": str(tmp_path / "muted.txt"),
        "YEARLY_FILE": str(tmp_path / "yearly.txt"),
        "AzureWebJobs.muted.Disabled": "true",
    }
    env.pop("FUNCTIONS_HOST_STATE_DIR", None)
    return env


def test_cli_runs_timer_functions_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = _app_env(tmp_path)
    ticks, muted, yearly = tmp_path / "ticks.txt", tmp_path / "muted.txt", tmp_path / "yearly.txt"
    with running(tmp_path, env) as host:
        assert 'tick: timer "%TICK_SCHEDULE%" = "* * * * * *"' in host.log
        assert 'muted: timer "* * * * * *" (disabled)' in host.log
        assert "the timers' schedule monitor is off" in host.log
        url = next(line for line in host.lines if "ready: " in line).split("ready: ", 1)[1].strip()
        assert httpx.get(f"{url}/hello", timeout=10).text == "hello"

        assert _wait_for(lambda: len(_lines(ticks)) >= 2 and bool(_lines(yearly)), timeout=5)
        assert _lines(ticks)[:2] == ["past_due=False", "past_due=False"]
        assert [json.loads(line) for line in _lines(yearly)] == [{"past_due": False, "schedule_status": {}}]
        assert not muted.exists()

        assert host.stop() == 0
        assert "Executed 'Functions.tick' (Succeeded" in host.log
        assert "Functions host stopped" in host.log
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == [
        "ticks.txt",
        "tiny_timer_app.py",
        "yearly.txt",
    ]  # no state kept without a state directory


def test_cli_runs_an_occurrence_missed_while_stopped_at_once_as_past_due(tmp_path: Path) -> None:
    env = _app_env(tmp_path)
    yearly, state = tmp_path / "yearly.txt", tmp_path / "state"
    status_file = state / "timers" / "yearly.json"

    def status() -> dict[str, str]:
        return dict(json.loads(status_file.read_text())) if status_file.exists() else {}

    with running(tmp_path, env, "--state-dir", str(state)) as host:
        assert _wait_for(lambda: status().get("Last", NEVER) != NEVER, timeout=5), host.log  # after run-on-startup
        [first] = [json.loads(line) for line in _lines(yearly)]
        assert first["past_due"] is False
        assert first["schedule_status"]["Last"] == NEVER
        assert host.stop() == 0
    assert sorted(p.name for p in status_file.parent.iterdir()) == ["yearly.json"]  # tick: use_monitor=False

    missed = {"Last": "2020-01-01T00:00:00+00:00", "Next": "2021-01-01T00:00:00+00:00"}
    missed["LastUpdated"] = missed["Last"]  # as if the host had been down since 2020
    status_file.write_text(json.dumps(missed))
    with running(tmp_path, {**env, "FUNCTIONS_HOST_STATE_DIR": str(state)}) as host:
        assert _wait_for(lambda: len(_lines(yearly)) >= 2, timeout=5), host.log
        assert json.loads(_lines(yearly)[1]) == {"past_due": True, "schedule_status": missed}
        assert "Function 'yearly' is past due on startup" in host.log
        next_year = f"{datetime.now(UTC).year + 1}-01-01T00:00:00+00:00"
        assert _wait_for(lambda: status().get("Next") == next_year, timeout=5), status()
        time.sleep(0.3)
        assert len(_lines(yearly)) == 2  # past due instead of run on startup, not as well
        assert host.stop() == 0
