from __future__ import annotations

import hashlib
import logging

import pytest

from shared.errors import BusUnavailable, StorageUnavailable
from shared.geotiff import Limits
from shared.jobs import IdempotencyConflict, JobStatus
from shared.memory import InMemoryBlobStore, InMemoryJobRepository, InMemoryPublisher
from shared.rejection import Rejected
from shared.submission import EnqueueFailed, Submitted, Upload, submit
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
    assert world.repo.get(job.job_id) == job
    [message] = world.publisher.sent
    assert message.job_id == job.job_id
    assert message.input_blob == f"{job.job_id}/input.tif" == job.input_blob
    assert message.input_sha256 == sha
    assert message.bands == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert message.scale == 10000.0
    assert message.analysis == "crop-health"
    assert message.submitted_at == job.created_at
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
