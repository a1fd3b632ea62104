"""The submit use case on the in-memory job store, blob store and publisher (:mod:`tests.fakes`)."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime

import pytest

from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.geotiff import Limits
from shared.jobs import IdempotencyConflict, Job, JobStatus
from shared.messages import JobMessage
from shared.rejection import Rejected
from shared.submission import BacklogGauge, EnqueueFailed, Policy, Submitted, Upload, submit
from tests import geotiffs
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryPublisher
from tests.jobs import GONE, claimed

LIMITS = Limits(max_bytes=10 * 1024 * 1024, max_pixels=10_000_000, max_bands=32)


class World:
    def __init__(self) -> None:
        self.jobs = InMemoryJobStore()
        self.store = InMemoryBlobStore()
        self.publisher = InMemoryPublisher()

    def submit(self, upload: Upload) -> Submitted:
        return submit(upload, limits=LIMITS, jobs=self.jobs, store=self.store, publisher=self.publisher)

    def job(self, job_id: uuid.UUID) -> Job:
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    def message_ids(self) -> list[str]:
        return [m.message_id for m in self.publisher.messages]


@pytest.fixture
def world() -> World:
    return World()


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "action", "") for r in caplog.records if r.name == "shared.submission"]


def test_a_real_scene_is_recorded_stored_sent_and_confirmed(world: World, caplog: pytest.LogCaptureFixture) -> None:
    data = geotiffs.real()
    with caplog.at_level(logging.INFO, logger="shared.submission"):
        outcome = world.submit(Upload(data))
    job = outcome.job
    assert outcome.created
    assert (job.status, job.generation, job.attempts) == (JobStatus.QUEUED, 1, 0)
    assert job.sent_at is not None  # the send is confirmed: the reconciler leaves the job alone
    assert world.job(job.job_id) == job
    sha = hashlib.sha256(data).hexdigest()
    assert world.store.blobs == {f"images/{job.job_id}/input.tif": (data, {"sha256": sha})}
    [(message, at)] = world.publisher.sent
    assert at is None  # due now
    assert message.message_id == f"{job.job_id}:1"
    assert message == JobMessage.for_job(job)
    assert (message.input_blob, message.input_sha256) == (f"{job.job_id}/input.tif", sha)
    assert message.bands == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert (message.scale, message.analysis, message.submitted_at) == (10000.0, "crop-health", job.created_at)
    accepted = [r for r in caplog.records if getattr(r, "action", None) == "submit"]
    assert [getattr(r, "job_id", None) for r in accepted] == [str(job.job_id)]


@pytest.mark.parametrize(
    ("upload", "bands", "scale", "analysis"),
    [
        (Upload(geotiffs.crafted(dtype="float32")), ["B02", "B03", "B04", "B08"], 1.0, "crop-health"),
        (
            Upload(geotiffs.crafted(descriptions=None), bands="blue, green,red,nir", scale="255"),
            ["blue", "green", "red", "nir"],
            255.0,
            "crop-health",
        ),
        (
            Upload(geotiffs.crafted(), analysis="model:field-types_v2.1"),
            ["B02", "B03", "B04", "B08"],
            1e4,
            "model:field-types_v2.1",
        ),
        (
            Upload(geotiffs.crafted(), bands="SR_B2,SR_B3,SR_B4,SR_B5"),
            ["SR_B2", "SR_B3", "SR_B4", "SR_B5"],
            1e4,
            "crop-health",
        ),
    ],
    ids=["float-scale-1", "query-bands-and-scale", "model-analysis", "landsat-names"],
)
def test_parameters(world: World, upload: Upload, bands: list[str], scale: float, analysis: str) -> None:
    job = world.submit(upload).job
    assert job.params == {"bands": bands, "scale": scale, "analysis": analysis}
    [message] = world.publisher.messages
    assert (message.bands, message.scale, message.analysis) == (bands, scale, analysis)


@pytest.mark.parametrize(
    ("upload", "code"),
    [
        (Upload(b""), "empty_body"),
        (Upload(b"plain text"), "not_a_tiff"),
        (Upload(geotiffs.crafted(descriptions=None)), "bands_required"),
        (Upload(geotiffs.crafted(descriptions=("B02", None, "B04", "B08"))), "bands_required"),
        (Upload(geotiffs.crafted(), bands="B04,B08"), "band_count_mismatch"),
        (Upload(geotiffs.crafted(), bands="B02,,B04,B08"), "invalid_bands"),
        (Upload(geotiffs.crafted(), bands="B02,B03,B04,XX"), "invalid_bands"),
        (Upload(geotiffs.crafted(), bands="B02,B03,B04,B4"), "invalid_bands"),  # Sentinel-2 and Landsat mixed
        (Upload(geotiffs.crafted(), bands="B02,B03,B04,B05"), "missing_bands"),  # no NIR
        (Upload(geotiffs.crafted(), scale="0"), "invalid_scale"),
        (Upload(geotiffs.crafted(), scale="-3"), "invalid_scale"),
        (Upload(geotiffs.crafted(), scale="nan"), "invalid_scale"),
        (Upload(geotiffs.crafted(), scale="inf"), "invalid_scale"),
        (Upload(geotiffs.crafted(), scale="ten"), "invalid_scale"),
        (Upload(geotiffs.crafted(), analysis="ndvi"), "invalid_analysis"),
        (Upload(geotiffs.crafted(), analysis="model:"), "invalid_analysis"),
        (Upload(geotiffs.crafted(), analysis="model:../../etc/passwd"), "invalid_analysis"),
        (Upload(geotiffs.crafted(), idempotency_key=""), "invalid_idempotency_key"),
        (Upload(geotiffs.crafted(), idempotency_key="x" * 256), "invalid_idempotency_key"),
        (Upload(geotiffs.crafted(), idempotency_key="with space"), "invalid_idempotency_key"),
        (Upload(geotiffs.huge_sparse()), "image_too_large"),
    ],
)
def test_refusals_store_nothing(world: World, upload: Upload, code: str) -> None:
    with pytest.raises(Rejected) as info:
        world.submit(upload)
    assert info.value.code == code
    assert world.store.blobs == {}
    assert world.publisher.sent == []
    assert world.jobs.unsent(GONE, limit=10) == []  # no job row either


# Failures of the hand-over


def test_an_upload_failure_fails_the_job_and_sends_nothing(world: World) -> None:
    world.store.failure = StorageUnavailable("azurite down")
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(geotiffs.crafted()))
    assert info.value.transient
    assert info.value.code == "enqueue_failed"
    job = world.job(info.value.job_id)
    assert (job.status, job.error_code, job.generation) == (JobStatus.FAILED, "enqueue_failed", 1)
    assert job.error_message is not None
    assert "azurite down" in job.error_message
    assert job.finished_at is not None
    assert world.publisher.sent == []


def test_a_send_failure_is_ambiguous_and_never_fails_the_job(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.publisher.failure = BusUnavailable("emulator down")
    with caplog.at_level(logging.WARNING, logger="shared.submission"):
        outcome = world.submit(Upload(geotiffs.crafted()))
    assert outcome.created
    job = world.job(outcome.job.job_id)
    assert (job.status, job.sent_at, job.error_code, job.generation) == (JobStatus.QUEUED, None, None, 1)
    assert outcome.job == job
    assert list(world.store.blobs) == [f"images/{job.job_id}/input.tif"]  # stored: the reconciler can resend
    assert world.publisher.sent == []
    assert "enqueue" in actions(caplog)


class DatabaseDownAfterTheSend(InMemoryPublisher):
    """The message reaches the bus; the database goes away before the send is confirmed."""

    def __init__(self, jobs: InMemoryJobStore) -> None:
        super().__init__()
        self._jobs = jobs

    def send(self, message: JobMessage, *, at: datetime | None = None) -> None:
        super().send(message, at=at)
        self._jobs.failure = DatabaseUnavailable("connection reset")


def test_a_confirm_failure_still_answers(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.publisher = DatabaseDownAfterTheSend(world.jobs)
    with caplog.at_level(logging.WARNING, logger="shared.submission"):
        outcome = world.submit(Upload(geotiffs.crafted()))
    assert outcome.created
    assert (outcome.job.status, outcome.job.sent_at) == (JobStatus.QUEUED, None)
    assert world.message_ids() == [f"{outcome.job.job_id}:1"]
    assert any("not recorded" in r.getMessage() for r in caplog.records)
    world.jobs.failure = None
    job = world.job(outcome.job.job_id)
    assert (job.status, job.sent_at) == (JobStatus.QUEUED, None)  # left to a claim or the reconciler


# Idempotency-Key replays


def test_a_replay_of_an_unconfirmed_job_sends_the_same_generation_again(world: World) -> None:
    data = geotiffs.crafted()
    world.publisher.failure = BusUnavailable("down")
    first = world.submit(Upload(data, idempotency_key="k"))
    world.publisher.failure = None
    world.store.blobs.clear()  # as if the first submit had died between the insert and the upload
    again = world.submit(Upload(data, idempotency_key="k"))
    assert not again.created
    assert again.job.job_id == first.job.job_id
    assert world.message_ids() == [f"{first.job.job_id}:1"]  # the same message id: duplicate detection drops it
    assert list(world.store.blobs) == [f"images/{first.job.job_id}/input.tif"]
    job = world.job(first.job.job_id)
    assert (job.status, job.generation) == (JobStatus.QUEUED, 1)
    assert job.sent_at is not None
    assert again.job == job


def test_a_replay_after_a_lost_confirm_resends_the_same_message_id_never_a_new_one(world: World) -> None:
    data = geotiffs.crafted()
    world.publisher = lost_confirm = DatabaseDownAfterTheSend(world.jobs)
    first = world.submit(Upload(data, idempotency_key="k"))
    world.jobs.failure = None
    world.publisher = InMemoryPublisher()
    again = world.submit(Upload(data, idempotency_key="k"))
    expected = [f"{first.job.job_id}:1"]
    assert [m.message_id for m in lost_confirm.messages] == world.message_ids() == expected
    assert again.job.sent_at is not None


def test_a_failed_replay_of_an_unconfirmed_job_leaves_it_queued(world: World) -> None:
    data = geotiffs.crafted()
    world.publisher.failure = BusUnavailable("down")
    first = world.submit(Upload(data, idempotency_key="k"))
    world.store.failure = StorageUnavailable("down")
    with pytest.raises(EnqueueFailed):
        world.submit(Upload(data, idempotency_key="k"))
    job = world.job(first.job.job_id)
    assert (job.status, job.error_code, job.sent_at) == (JobStatus.QUEUED, None, None)  # not the replay's to fail


def _confirmed(world: World, job: Job) -> Job:
    return job


def _running(world: World, job: Job) -> Job:
    return claimed(world.jobs, job)


def _succeeded(world: World, job: Job) -> Job:
    running = claimed(world.jobs, job)
    done = world.jobs.succeed(job.job_id, running.attempts, {"attempt": 1})
    assert done is not None
    return done


def _failed(world: World, job: Job) -> Job:
    running = claimed(world.jobs, job)
    failed = world.jobs.fail(job.job_id, running.attempts, "invalid_image", "not a GeoTIFF")
    assert failed is not None
    return failed


def _cancelled(world: World, job: Job) -> Job:
    cancelled = world.jobs.cancel(job.job_id)
    assert cancelled is not None
    return cancelled


@pytest.mark.parametrize("state", [_confirmed, _running, _succeeded, _failed, _cancelled], ids=lambda f: f.__name__)
def test_a_replay_of_a_job_already_handed_over_sends_nothing(world: World, state: Callable[[World, Job], Job]) -> None:
    data = geotiffs.crafted()
    first = world.submit(Upload(data, idempotency_key="k"))
    now = state(world, first.job)
    world.store.blobs.clear()
    again = world.submit(Upload(data, idempotency_key="k"))  # the same request (other options: a 409, below)
    assert not again.created
    assert again.job == now == world.job(first.job.job_id)
    assert world.message_ids() == [f"{first.job.job_id}:1"]
    assert world.store.blobs == {}


def test_a_retry_after_an_upload_failure_resubmits_a_new_generation(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    data = geotiffs.crafted()
    world.store.failure = StorageUnavailable("down")
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    world.store.failure = None
    with caplog.at_level(logging.INFO, logger="shared.submission"):
        again = world.submit(Upload(data, idempotency_key="k"))
    job_id = info.value.job_id
    assert not again.created
    job = world.job(job_id)
    assert again.job == job
    assert (job.status, job.generation, job.error_code, job.error_message) == (JobStatus.QUEUED, 2, None, None)
    assert job.sent_at is not None
    assert world.message_ids() == [f"{job_id}:2"]
    assert list(world.store.blobs) == [f"images/{job_id}/input.tif"]
    assert "resubmit" in actions(caplog)


def test_a_retry_that_fails_again_is_failed_again_and_the_next_one_resubmits(world: World) -> None:
    data = geotiffs.crafted()
    world.store.failure = StorageUnavailable("down")
    with pytest.raises(EnqueueFailed):
        world.submit(Upload(data, idempotency_key="k"))
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    job = world.job(info.value.job_id)
    assert (job.status, job.error_code, job.generation) == (JobStatus.FAILED, "enqueue_failed", 2)
    world.store.failure = None
    world.submit(Upload(data, idempotency_key="k"))
    assert world.message_ids() == [f"{job.job_id}:3"]


class RacingResubmits(InMemoryJobStore):
    """Both concurrent retries reach ``resubmit`` before either has moved the job."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=5)
        self.resubmitted: list[Job | None] = []

    def resubmit(self, job_id: uuid.UUID) -> Job | None:
        self.barrier.wait()
        moved = super().resubmit(job_id)
        self.resubmitted.append(moved)
        return moved


def test_two_concurrent_retries_resubmit_once(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.jobs = jobs = RacingResubmits()
    data = geotiffs.crafted()
    world.store.failure = StorageUnavailable("down")
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    world.store.failure = None
    outcomes: list[Submitted] = []
    errors: list[BaseException] = []

    def retry() -> None:
        try:
            outcomes.append(world.submit(Upload(data, idempotency_key="k")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=retry) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="shared.submission"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert [o.created for o in outcomes] == [False, False]
    assert sum(moved is not None for moved in jobs.resubmitted) == 1  # one owner
    accepted = sorted(a for a in actions(caplog) if a in ("resubmit", "replay"))
    assert accepted == ["replay", "resubmit"]
    job = world.job(info.value.job_id)
    assert (job.status, job.generation) == (JobStatus.QUEUED, 2)
    assert job.sent_at is not None
    assert set(world.message_ids()) == {f"{job.job_id}:2"}  # never a third generation


def test_same_key_other_bytes_conflicts(world: World) -> None:
    first = world.submit(Upload(geotiffs.crafted(), idempotency_key="k"))
    with pytest.raises(IdempotencyConflict) as info:
        world.submit(Upload(geotiffs.crafted(dtype="float32"), idempotency_key="k"))
    assert info.value.existing.job_id == first.job.job_id
    assert len(world.publisher.sent) == 1
    assert len(world.store.blobs) == 1


def test_same_key_same_bytes_other_options_conflicts(world: World) -> None:
    """A replay must be the same request: the same image with other bands, scale, analysis or geometry is not."""
    first = world.submit(Upload(geotiffs.crafted(), idempotency_key="k"))
    with pytest.raises(IdempotencyConflict) as info:
        world.submit(Upload(geotiffs.crafted(), scale="255", idempotency_key="k"))
    assert info.value.existing.job_id == first.job.job_id
    assert len(world.publisher.sent) == 1


def test_without_a_key_the_same_bytes_are_a_new_job(world: World) -> None:
    data = geotiffs.crafted()
    a = world.submit(Upload(data))
    b = world.submit(Upload(data))
    assert a.created
    assert b.created
    assert a.job.job_id != b.job.job_id
    assert world.message_ids() == [f"{a.job.job_id}:1", f"{b.job.job_id}:1"]


# Priority, callback, admission control


def test_priority_is_stored_and_picks_the_messages_queue(world: World) -> None:
    outcome = world.submit(Upload(geotiffs.crafted(), priority=" HIGH "))
    assert outcome.job.priority == "high"
    assert [m.priority for m in world.publisher.messages] == ["high"]
    assert world.submit(Upload(geotiffs.crafted())).job.priority == "normal"


@pytest.mark.parametrize(
    ("upload", "code"),
    [
        (Upload(geotiffs.crafted(), priority="urgent"), "invalid_priority"),
        (Upload(geotiffs.crafted(), priority=""), "invalid_priority"),
        (Upload(geotiffs.crafted(), callback_url="http://example.com/hook"), "invalid_callback_url"),
        (Upload(geotiffs.crafted(), callback_url="https://10.0.0.4/hook"), "invalid_callback_url"),
        (
            Upload(geotiffs.crafted(), callback_url="https://example.com/h", callback_events="x"),
            "invalid_callback_events",
        ),
        (Upload(geotiffs.crafted(), callback_events="completed"), "invalid_callback_events"),
    ],
)
def test_bad_options_store_nothing(world: World, upload: Upload, code: str) -> None:
    with pytest.raises(Rejected) as info:
        world.submit(upload)
    assert info.value.code == code
    assert (world.jobs._jobs, world.store.blobs, world.publisher.sent) == ({}, {}, [])


def test_a_callback_is_stored_with_a_fresh_secret_that_a_replay_returns(world: World) -> None:
    upload = Upload(
        geotiffs.crafted(), idempotency_key="hook-1", callback_url="https://example.com/hook",
        callback_events="progress,started",
    )  # fmt: skip
    first = world.submit(upload)
    assert first.webhook_secret is not None
    assert first.webhook_secret.startswith("whsec_")
    assert (first.job.callback_url, first.job.callback_events) == ("https://example.com/hook", ["started", "progress"])
    assert world.jobs.webhook_secret(first.job.job_id) == first.webhook_secret
    assert world.submit(upload).webhook_secret == first.webhook_secret
    other = world.submit(Upload(geotiffs.crafted(), callback_url="https://example.com/hook"))
    assert other.webhook_secret not in (None, first.webhook_secret)
    assert world.submit(Upload(geotiffs.crafted())).webhook_secret is None


def test_a_private_callback_is_allowed_only_by_the_policy() -> None:
    world = World()
    upload = Upload(geotiffs.crafted(), callback_url="http://127.0.0.1:8080/hook")
    policy = Policy(allow_private_callbacks=True)
    outcome = submit(
        upload, limits=LIMITS, jobs=world.jobs, store=world.store, publisher=world.publisher, policy=policy
    )
    assert outcome.job.callback_url == "http://127.0.0.1:8080/hook"


def test_admission_control_refuses_new_jobs_at_the_bound_but_not_replays(world: World) -> None:
    policy = Policy(max_backlog=2)

    def submit_with(upload: Upload) -> Submitted:
        return submit(
            upload, limits=LIMITS, jobs=world.jobs, store=world.store, publisher=world.publisher, policy=policy
        )

    first = submit_with(Upload(geotiffs.crafted(width=40), idempotency_key="a"))
    submit_with(Upload(geotiffs.crafted(width=41)))
    with pytest.raises(Rejected) as info:
        submit_with(Upload(geotiffs.crafted(width=42)))
    assert info.value.code == "backlog_full"
    with pytest.raises(Rejected):
        submit_with(Upload(geotiffs.crafted(width=42), idempotency_key="new key"))
    assert len(world.jobs._jobs) == 2
    replay = submit_with(Upload(geotiffs.crafted(width=40), idempotency_key="a"))
    assert (replay.created, replay.job.job_id) == (False, first.job.job_id)

    running = claimed(world.jobs, first.job)  # only queued jobs count
    assert submit_with(Upload(geotiffs.crafted(width=42))).created
    assert running.status is JobStatus.RUNNING


class CountingStore(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.counts = 0

    def backlog(self) -> int:
        self.counts += 1
        return super().backlog()


def test_the_backlog_gauge_counts_again_near_the_limit_or_after_its_ttl_and_estimates_only_far_below() -> None:
    now = [0.0]
    gauge, jobs = BacklogGauge(ttl=1.0, clock=lambda: now[0]), CountingStore()
    world = World()
    world.jobs = jobs
    policy = Policy(max_backlog=8, gauge=gauge)

    def submit_one() -> None:
        submit(Upload(geotiffs.crafted(width=40 + jobs.counts + len(jobs._jobs))), limits=LIMITS, jobs=jobs,
               store=world.store, publisher=world.publisher, policy=policy)  # fmt: skip

    submit_one()  # nothing known yet: counted
    submit_one()  # estimate 1 + 1 new <= 8 / 2: no count
    submit_one()  # 2 + 1
    submit_one()  # 3 + 1 = 4: still half
    assert (jobs.counts, len(jobs._jobs)) == (1, 4)
    submit_one()  # 4 + 1 > 4: counted again, exactly
    submit_one()
    assert jobs.counts == 3
    submit_one()
    submit_one()
    with pytest.raises(Rejected) as info:  # at the limit the decision is exact, as without the gauge
        submit_one()
    assert info.value.code == "backlog_full"
    assert len(jobs._jobs) == 8

    far = Policy(max_backlog=1000, gauge=gauge)
    submit(Upload(geotiffs.crafted(width=90)), limits=LIMITS, jobs=jobs, store=world.store,
           publisher=world.publisher, policy=far)  # fmt: skip
    counted = jobs.counts
    now[0] += 1.5  # past the ttl: counted again
    submit(Upload(geotiffs.crafted(width=91)), limits=LIMITS, jobs=jobs, store=world.store,
           publisher=world.publisher, policy=far)  # fmt: skip
    assert jobs.counts == counted + 1
