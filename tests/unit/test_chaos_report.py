"""The chaos run's verdict (``local.chaos.report``), a pure function of rows: stuck, lost, double effects, failures,
missing outputs; and the plan it runs (``local.chaos.timeline``)."""

from __future__ import annotations

from typing import Any

import pytest

from local.chaos.report import JobRow, ResultRow, Snapshot, blob_name, latency, summarize
from local.chaos.timeline import Kind, Plan, build_timeline, last_fault_end, submit_times

A, B, C, D = (f"{n}0000000-0000-0000-0000-000000000000" for n in range(1, 5))
BASE = "http://127.0.0.1:10000/devstoreaccount1/results"


def result(job_id: str, attempt: int, *, named: int | None = None, prefix: int | None = None) -> ResultRow:
    """A stored result of ``attempt`` naming attempt ``named`` with outputs under ``{job_id}/{prefix}/``."""
    folder = attempt if prefix is None else prefix
    outputs = {"ndvi": f"{BASE}/{job_id}/{folder}/ndvi.tif", "quicklook": f"{BASE}/{job_id}/{folder}/ndvi.png"}
    document: dict[str, Any] = {"attempt": attempt if named is None else named, "outputs": outputs}
    return ResultRow(job_id, attempt, document)


def blobs_of(*rows: ResultRow) -> frozenset[str]:
    return frozenset(
        name for row in rows for url in row.result["outputs"].values() if (name := blob_name(url, "results"))
    )


def snap(jobs: list[JobRow], results: list[ResultRow], blobs: frozenset[str] | None = None) -> Snapshot:
    return Snapshot(
        jobs, results, blobs_of(*results) if blobs is None else blobs, [("MaxDeliveryCountExceeded", "redrive")]
    )


def test_every_job_succeeded_once_is_ok() -> None:
    rows = [result(A, 1), result(B, 3)]
    report = summarize([A, B], snap([JobRow(A, "succeeded", 1), JobRow(B, "succeeded", 3)], rows))
    assert report["ok"] is True
    assert (report["accepted"], report["succeeded"], report["results_rows"]) == (2, 2, 2)
    assert report["attempts_histogram"] == {"1": 1, "3": 1}
    assert report["dead_letters"] == {"MaxDeliveryCountExceeded/redrive": 1}


def test_stuck_and_lost_are_counted_and_fail_the_run() -> None:
    report = summarize([A, B, C], snap([JobRow(A, "succeeded", 1), JobRow(B, "running", 2)], [result(A, 1)]))
    assert (report["stuck"], report["lost"]) == (1, 1)
    assert (report["stuck_ids"], report["lost_ids"]) == ([B], [C])
    assert report["ok"] is False


def test_a_failed_valid_job_fails_the_run_and_is_counted_by_code() -> None:
    jobs = [JobRow(A, "failed", 1, "retries_exhausted"), JobRow(B, "failed", 5, "retries_exhausted")]
    report = summarize([A, B], snap(jobs, []))
    assert report["failed_by_code"] == {"retries_exhausted": 2}
    assert report["valid_jobs_failed"] == 2
    assert report["ok"] is False


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (result(A, 2, prefix=1), "the outputs are a losing attempt's files"),
        (result(A, 2, named=1), "the document names another attempt than the row"),
    ],
)
def test_a_result_pointing_at_another_attempts_outputs_is_a_double_effect(row: ResultRow, why: str) -> None:
    report = summarize([A], snap([JobRow(A, "succeeded", 2)], [row]))
    assert report["duplicate_runs"] == 1, why
    assert report["duplicate_run_ids"] == [A]
    assert report["ok"] is False


def test_two_results_for_one_job_are_a_double_effect() -> None:
    report = summarize([A], snap([JobRow(A, "succeeded", 2)], [result(A, 1), result(A, 2)]))
    assert report["duplicate_runs"] == 1


def test_a_losing_attempts_files_are_reported_but_harmless() -> None:
    winner, loser = result(A, 2), result(A, 1)
    report = summarize([A], snap([JobRow(A, "succeeded", 2)], [winner], blobs_of(winner, loser)))
    assert report["jobs_with_losing_attempt_files"] == 1
    assert report["duplicate_runs"] == 0
    assert report["ok"] is True


def test_missing_output_blobs_and_results_without_success_fail_the_run() -> None:
    report = summarize(
        [A, B], snap([JobRow(A, "succeeded", 1), JobRow(B, "succeeded", 1)], [result(A, 1)], frozenset())
    )
    assert report["missing_output_blobs"] == 2
    assert report["results_inconsistent_ids"] == [B]
    assert report["ok"] is False


def test_rows_of_untracked_jobs_are_ignored() -> None:
    report = summarize([A], snap([JobRow(A, "succeeded", 1), JobRow(D, "running", 1)], [result(A, 1), result(D, 1)]))
    assert (report["accepted"], report["stuck"], report["results_rows"]) == (1, 0, 1)


def test_latency_summary() -> None:
    assert latency([2.0, 0.5, 1.0, 3.0]) == {"p50": 1.0, "max": 3.0, "count": 4}
    assert latency([]) == {"p50": None, "max": None, "count": 0}


def test_the_timeline_has_every_fault_and_submits_every_job() -> None:
    plan = Plan(jobs=40, pg_outage=60, blob_outage=30, orphans=5, kill_every=(30, 60), seed=3)
    timeline = build_timeline(plan)
    kinds = {fault.kind for fault in timeline}
    assert kinds == set(Kind)
    assert [f.seconds for f in timeline if f.kind is Kind.PG_OUTAGE] == [60]
    times = submit_times(plan.jobs, timeline)
    assert len(times) == 40
    assert max(times) <= last_fault_end(timeline)
    assert times == sorted(times)
    assert build_timeline(plan) == timeline  # seeded: the same plan gives the same run
