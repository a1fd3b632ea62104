"""``POST /api/batches`` and ``GET /api/batches/{id}`` on the in-memory backends: all or none (nothing of a batch
is sent before every image is stored, by the submit or by the reconciler), the first refused image by index, a
failed upload that fails the whole batch, replays, admission control, the batch's status in the request's order."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from functions import deps
from shared import batches
from shared.batches import batch_view
from shared.errors import BusUnavailable, StorageUnavailable
from shared.jobs import JobStatus, NewJob
from shared.reconciler import Policy, Reconciler, Report
from tests import geotiffs
from tests.fakes import RecordingOutbox
from tests.functions_client import body
from tests.job_api_client import call, get_batch, post_batch
from tests.jobs import GONE, claimed, job_record, new_job
from tests.unit.test_functions import World, assert_problem

IMAGES = [geotiffs.crafted(width=32 + i) for i in range(3)]


class FlakyStore:
    """Fails the ``fail_at``-th upload (1-based) with the storage down."""

    def __init__(self, world: World, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = world.blobs, fail_at, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def put_input(self, job_id: uuid.UUID, data: bytes, sha256: str) -> str:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StorageUnavailable("azurite down at 10.0.0.4")
        return self.inner.put_input(job_id, data, sha256)


def reconcile(world: World, abort_after: timedelta) -> Report:
    """One reconciler run that resends every unconfirmed job; ``abort_after``: when a submit counts as dead."""
    policy = Policy(resend_after=GONE, max_attempts=3, batch=100, abort_after=abort_after)
    return Reconciler(world.jobs, world.blobs, world.publisher, world.inbox, policy, outbox=RecordingOutbox()).run()


class ReconciledMidway(FlakyStore):
    """Slow uploads: the reconciler runs before the ``at``-th upload (1-based), which then fails if ``fail``."""

    def __init__(self, world: World, at: int, abort_after: timedelta, *, fail: bool) -> None:
        super().__init__(world, fail_at=at if fail else 0)
        self.world, self.at, self.abort_after = world, at, abort_after
        self.report: Report | None = None

    def put_input(self, job_id: uuid.UUID, data: bytes, sha256: str) -> str:
        if self.calls + 1 == self.at:
            self.report = reconcile(self.world, self.abort_after)
        return super().put_input(job_id, data, sha256)


@pytest.fixture
def world() -> Iterator[World]:
    w = World(MAX_BATCH_SIZE="4", WEBHOOK_ALLOW_PRIVATE="true")
    deps.use(w.deps())
    yield w
    deps.use(None)


def test_a_batch_is_recorded_stored_and_sent_in_the_requests_order(world: World) -> None:
    response = post_batch(IMAGES, params={"priority": "high"})
    assert response.status_code == 202
    accepted = body(response)
    batch_id = accepted["batch_id"]
    assert response.headers["Location"] == f"/api/batches/{batch_id}"
    assert accepted["status_url"] == f"http://127.0.0.1:7071/api/batches/{batch_id}"
    assert response.headers["Retry-After"] == "3"
    assert "webhook_secret" not in accepted
    job_ids = [uuid.UUID(j["job_id"]) for j in accepted["jobs"]]
    assert [j["status_url"] for j in accepted["jobs"]] == [f"http://127.0.0.1:7071/api/jobs/{i}" for i in job_ids]
    for job_id, data in zip(job_ids, IMAGES, strict=True):
        job = world.job(job_id)
        assert (job.status, str(job.batch_id), job.priority, job.sent_at is not None) == (
            JobStatus.QUEUED, batch_id, "high", True,
        )  # fmt: skip
        assert job.input_sha256 == hashlib.sha256(data).hexdigest()
        assert world.blobs.blobs[f"images/{job_id}/input.tif"][0] == data
    assert [m.message_id for m in world.publisher.messages] == [f"{i}:1" for i in job_ids]
    assert {m.priority for m in world.publisher.messages} == {"high"}

    view = body(get_batch(batch_id))
    assert (view["batch_id"], view["size"], view["status"]) == (batch_id, 3, "queued")
    assert view["counts"] == {"queued": 3, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert [j["job_id"] for j in view["jobs"]] == list(map(str, job_ids))


def test_the_batch_status_follows_its_jobs(world: World) -> None:
    batch_id = body(post_batch(IMAGES[:2]))["batch_id"]
    first, second = world.jobs.batch_jobs(uuid.UUID(batch_id)) or []
    running = claimed(world.jobs, first)
    response = get_batch(batch_id)
    assert (body(response)["status"], response.headers["Cache-Control"]) == ("running", "no-store")
    assert response.headers["Retry-After"] == "3"
    world.jobs.fail(running.job_id, running.attempts, "invalid_image", "bad")
    world.jobs.cancel(second.job_id)
    done = get_batch(batch_id)
    view = body(done)
    assert view["status"] == "completed"
    assert (view["counts"]["failed"], view["counts"]["cancelled"]) == (1, 1)
    assert {j["job_id"]: j["error_code"] for j in view["jobs"]} == {str(first.job_id): "invalid_image",
                                                                    str(second.job_id): None}  # fmt: skip
    assert "Retry-After" not in done.headers


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([JobStatus.QUEUED], "queued"),
        ([JobStatus.QUEUED, JobStatus.RUNNING], "running"),
        ([JobStatus.QUEUED, JobStatus.SUCCEEDED], "running"),
        ([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED], "completed"),
    ],
)
def test_batch_view_status(statuses: list[JobStatus], expected: str) -> None:
    assert batch_view(uuid.uuid4(), [job_record(s) for s in statuses]).status == expected


@pytest.mark.parametrize(
    ("images", "status", "code"),
    [([], 400, "empty_batch"), ([IMAGES[0]] * 5, 413, "batch_too_large")],
)
def test_the_number_of_images_is_bounded(world: World, images: list[bytes], status: int, code: str) -> None:
    assert_problem(post_batch(images), status, code)
    assert world.jobs._jobs == {}


def test_a_form_without_image_fields_is_an_empty_batch(world: World) -> None:
    assert_problem(post_batch(IMAGES, field="file"), 400, "empty_batch")


def test_a_batch_must_be_multipart(world: World) -> None:
    response = call("submit_batch", "POST", "batches", body=IMAGES[0], headers={"Content-Type": "image/tiff"})
    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("bad", "status", "code"),
    [(b"just some text", 400, "not_a_tiff"), (geotiffs.crafted(descriptions=None), 422, "bands_required")],
)
def test_the_first_refused_image_is_named_by_its_index_and_nothing_is_stored(
    world: World, bad: bytes, status: int, code: str
) -> None:
    problem = assert_problem(post_batch([IMAGES[0], bad, b"also bad"]), status, code)
    assert problem["index"] == 1
    assert "image 1" in str(problem["detail"])
    assert (world.jobs._jobs, world.blobs.blobs, world.publisher.sent) == ({}, {}, [])


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"priority": "urgent"}, "invalid_priority"),
        ({"callback_url": "ftp://example.com/hook"}, "invalid_callback_url"),
        ({"callback_url": "https://example.com/hook", "callback_events": "finished"}, "invalid_callback_events"),
    ],
)
def test_options_are_validated_once_for_the_batch(world: World, params: dict[str, str], code: str) -> None:
    assert_problem(post_batch(IMAGES, params=params), 400, code)
    assert world.jobs._jobs == {}


def test_an_upload_failure_fails_every_job_of_the_batch_and_a_same_key_replay_resubmits_them(world: World) -> None:
    world.blobs = FlakyStore(world, fail_at=2)  # type: ignore[assignment]
    deps.use(world.deps())
    failed = post_batch(IMAGES, headers={"Idempotency-Key": "batch-1"})
    problem = assert_problem(failed, 503, "enqueue_failed")
    assert failed.headers["Retry-After"] == "3"
    assert "10.0.0.4" not in failed.get_body().decode()
    batch_id = uuid.UUID(str(problem["batch_id"]))
    jobs = world.jobs.batch_jobs(batch_id) or []
    assert [(j.status, j.error_code) for j in jobs] == [(JobStatus.FAILED, "enqueue_failed")] * 3
    assert world.publisher.sent == []
    assert body(get_batch(batch_id))["status"] == "completed"

    replay = post_batch(IMAGES, headers={"Idempotency-Key": "batch-1"})  # the storage is back (one failure only)
    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert body(replay)["batch_id"] == str(batch_id)
    assert {j["status"] for j in body(replay)["jobs"]} == {"queued"}
    assert sorted(m.message_id for m in world.publisher.messages) == sorted(f"{j.job_id}:2" for j in jobs)


def test_a_same_key_replay_answers_the_same_jobs_in_the_replays_order_and_sends_nothing(world: World) -> None:
    first = body(post_batch(IMAGES, headers={"Idempotency-Key": "batch-2"}))
    replay = post_batch(list(reversed(IMAGES)), headers={"Idempotency-Key": "batch-2"})
    assert replay.status_code == 200
    assert body(replay)["batch_id"] == first["batch_id"]
    assert [j["job_id"] for j in body(replay)["jobs"]] == [j["job_id"] for j in reversed(first["jobs"])]
    assert len(world.publisher.sent) == 3


def test_a_replay_of_an_unconfirmed_batch_sends_the_same_messages_again(world: World) -> None:
    world.publisher.failure = BusUnavailable("emulator down")
    first = post_batch(IMAGES[:2], headers={"Idempotency-Key": "batch-3"})
    assert first.status_code == 202  # ambiguous sends: the jobs stay queued for the reconciler
    assert {j.sent_at for j in world.jobs._jobs.values()} == {None}
    world.publisher.failure = None
    assert post_batch(IMAGES[:2], headers={"Idempotency-Key": "batch-3"}).status_code == 200
    assert sorted(m.message_id for m in world.publisher.messages) == sorted(f"{j['job_id']}:1"
                                                                          for j in body(first)["jobs"])  # fmt: skip
    assert all(j.sent_at is not None for j in world.jobs._jobs.values())


def test_a_same_key_batch_with_other_images_conflicts(world: World) -> None:
    first = body(post_batch(IMAGES[:2], headers={"Idempotency-Key": "batch-4"}))
    for other in ([IMAGES[0], IMAGES[2]], IMAGES):
        problem = assert_problem(post_batch(other, headers={"Idempotency-Key": "batch-4"}), 409, "idempotency_conflict")
        assert problem["batch_id"] == first["batch_id"]
    assert len(world.jobs._jobs) == 2


def test_admission_control_counts_the_whole_batch_but_lets_a_replay_through() -> None:
    world = World(MAX_BACKLOG="4", MAX_BATCH_SIZE="10")
    deps.use(world.deps())
    try:
        new_job(world.jobs)
        assert post_batch(IMAGES[:2], headers={"Idempotency-Key": "b"}).status_code == 202  # 3 queued
        full = post_batch(IMAGES[:2])
        problem = assert_problem(full, 429, "backlog_full")
        assert full.headers["Retry-After"] == "3"
        assert "3 jobs are queued" in str(problem["detail"])
        assert post_batch(IMAGES[:1]).status_code == 202  # 4 queued: exactly full
        assert post_batch(IMAGES[:2], headers={"Idempotency-Key": "b"}).status_code == 200
        assert_problem(post_batch(IMAGES[:1], headers={"Idempotency-Key": "new"}), 429, "backlog_full")
    finally:
        deps.use(None)


def test_a_callback_gives_the_batch_one_secret_for_every_job(world: World) -> None:
    params = {"callback_url": "http://127.0.0.1:9/hook", "callback_events": "started,completed"}
    first = body(post_batch(IMAGES[:2], params=params, headers={"Idempotency-Key": "hooked"}))
    secret = first["webhook_secret"]
    assert secret.startswith("whsec_")
    for job in first["jobs"]:
        stored = world.job(job["job_id"])
        assert (stored.callback_url, stored.callback_events) == ("http://127.0.0.1:9/hook", ["started", "completed"])
        assert world.jobs.webhook_secret(stored.job_id) == secret
    replay = body(post_batch(IMAGES[:2], params=params, headers={"Idempotency-Key": "hooked"}))
    assert replay["webhook_secret"] == secret


def test_batch_status_of_an_unknown_or_malformed_id(world: World) -> None:
    assert_problem(get_batch(uuid.uuid4()), 404, "batch_not_found")
    assert_problem(get_batch("nope"), 400, "invalid_batch_id")


def test_a_batch_whose_submit_died_mid_upload_sends_nothing_and_is_aborted_whole(world: World) -> None:
    """The submit's process died after create_batch, with two of three images stored: the reconciler sends none of
    the batch, and once the submit counts as dead it fails every job, whatever its image; a replay resubmits all."""
    params = {"bands": ["B04", "B08"], "scale": 1.0, "analysis": "crop-health"}
    new = [NewJob(job_id=(i := uuid.uuid4()), input_blob=f"{i}/input.tif", input_sha256=hashlib.sha256(d).hexdigest(),
                  params=params) for d in IMAGES]  # fmt: skip
    batch_id = uuid.uuid4()
    jobs, _ = world.jobs.create_batch(batch_id, new, "died")
    for job, data in zip(jobs[:2], IMAGES[:2], strict=True):
        world.blobs.put_input(job.job_id, data, job.input_sha256)

    alive = reconcile(world, abort_after=timedelta(hours=1))
    assert (alive.resent, alive.aborted, world.publisher.sent) == (0, 0, [])
    dead = reconcile(world, abort_after=GONE)
    assert (dead.resent, dead.aborted, world.publisher.sent) == (0, 3, [])
    assert [(j.status, j.error_code) for j in world.jobs.batch_jobs(batch_id) or []] == [
        (JobStatus.FAILED, "enqueue_failed")
    ] * 3
    assert reconcile(world, abort_after=GONE).changed == 0

    replay = post_batch(IMAGES, headers={"Idempotency-Key": "died"})
    assert (replay.status_code, body(replay)["batch_id"]) == (200, str(batch_id))
    assert [m.message_id for m in world.publisher.messages] == [f"{j.job_id}:2" for j in jobs]
    assert all(f"images/{j.job_id}/input.tif" in world.blobs.blobs for j in jobs)


@pytest.mark.parametrize(
    ("abort_after", "fail", "status"),
    [(timedelta(hours=1), False, 202), (timedelta(hours=1), True, 503), (GONE, False, 503)],
    ids=["uploads-succeed", "last-upload-fails", "aborted-meanwhile"],
)
def test_a_reconcile_during_slow_uploads_sends_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, abort_after: timedelta, fail: bool, status: int
) -> None:
    """Uploads slower than RECONCILE_RESEND_AFTER: the reconciler runs with two images stored and resends none of
    them. The batch then goes out whole (generation 1), or, if the last upload fails or the reconciler took the
    submit for dead (aborted-meanwhile), is failed whole with nothing sent."""
    monkeypatch.setattr(batches, "UPLOADS", 1)  # one upload at a time: two are stored when the reconciler runs
    store = ReconciledMidway(world, at=3, abort_after=abort_after, fail=fail)
    world.blobs = store  # type: ignore[assignment]
    deps.use(world.deps())
    response = post_batch(IMAGES)
    assert response.status_code == status, body(response)
    assert store.report is not None
    assert store.report.resent == 0
    jobs = list(world.jobs._jobs.values())
    if status == 202:
        assert [m.message_id for m in world.publisher.messages] == [f"{j['job_id']}:1" for j in body(response)["jobs"]]
    else:
        assert world.publisher.sent == []
        assert {(j.status, j.error_code) for j in jobs} == {(JobStatus.FAILED, "enqueue_failed")}
