"""One chaos run: start the stack, submit while the faults hit, wait for the jobs to settle, judge, stop the stack.

The stack is always stopped (also on an error or Ctrl-C); its data and logs stay in ``ROOT`` for investigation.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient

from local.chaos.client import Submitter
from local.chaos.collect import snapshot, wait_settled
from local.chaos.faults import FaultRunner
from local.chaos.report import latency, summarize
from local.chaos.supervisor import Supervisor, copy_code, data_root, synchronous_commit
from local.chaos.timeline import Plan, build_timeline, submit_times
from local.stack import REPO_ROOT, StackConfig

logger = logging.getLogger(__name__)

# Tuned so that healing happens within the run (names: shared/settings.py's aliases, as app settings).
SETTINGS = {
    "RECONCILE_SCHEDULE": "*/10 * * * * *",
    "RECONCILE_RESEND_AFTER": "PT30S",
    "JOB_LEASE": "PT20S",
    "RETRY_BACKOFF": "PT5S",
    "RETRY_BACKOFF_MAX": "PT60S",
    "JOB_MAX_ATTEMPTS": "5",
}


# Every 4th job is submitted by reference: the URL of one blob of the images container holding the same image.
BY_REFERENCE_EVERY = 4


@dataclass(frozen=True)
class Options:
    plan: Plan
    base: Path  # each run gets its own directory under it
    image: Path
    bands: str
    workers: int
    submit_timeout: float  # seconds one job's submit is retried for
    settle_timeout: float
    settings: dict[str, str] = field(default_factory=lambda: dict(SETTINGS))


def run(options: Options) -> dict[str, Any]:
    """Do the run; the report (``ok`` says whether nothing was stuck, lost, run twice or failed)."""
    begun = time.monotonic()
    code = _code_version()
    timeline = build_timeline(options.plan)
    times = submit_times(options.plan.jobs, timeline)
    image = options.image.read_bytes()
    root = data_root(options.base)
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the run's own PostgreSQL
    config = StackConfig(root, 0, 0, 0, 0, workers=options.workers, env=options.settings, repo=copy_code(root))
    rng = random.Random(options.plan.seed)
    supervisor = Supervisor(config, environ, rng)
    stop = threading.Event()
    durability = "not started"
    crashed: list[dict[str, Any]] = []  # services that exited on their own (restarted by the watchdog)
    report: dict[str, Any] = {"ok": False, "root": str(root)}
    logger.info("chaos: stack in %s, logs in %s", root, root / "logs")
    try:
        supervisor.start()
        durability = synchronous_commit(supervisor.state["database_url"])
        started = time.monotonic()
        watchdog = threading.Thread(target=_watch, args=(supervisor, stop, started, crashed), daemon=True)
        watchdog.start()
        run_id = root.name
        images = options.settings.get("IMAGES_CONTAINER", "images")
        reference = _reference(supervisor.state["blob_connection_string"], images, run_id, image)
        submitter = Submitter(
            supervisor.state["api_url"],
            image,
            options.bands,
            run_id=run_id,
            started=started,
            stop=stop,
            deadline=options.submit_timeout,
            reference=reference,
            every=BY_REFERENCE_EVERY,
        )
        runner = FaultRunner(
            supervisor, submitter, started=started, stop=stop, image=image, bands=options.bands, rng=rng
        )
        submitting = threading.Thread(target=submitter.run, args=(times,), name="submitter", daemon=True)
        submitting.start()
        records = runner.run(timeline)
        submitting.join()
        chaos_s = time.monotonic() - started
        tracked = [*submitter.accepted.values(), *runner.orphans]
        logger.info("chaos: faults over after %.0f s; waiting for %d jobs to settle", chaos_s, len(tracked))
        settled = wait_settled(supervisor.state["database_url"], tracked, options.settle_timeout, stop)
        container = options.settings.get("RESULTS_CONTAINER", "results")
        state = supervisor.state
        rows = snapshot(state["database_url"], state["blob_connection_string"], container, tracked)
        summary = summarize(tracked, rows, container)
        refused = _refused_by_reference(submitter)
        report = {
            "ok": summary["ok"] and not refused,
            **summary,
            "by_reference_refused": refused,
            **_submits(submitter, len(times)),
            "orphans": {"count": len(runner.orphans), "job_ids": runner.orphans},
            "timeline": [r.to_json() for r in records],
            "faults_failed": sum(r.error is not None for r in records),
            "unexpected_exits": crashed,
            "settled": settled,
            "chaos_s": round(chaos_s, 1),
            "settle_s": round(time.monotonic() - started - chaos_s, 1),
            "root": str(root),
        }
    finally:
        stop.set()
        supervisor.close()
    report["duration_s"] = round(time.monotonic() - begun, 1)
    report["settings"] = {
        **_settings(options, supervisor),
        "postgres": {"synchronous_commit": durability, "outage_stop": "SIGQUIT (immediate shutdown: a crash)"},
        "code": {**code, "copy": str(supervisor.config.repo)},
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _reference(blob_connection_string: str, container: str, run_id: str, image: bytes) -> str:
    """The image as a blob of the stack's images container (``chaos/{run_id}/input.tif``): its URL."""
    with BlobServiceClient.from_connection_string(blob_connection_string) as service:
        blob = service.get_blob_client(container, f"chaos/{run_id}/input.tif")
        blob.upload_blob(image, overwrite=True)
        return str(blob.url)


def _refused_by_reference(submitter: Submitter) -> dict[str, str]:
    """The jobs submitted by reference that got a final refusal (a 4xx) instead of being accepted: the run's
    reference to its own blob is refused, so that path went untested."""
    return {key: outcome for key, outcome in sorted(submitter.given_up.items())
            if key in submitter.by_reference and outcome.startswith("4")}  # fmt: skip


def _watch(supervisor: Supervisor, stop: threading.Event, started: float, found: list[dict[str, Any]]) -> None:
    """Every second, restart what exited without being told to (a worker's exit 75, a crash), as a supervisor would."""
    while not stop.wait(1.0):
        try:
            found += [{"at": round(time.monotonic() - started, 1), **c} for c in supervisor.restart_crashed()]
        except Exception:  # a restart that fails is logged (and the jobs it strands show in the report)
            logger.exception("chaos: the watchdog could not restart a service")


def _submits(submitter: Submitter, jobs: int) -> dict[str, Any]:
    requests = list(submitter.requests)
    unavailable = [r for r in requests if r.status == 503]
    by_code: dict[str, list[float]] = {}
    for request in unavailable:
        by_code.setdefault(request.code or "none", []).append(request.seconds)
    outcomes = Counter(f"{r.status or 'no answer'} {r.code or ''}".strip() for r in requests)
    return {
        "accepted_via_http": len(submitter.accepted),
        "accepted_by_reference": len(submitter.by_reference & set(submitter.accepted)),
        "submits": {
            "jobs": jobs,
            "accepted": len(submitter.accepted),
            "given_up": len(submitter.given_up),
            "given_up_by_last_answer": dict(Counter(submitter.given_up.values())),
            "requests": len(requests),
            "by_outcome": dict(sorted(outcomes.items())),
        },
        "submit_503_latency_s": latency(r.seconds for r in unavailable),
        "submit_503_latency_by_code_s": {code: latency(values) for code, values in sorted(by_code.items())},
        "submit_accepted_latency_s": latency(r.seconds for r in requests if r.status in (200, 202)),
    }


def _code_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout

    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted_files": len(git("--no-optional-locks", "status", "--porcelain").splitlines()),
    }


def _settings(options: Options, supervisor: Supervisor) -> dict[str, Any]:
    queue_config = json.loads(supervisor.config.servicebus_config.read_text())
    queue = queue_config["UserConfig"]["Namespaces"][0]["Queues"][0]
    return {
        **options.settings,
        "workers": options.workers,
        "queue": {"name": queue["Name"], **{k: queue["Properties"][k] for k in ("LockDuration", "MaxDeliveryCount")}},
        "plan": {**asdict(options.plan), "kill_every": list(options.plan.kill_every)},
        "image": str(options.image),
        "bands": options.bands,
        "submit_timeout_s": options.submit_timeout,
        "settle_timeout_s": options.settle_timeout,
    }
