"""Workers as real processes under signals: SIGTERM drains the job in hand, SIGKILL loses the lock and another
worker finishes the job once the 5 s lock has expired.

Each test first takes away the shared worker, so that the worker it starts is the one that gets the job.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio

from local.processes import is_alive
from tests.acceptance.client import poll, submit, wait_status
from tests.acceptance.harness import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

FIELDS = Path(__file__).resolve().parents[1] / "data" / "s2_l1c_fields_256.tif"


@pytest.fixture(scope="module")
def large_scene(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The fields crop tiled to 1024 x 1024 x 13 bands: a job that keeps a CPU worker busy for seconds."""
    with rasterio.open(FIELDS) as ds:
        profile, data, names = ds.profile, ds.read(), ds.descriptions
    tiled = np.tile(data, (1, 4, 4))
    profile.update(width=tiled.shape[2], height=tiled.shape[1])
    path = tmp_path_factory.mktemp("large") / "large.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(tiled)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path.read_bytes()


def _submit_and_wait_until_running(api: httpx.Client, data: bytes) -> str:
    response = submit(api, data)
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    body = wait_status(api, location, "running")
    assert body["status"] == "running", f"the job was not seen in flight: {body}"
    return location


def test_sigterm_drains_the_job_in_flight(stack: Stack, api: httpx.Client, large_scene: bytes) -> None:
    stack.stop_workers()
    worker = stack.start_worker()
    location = _submit_and_wait_until_running(api, large_scene)
    os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + worker.grace
    while is_alive(worker.pid) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert not is_alive(worker.pid), "the worker did not exit within its shutdown grace"
    final = poll(api, location, timeout=5)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 1  # finished by the same worker before it exited, not redelivered


def test_sigkill_mid_job_lock_expires_and_another_worker_finishes(
    stack: Stack, api: httpx.Client, large_scene: bytes
) -> None:
    stack.stop_workers()
    first = stack.start_worker()
    location = _submit_and_wait_until_running(api, large_scene)
    stack.kill(first)
    stack.start_worker()
    final = poll(api, location, timeout=90)
    assert final["status"] == "succeeded", final
    assert final["attempts"] >= 2
