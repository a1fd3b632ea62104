"""The local Functions host as a subprocess runs an app's timer functions, honours Disabled, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_APP = """
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


@app.route(route="hello", methods=["GET"])
def hello(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("hello")
"""


def test_cli_runs_timer_functions_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "tiny_timer_app.py").write_text(textwrap.dedent(TINY_APP))
    ticks, muted = tmp_path / "ticks.txt", tmp_path / "muted.txt"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "TICK_SCHEDULE": "* * * * * *",
        "TICK_FILE": str(ticks),
        "MUTED_FILE": str(muted),
        "AzureWebJobs.muted.Disabled": "true",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "local.functions_host", "--app", "tiny_timer_app:app", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "Functions host ready: " in line:
                ready.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert ready.wait(20), "".join(lines)
        log = "".join(lines)
        assert 'tick: timer "%TICK_SCHEDULE%" = "* * * * * *"' in log
        assert 'muted: timer "* * * * * *" (disabled)' in log
        url = next(line for line in lines if "ready: " in line).split("ready: ", 1)[1].strip()
        assert httpx.get(f"{url}/hello", timeout=10).text == "hello"

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(ticks.read_text().splitlines() if ticks.exists() else []) < 2:
            time.sleep(0.05)
        assert ticks.read_text().splitlines()[:2] == ["past_due=False", "past_due=False"]
        assert not muted.exists()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        reader.join(5)
        log = "".join(lines)
        assert "Executed 'Functions.tick' (Succeeded" in log
        assert "Functions host stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
