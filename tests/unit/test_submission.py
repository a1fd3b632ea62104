from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import timedelta

import pytest

from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.geotiff import Limits
from shared.jobs import IdempotencyConflict, Job, JobStatus
from shared.memory import InMemoryBlobStore, InMemoryJobRepository, InMemoryPublisher
from shared.rejection import Rejected
from shared.submission import EnqueueFailed, Submitted, Upload, resend, submit
from tests import geotiffs

LIMITS = Limits(max_bytes=10 * 1024 * 1024, max_pixels=10_000_000, max_bands=32)


class World:
    def __init__(self) -> None:
        self.repo = InMemoryJobRepository()
        self.store = InMemoryBlobStore()
        self.publisher = InMemoryPublisher()

    def submit(self, upload: Upload) -> Submitted:
        return submit(upload, limits=LIMITS, repo=self.repo, store=self.store, publisher=self.publisher)


@pytest.fixture
def world() -> World:
    return World()


def test_a_real_scene_is_stored_recorded_and_queued(world: World, caplog: pytest.LogCaptureFixture) -> None:
    data = geotiffs.real()
    with caplog.at_level(logging.INFO, logger="shared.submission"):
        outcome = world.submit(Upload(data))
    job = outcome.job
    assert outcome.created
    assert job.status is JobStatus.QUEUED
    sha = hashlib.sha256(data).hexdigest()
    assert world.store.blobs[f"images/{job.job_id}/input.tif"] == (data, {"sha256": sha})
    [message] = world.publisher.sent
    assert message.job_id == job.job_id
    assert message.input_blob == f"{job.job_id}/input.tif" == job.input_blob
    assert message.input_sha256 == sha
    assert message.bands == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert message.scale == 10000.0
    assert message.analysis == "crop-health"
    assert message.submitted_at == job.created_at
    stored = world.repo.get(job.job_id)
    assert stored is not None
    assert stored.enqueued_at is not None  # recorded as sent: the sweeper leaves it alone
    assert stored == job.model_copy(update={"enqueued_at": stored.enqueued_at})
    assert world.repo.stale_unsent(timedelta(0), limit=10) == []
    assert any(getattr(r, "job_id", None) == str(job.job_id) for r in caplog.records)


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
    assert world.repo._jobs == {}


def test_same_key_same_bytes_is_the_same_job(world: World) -> None:
    data = geotiffs.crafted()
    first = world.submit(Upload(data, idempotency_key="order-17"))
    world.repo.start_attempt(first.job.job_id)  # the worker has picked it up
    again = world.submit(Upload(data, idempotency_key="order-17", scale="1"))
    assert not again.created
    assert again.job.job_id == first.job.job_id
    assert again.job.status is JobStatus.PROCESSING
    assert again.job.params["scale"] == 10000.0  # the first submission's parameters stand
    assert len(world.publisher.sent) == 1
    assert len(world.store.blobs) == 1


def test_replay_of_a_queued_job_sends_it_again(world: World) -> None:
    data = geotiffs.crafted()
    first = world.submit(Upload(data, idempotency_key="k"))
    world.store.blobs.clear()  # as if the first submit had died between the insert and the upload
    again = world.submit(Upload(data, idempotency_key="k"))
    assert not again.created
    assert [m.job_id for m in world.publisher.sent] == [first.job.job_id] * 2  # same message_id: deduplicated
    assert list(world.store.blobs) == [f"images/{first.job.job_id}/input.tif"]


def test_same_key_other_bytes_conflicts(world: World) -> None:
    world.submit(Upload(geotiffs.crafted(), idempotency_key="k"))
    with pytest.raises(IdempotencyConflict):
        world.submit(Upload(geotiffs.crafted(dtype="float32"), idempotency_key="k"))
    assert len(world.publisher.sent) == 1


@pytest.mark.parametrize(
    ("target", "error", "step"),
    [
        ("publisher", BusUnavailable("emulator down"), "queue the job"),
        ("store", StorageUnavailable("azurite down"), "store the image"),
    ],
)
def test_a_failed_hand_over_fails_the_new_job(world: World, target: str, error: Exception, step: str) -> None:
    getattr(world, target).failure = error
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(geotiffs.crafted()))
    job = world.repo.get(info.value.job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error_code == "enqueue_failed"
    assert job.error_message is not None
    assert step in job.error_message
    assert info.value.transient


def test_a_failed_replay_leaves_the_job_as_it_was(world: World) -> None:
    data = geotiffs.crafted()
    first = world.submit(Upload(data, idempotency_key="k"))
    world.publisher.failure = BusUnavailable("down")
    with pytest.raises(EnqueueFailed):
        world.submit(Upload(data, idempotency_key="k"))
    job = world.repo.get(first.job.job_id)
    assert job is not None
    assert job.status is JobStatus.QUEUED


@pytest.mark.parametrize("target", ["publisher", "store"])
def test_a_retry_with_the_same_key_after_a_503_hands_the_job_over_again(world: World, target: str) -> None:
    data = geotiffs.crafted()
    getattr(world, target).failure = BusUnavailable("down") if target == "publisher" else StorageUnavailable("down")
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    getattr(world, target).failure = None
    again = world.submit(Upload(data, idempotency_key="k"))
    assert not again.created
    assert again.job.job_id == info.value.job_id
    assert again.job.status is JobStatus.QUEUED
    assert (again.job.error_code, again.job.error_message) == (None, None)
    assert [m.job_id for m in world.publisher.sent] == [info.value.job_id]
    assert list(world.store.blobs) == [f"images/{info.value.job_id}/input.tif"]
    stored = world.repo.get(info.value.job_id)
    assert stored is not None
    assert stored.status is JobStatus.QUEUED
    assert stored.enqueued_at is not None


def test_a_retry_that_fails_again_is_failed_again(world: World) -> None:
    data = geotiffs.crafted()
    world.publisher.failure = BusUnavailable("down")
    with pytest.raises(EnqueueFailed):
        world.submit(Upload(data, idempotency_key="k"))
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    job = world.repo.get(info.value.job_id)
    assert job is not None
    assert (job.status, job.error_code) == (JobStatus.FAILED, "enqueue_failed")


@pytest.mark.parametrize("code", ["invalid_image", "retries_exhausted"])
def test_a_replay_of_a_job_failed_otherwise_sends_nothing(world: World, code: str) -> None:
    data = geotiffs.crafted()
    first = world.submit(Upload(data, idempotency_key="k"))
    world.repo.fail(first.job.job_id, code, "worker said no")
    again = world.submit(Upload(data, idempotency_key="k"))
    assert (again.job.status, again.job.error_code) == (JobStatus.FAILED, code)
    assert len(world.publisher.sent) == 1


def test_a_retry_that_loses_the_requeue_race_replays_the_queued_job(world: World) -> None:
    data = geotiffs.crafted()
    world.publisher.failure = BusUnavailable("down")
    with pytest.raises(EnqueueFailed) as info:
        world.submit(Upload(data, idempotency_key="k"))
    world.publisher.failure = None
    requeue = world.repo.requeue_enqueue_failed

    def another_retry_wins(job_id: uuid.UUID) -> Job | None:
        assert requeue(job_id) is not None  # the concurrent retry
        return requeue(job_id)  # ours: nothing left to requeue

    world.repo.requeue_enqueue_failed = another_retry_wins  # type: ignore[method-assign]
    world.publisher.failure = BusUnavailable("down")
    with pytest.raises(EnqueueFailed):
        world.submit(Upload(data, idempotency_key="k"))
    job = world.repo.get(info.value.job_id)
    assert job is not None
    assert job.status is JobStatus.QUEUED  # a replay that does not own the job leaves it to the winner


def test_sent_but_not_recorded_is_still_accepted(world: World, caplog: pytest.LogCaptureFixture) -> None:
    def down(job_id: uuid.UUID) -> bool:
        raise DatabaseUnavailable("gone")

    world.repo.mark_enqueued = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="shared.submission"):
        outcome = world.submit(Upload(geotiffs.crafted()))
    assert outcome.job.status is JobStatus.QUEUED
    assert len(world.publisher.sent) == 1
    assert any("not recorded as sent" in r.getMessage() for r in caplog.records)


def unsent_job(world: World, *, stored: bool) -> Job:
    """A queued job whose submit died after the insert (and, with ``stored``, after the upload)."""
    data = geotiffs.crafted()
    job, _ = world.repo.create(
        job_id=(job_id := uuid.uuid4()),
        input_blob=f"{job_id}/input.tif",
        input_sha256=hashlib.sha256(data).hexdigest(),
        params={"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"},
        idempotency_key=None,
    )
    if stored:
        world.store.put_input(job.job_id, data, job.input_sha256)
    return job


def test_resend_sends_the_message_rebuilt_from_the_job(world: World) -> None:
    job = unsent_job(world, stored=True)
    [stale] = world.repo.stale_unsent(timedelta(0), limit=10)
    assert resend(stale, world.store, world.publisher, world.repo)
    [message] = world.publisher.sent
    assert (message.job_id, message.input_blob, message.input_sha256) == (job.job_id, job.input_blob, job.input_sha256)
    assert (message.bands, message.scale, message.analysis) == (["B02", "B03", "B04", "B08"], 10000.0, "crop-health")
    assert message.submitted_at == job.created_at
    assert world.repo.stale_unsent(timedelta(0), limit=10) == []  # marked sent


def test_resend_fails_a_job_whose_image_is_missing(world: World) -> None:
    job = unsent_job(world, stored=False)
    assert not resend(job, world.store, world.publisher, world.repo)
    failed = world.repo.get(job.job_id)
    assert failed is not None
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, "enqueue_failed")
    assert world.publisher.sent == []


@pytest.mark.parametrize(
    ("target", "error"),
    [("publisher", BusUnavailable("down")), ("store", StorageUnavailable("down"))],
)
def test_resend_leaves_the_job_for_the_next_sweep_on_transient_errors(
    world: World, target: str, error: Exception
) -> None:
    job = unsent_job(world, stored=True)
    getattr(world, target).failure = error
    with pytest.raises(type(error)):
        resend(job, world.store, world.publisher, world.repo)
    assert [j.job_id for j in world.repo.stale_unsent(timedelta(0), limit=10)] == [job.job_id]


def test_resend_leaves_a_job_that_is_no_longer_queued_alone(world: World) -> None:
    job = unsent_job(world, stored=True)
    started = world.repo.start_attempt(job.job_id)
    assert started is not None
    assert not resend(started, world.store, world.publisher, world.repo)
    assert world.publisher.sent == []
