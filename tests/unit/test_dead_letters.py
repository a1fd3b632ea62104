"""``GET /api/dead-letters`` and ``POST /api/dead-letters/replay`` on the in-memory backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from functions import deps
from shared.jobs import Job, JobStatus
from tests.contracts.api_store import letter
from tests.functions_client import body
from tests.job_api_client import get_dead_letters, replay_dead_letters
from tests.jobs import claimed, new_job
from tests.unit.test_functions import World, assert_problem


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    deps.use(w.deps())
    yield w
    deps.use(None)


def expired(world: World, sequence: int, reason: str = "TTLExpiredException") -> Job:
    """A job the reconciler failed because its message was dead-lettered, and the recorded dead letter."""
    job = new_job(world.jobs, store=world.blobs)
    moved = world.jobs.dead_lettered(job.job_id, job.generation, "message_expired", "expired")
    assert moved is not None
    world.jobs.record_dead_letter(letter(job.job_id, job.generation, sequence=sequence, reason=reason, action="failed"))
    return moved


def test_the_dead_letters_newest_first_with_their_jobs_status(world: World) -> None:
    failed = expired(world, 1)
    redriven = new_job(world.jobs)
    world.jobs.record_dead_letter(letter(redriven.job_id, 1, sequence=2, reason="MaxDeliveryCountExceeded",
                                         action="redrive"))  # fmt: skip
    response = get_dead_letters()
    assert (response.status_code, response.headers["Cache-Control"]) == (200, "no-store")
    [second, first] = body(response)["dead_letters"]
    assert (second["sequence_number"], second["action"], second["job_status"]) == (2, "redrive", "queued")
    assert first == {
        "message_id": f"{failed.job_id}:1", "sequence_number": 1, "job_id": str(failed.job_id), "generation": 1,
        "reason": "TTLExpiredException", "description": "why", "delivery_count": 10, "enqueued_at": None,
        "received_at": first["received_at"], "action": "failed", "job_status": "failed",
    }  # fmt: skip
    assert [d["sequence_number"] for d in body(get_dead_letters({"action": "failed"}))["dead_letters"]] == [1]
    assert [d["sequence_number"] for d in body(get_dead_letters({"reason": "MaxDeliveryCountExceeded"}))[
        "dead_letters"]] == [2]  # fmt: skip
    assert [d["sequence_number"] for d in body(get_dead_letters({"limit": "1", "code": "key"}))["dead_letters"]] == [2]


@pytest.mark.parametrize(
    ("params", "name"),
    [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"), ({"action": "x"}, "action")],
)
def test_a_bad_filter_is_named(world: World, params: dict[str, str], name: str) -> None:
    problem = assert_problem(get_dead_letters(params), 400, "invalid_filter")
    assert str(problem["detail"]).startswith(name)


def test_replay_retries_the_jobs_still_failed_by_their_dead_letter(world: World) -> None:
    replayed = expired(world, 1)
    retried_since = expired(world, 2)
    world.jobs.retry(retried_since.job_id)  # queued again: not a candidate any more
    failed_again = expired(world, 3)
    world.jobs.retry(failed_again.job_id)  # ... and failed again for a reason of its own: skipped
    running = claimed(world.jobs, world.job(failed_again.job_id))
    world.jobs.fail(running.job_id, running.attempts, "invalid_image", "bad")
    other_reason = expired(world, 4, reason="InvalidMessage")

    response = replay_dead_letters({"reason": "TTLExpiredException"})
    assert response.status_code == 200
    assert body(response) == {"replayed": [str(replayed.job_id)], "skipped": 1}
    now = world.job(replayed.job_id)
    assert (now.status, now.generation, now.retries, now.sent_at is not None) == (JobStatus.QUEUED, 2, 1, True)
    assert [m.message_id for m in world.publisher.messages] == [f"{replayed.job_id}:2"]
    assert world.job(other_reason.job_id).status is JobStatus.FAILED

    everything = body(replay_dead_letters(params={"limit": "10"}))
    assert everything == {"replayed": [str(other_reason.job_id)], "skipped": 1}
    assert body(replay_dead_letters()) == {"replayed": [], "skipped": 1}


def test_replay_limit_counts_dead_letters_newest_first(world: World) -> None:
    jobs = [expired(world, i) for i in range(3)]
    assert body(replay_dead_letters({"limit": 2}))["replayed"] == [str(jobs[2].job_id), str(jobs[1].job_id)]


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2]", {"limit": 0}, {"limit": 5000}, {"reason": 3}, {"unknown": 1}, b"[" * 4000,
     b'{"reason": "' + b"x" * 5000 + b'"}', b"[" * 100_000],
    ids=["not-json", "not-an-object", "limit-0", "limit-too-big", "reason-not-a-string", "unknown-member",
         "nested-too-deep", "too-long", "huge-and-nested"],
)  # fmt: skip
def test_a_bad_replay_request_is_invalid_filter(world: World, payload: object) -> None:
    expired(world, 1)
    assert_problem(replay_dead_letters(payload), 400, "invalid_filter")
    assert world.publisher.sent == []


def test_replay_of_an_unknown_job_is_skipped(world: World) -> None:
    world.jobs.record_dead_letter(letter(uuid.uuid4(), 1, sequence=1, reason="TTLExpiredException", action="failed"))
    assert body(replay_dead_letters()) == {"replayed": [], "skipped": 0}  # no job: not failed, not a candidate
