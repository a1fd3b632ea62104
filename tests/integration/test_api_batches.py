"""``POST /api/batches`` and ``GET /api/batches/{id}`` through the Function App on real backends: three real
GeoTIFFs stored in Azurite and queued on the emulator, one transaction for the jobs, a batch whose upload fails
(storage down) failed as a whole and resubmitted by a same-key replay, and concurrent same-key replays."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from functions.deps import Deps
from local.ports import free_port
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
