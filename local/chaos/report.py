"""What the chaos run proves, computed from rows only (pure: unit-tested in ``tests/unit/test_chaos_report.py``).

For the jobs the run tracks (accepted over HTTP, plus the orphans it made), from the ``jobs``, ``results`` and
``dead_letters`` rows and the names of the blobs in the results container:

* ``stuck``: a row that is not terminal; ``lost``: no row at all;
* ``duplicate_runs``: a job whose effects were stored twice: more than one ``results`` row, or a result whose
  attempt (the row's, or the one the result document names) differs from the ``{job_id}/{attempt}/`` prefix of any
  of its output URLs (a losing attempt's files under the winner's name);
* ``valid_jobs_failed``: failed jobs (every submitted image is valid, so none may fail);
* ``missing_output_blobs``: output URLs of stored results whose blob is not in the results container;
* ``results_inconsistent``: a succeeded job without a result, or a result on a job that did not succeed.

``ok`` holds when all of these are zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
PROBLEMS = frozenset({"failed", "queued", "running"})  # the rows shown in full in the report


@dataclass(frozen=True)
class JobRow:
    job_id: str
    status: str
    attempts: int
    error_code: str | None = None
    error_message: str | None = None
    generation: int = 1


@dataclass(frozen=True)
class ResultRow:
    job_id: str
    attempt: int
    result: Mapping[str, Any]


@dataclass(frozen=True)
class Snapshot:
    jobs: Sequence[JobRow]
    results: Sequence[ResultRow]
    result_blobs: frozenset[str]  # blob names in the results container: "{job_id}/{attempt}/{file}"
    dead_letters: Sequence[tuple[str | None, str]]  # (reason, action) of every dead_letters row


def blob_name(url: str, container: str) -> str | None:
    """The blob name in ``container`` of an output URL (``.../{account}/{container}/{name}``), or None."""
    parts = unquote(urlsplit(url).path).lstrip("/").split("/")
    if container not in parts:
        return None
    return "/".join(parts[parts.index(container) + 1 :]) or None


def _output_attempts(job_id: str, outputs: Mapping[str, Any], container: str) -> list[int | None]:
    """The attempt prefix of each output (None when the URL is not under ``{job_id}/{attempt}/``)."""
    attempts: list[int | None] = []
    for url in outputs.values():
        name = blob_name(str(url), container) or ""
        head, _, rest = name.partition("/")
        prefix = rest.partition("/")[0]
        attempts.append(int(prefix) if head == job_id and prefix.isdigit() else None)
    return attempts


def double_effects(results: Sequence[ResultRow], container: str) -> set[str]:
    """Jobs whose effects were stored twice (see the module docstring)."""
    per_job = Counter(r.job_id for r in results)
    doubled = {job_id for job_id, n in per_job.items() if n > 1}
    for row in results:
        named = row.result.get("attempt", row.attempt)
        outputs = row.result.get("outputs") or {}
        if named != row.attempt or any(a != row.attempt for a in _output_attempts(row.job_id, outputs, container)):
            doubled.add(row.job_id)
    return doubled


def missing_outputs(results: Sequence[ResultRow], blobs: frozenset[str], container: str) -> list[str]:
    missing = []
    for row in results:
        for url in (row.result.get("outputs") or {}).values():
            name = blob_name(str(url), container)
            if name is None or name not in blobs:
                missing.append(name or str(url))
    return sorted(missing)


def losing_attempt_files(results: Sequence[ResultRow], blobs: frozenset[str], ids: set[str]) -> set[str]:
    """Jobs with files under another attempt than their result's (a run fenced out after it uploaded: harmless,
    since nothing points at them; informative)."""
    winner = {row.job_id: str(row.attempt) for row in results}
    losing = set()
    for name in blobs:
        job_id, _, rest = name.partition("/")
        if job_id in ids and rest.partition("/")[0] != winner.get(job_id):
            losing.add(job_id)
    return losing


def latency(values: Iterable[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "max": None, "count": 0}
    return {"p50": round(ordered[(len(ordered) - 1) // 2], 3), "max": round(ordered[-1], 3), "count": len(ordered)}


def summarize(tracked: Iterable[str], snapshot: Snapshot, container: str = "results") -> dict[str, Any]:
    """The report's job counts and its verdict for the ``tracked`` job ids."""
    ids = set(tracked)
    jobs = {row.job_id: row for row in snapshot.jobs if row.job_id in ids}
    results = [row for row in snapshot.results if row.job_id in ids]
    with_result = {row.job_id for row in results}
    status = Counter(row.status for row in jobs.values())
    failed = Counter(row.error_code or "unknown" for row in jobs.values() if row.status == "failed")
    stuck = sorted(job_id for job_id, row in jobs.items() if row.status not in TERMINAL)
    lost = sorted(ids - set(jobs))
    succeeded = {job_id for job_id, row in jobs.items() if row.status == "succeeded"}
    inconsistent = sorted(succeeded ^ with_result)
    doubled = sorted(double_effects(results, container))
    missing = missing_outputs(results, snapshot.result_blobs, container)
    losing = losing_attempt_files(results, snapshot.result_blobs, ids)
    summary: dict[str, Any] = {
        "accepted": len(ids),
        "succeeded": status["succeeded"],
        "failed_by_code": dict(sorted(failed.items())),
        "cancelled": status["cancelled"],
        "stuck": len(stuck),
        "lost": len(lost),
        "results_rows": len(results),
        "duplicate_runs": len(doubled),
        "valid_jobs_failed": status["failed"],
        "missing_output_blobs": len(missing),
        "results_inconsistent": len(inconsistent),
        "jobs_with_losing_attempt_files": len(losing),
        "attempts_histogram": {str(k): v for k, v in sorted(Counter(r.attempts for r in jobs.values()).items())},
        "dead_letters": {
            f"{reason}/{action}": n for (reason, action), n in sorted(Counter(snapshot.dead_letters).items(), key=str)
        },
        "stuck_ids": stuck,
        "lost_ids": lost,
        "duplicate_run_ids": doubled,
        "problem_jobs": [asdict(row) for row in sorted(jobs.values(), key=_by_id) if row.status in PROBLEMS][:20],
        "missing_output_blob_names": missing[:20],
        "results_inconsistent_ids": inconsistent,
    }
    checks = ("stuck", "lost", "duplicate_runs", "valid_jobs_failed", "missing_output_blobs", "results_inconsistent")
    summary["ok"] = all(summary[name] == 0 for name in checks)
    return summary


def _by_id(row: JobRow) -> str:
    return row.job_id
