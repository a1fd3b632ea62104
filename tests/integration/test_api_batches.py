"""``POST /api/batches`` and ``GET /api/batches/{id}`` through the Function App on real backends: three real
GeoTIFFs stored in Azurite and queued on the emulator, one transaction for the jobs, the request's order, a batch
whose upload fails (storage down) failed as a whole and resubmitted by a same-key replay, concurrent same-key
replays, and the reconciler (on the app's PostgreSQL, Azurite and emulator) sending nothing of a batch before every
image is stored: not during slow uploads, not after a submit that died mid-upload (that batch it aborts whole, once
the submit counts as dead)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest

from functions import deps
from functions.deps import Deps
from local.ports import free_port
from shared import batches
from shared.jobs import JobStatus, NewJob
from shared.reconciler import Letter, Policy, Reconciler, Report
from shared.storage import BlobStore
from tests import geotiffs
from tests.fixtures.servicebus import EmulatorHandle
from tests.functions_client import body
from tests.integration import test_functions as functions_tier
from tests.integration.test_api_control import peek
from tests.job_api_client import get_batch, post_batch

pytestmark = pytest.mark.integration
environment = functions_tier.environment  # the Function App's dependencies built from the environment (fixtures)
app_deps = functions_tier.app_deps

SCENES = [geotiffs.real(), geotiffs.real(geotiffs.DATA / "s2_l1c_coast_256.tif"), geotiffs.real(geotiffs.RGBN)]
ALIVE, DEAD = timedelta(hours=1), timedelta(0)  # RECONCILE_ABORT_AFTER: the submit may still run / counts as dead


class NoLetters:
    def receive(self, max_count: int) -> list[Letter]:
        return []

    def complete(self, letter: Letter) -> None:
        raise AssertionError("no letter to complete")


def reconcile(app: Deps, abort_after: timedelta) -> Report:
    """A reconciler run on the app's backends that resends every unconfirmed job (RECONCILE_RESEND_AFTER=0)."""
    policy = Policy(resend_after=timedelta(0), max_attempts=3, batch=100, abort_after=abort_after)
    return Reconciler(app.jobs, app.blobs, app.publisher, NoLetters(), policy, outbox=app.notifier).run()


def test_a_batch_of_three_real_geotiffs(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    response = post_batch(SCENES, params={"analysis": "crop-health"}, headers={"Idempotency-Key": "b-1"})
    assert response.status_code == 202, body(response)
    accepted = body(response)
    batch_id = accepted["batch_id"]
    job_ids = [uuid.UUID(j["job_id"]) for j in accepted["jobs"]]
    assert response.headers["Location"] == f"/api/batches/{batch_id}"
    assert isinstance(app_deps.blobs, BlobStore)
    for job_id, data in zip(job_ids, SCENES, strict=True):
        assert app_deps.blobs.input_sha256(f"{job_id}/input.tif") == hashlib.sha256(data).hexdigest()
    assert sorted(peek(servicebus_emulator)) == sorted(f"{j}:1" for j in job_ids)
    assert app_deps.settings.database_url is not None
    with psycopg.connect(app_deps.settings.database_url) as conn:
        rows = conn.execute(
            "SELECT b.size, count(*), bool_and(j.sent_at IS NOT NULL) FROM batches b JOIN jobs j USING (batch_id)"
            " WHERE b.batch_id = %s GROUP BY b.size",
            (batch_id,),
        ).fetchall()
    assert rows == [(3, 3, True)]
    view = body(get_batch(batch_id))
    assert (view["size"], view["status"], view["counts"]["queued"]) == (3, "queued", 3)
    assert [j["job_id"] for j in view["jobs"]] == list(map(str, job_ids))  # the request's order

    replay = post_batch(SCENES, params={"analysis": "crop-health"}, headers={"Idempotency-Key": "b-1"})
    assert (replay.status_code, body(replay)["batch_id"]) == (200, batch_id)
    assert len(peek(servicebus_emulator)) == 3  # nothing sent again


def test_a_batch_whose_upload_fails_is_failed_whole_and_a_same_key_replay_resubmits_it(
    environment: Callable[..., Deps], blob_connection_string: str, servicebus_emulator: EmulatorHandle
) -> None:
    port = blob_connection_string.split("127.0.0.1:", 1)[1].split("/", 1)[0]
    environment(AzureWebJobsStorage=blob_connection_string.replace(port, str(free_port())))
    images = SCENES[1:]
    failed = post_batch(images, headers={"Idempotency-Key": "b-2"})
    problem = body(failed)
    assert (failed.status_code, problem["code"]) == (503, "enqueue_failed")
    assert "127.0.0.1" not in problem["detail"]
    batch = body(get_batch(problem["batch_id"]))
    assert (batch["status"], {j["error_code"] for j in batch["jobs"]}) == ("completed", {"enqueue_failed"})
    assert peek(servicebus_emulator) == []

    environment()  # the storage is back
    replay = post_batch(images, headers={"Idempotency-Key": "b-2"})
    assert (replay.status_code, body(replay)["batch_id"]) == (200, problem["batch_id"])
    assert sorted(peek(servicebus_emulator)) == sorted(f"{j['job_id']}:2" for j in batch["jobs"])
    assert body(get_batch(problem["batch_id"]))["counts"]["queued"] == 2


def test_concurrent_same_key_batches_make_one_batch(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    images = [geotiffs.crafted(width=32 + i) for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post_batch(images, headers={"Idempotency-Key": "b-3"}), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 202]
    assert len({body(a)["batch_id"] for a in answers}) == 1
    assert len(set(peek(servicebus_emulator))) == 3


def test_a_batch_whose_submit_died_mid_upload_is_never_sent_and_is_aborted_whole(
    environment: Callable[..., Deps], servicebus_emulator: EmulatorHandle
) -> None:
    """The pieces of a submit whose process died after create_batch and two of three uploads: the reconciler sends
    nothing of the batch (RECONCILE_RESEND_AFTER is 0), fails every job once the submit counts as dead
    (RECONCILE_ABORT_AFTER), whatever its image, and a same-key replay resubmits the batch whole."""
    app = environment()
    images = [geotiffs.crafted(width=32 + i) for i in range(3)]
    params = {"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}
    new = [NewJob(job_id=(i := uuid.uuid4()), input_blob=f"{i}/input.tif", input_sha256=hashlib.sha256(d).hexdigest(),
                  params=params) for d in images]  # fmt: skip
    batch_id = uuid.uuid4()
    jobs, _ = app.jobs.create_batch(batch_id, new, "b-died")
    for job, data in zip(jobs[:2], images[:2], strict=True):
        app.blobs.put_input(job.job_id, data, job.input_sha256)
    assert reconcile(app, ALIVE).resent == 0
    assert {j.status for j in app.jobs.batch_jobs(batch_id) or []} == {JobStatus.QUEUED}

    dead = reconcile(app, DEAD)
    assert (dead.resent, dead.aborted) == (0, 3)
    batch = body(get_batch(batch_id))
    assert [(j["job_id"], j["status"], j["error_code"]) for j in batch["jobs"]] == [
        (str(j.job_id), "failed", "enqueue_failed") for j in jobs
    ]

    replay = post_batch(images, headers={"Idempotency-Key": "b-died"})
    assert replay.status_code == 200, body(replay)
    assert sorted(peek(servicebus_emulator)) == sorted(f"{j.job_id}:2" for j in jobs)


class ReconciledMidway:
    """The real blob store, slow: the reconciler runs before the third upload."""

    def __init__(self, app: Deps, inner: BlobStore) -> None:
        self.app, self.inner, self.calls = app, inner, 0
        self.report: Report | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def put_input(self, job_id: uuid.UUID, data: bytes, sha256: str) -> str:
        self.calls += 1
        if self.calls == 3:
            self.report = reconcile(self.app, ALIVE)
        return self.inner.put_input(job_id, data, sha256)


def test_a_reconcile_during_slow_uploads_sends_nothing(
    environment: Callable[..., Deps], servicebus_emulator: EmulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads slower than RECONCILE_RESEND_AFTER (0 here): a reconcile with two images stored resends neither; the
    batch goes out whole, generation 1, once every image is stored."""
    app = environment()
    assert isinstance(app.blobs, BlobStore)
    slow = ReconciledMidway(app, app.blobs)
    deps.use(dataclasses.replace(app, blobs=slow))  # type: ignore[arg-type]
    monkeypatch.setattr(batches, "UPLOADS", 1)  # one upload at a time: two are stored when the reconciler runs
    images = [geotiffs.crafted(width=32 + i) for i in range(3)]
    response = post_batch(images)
    assert response.status_code == 202, body(response)
    assert slow.report is not None
    assert slow.report.resent == 0
    assert sorted(peek(servicebus_emulator)) == sorted(f"{j['job_id']}:1" for j in body(response)["jobs"])
