"""A job whose image has not one valid pixel ends ``failed`` with ``no_valid_pixels`` and is dead-lettered at once,
through the real worker, the real analysis and the real backends (the submit path's header check is bypassed, as
for an image whose emptiness only its pixels show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_worker.app import run
from shared.jobs import JobStatus
from tests import geotiffs
from tests.integration.worker_helpers import RGBN, StackFactory
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = pytest.mark.integration


def test_images_without_a_valid_pixel_fail_with_no_valid_pixels(stack_factory: StackFactory, tmp_path: Path) -> None:
    stack = stack_factory()
    zeros = geotiffs.write_scene(tmp_path / "zeros.tif", np.zeros((4, 64, 64), np.uint16), RGBN).read_bytes()
    sparse = geotiffs.crafted(
        width=11_000, height=11_000, write=False, tiled=True, blockxsize=1024, blockysize=1024, SPARSE_OK=True
    )
    jobs = {stack.submit(zeros): "is 0 or not finite", stack.submit(sparse): "every block is empty"}
    run(stack.settings(), max_jobs=2)
    dead = stack.dead_letters()
    assert [(d.dead_letter_reason, d.delivery_count) for d in dead] == [("NoValidPixels", 0)] * 2
    assert stack.queued() == []
    for job_id, message in jobs.items():
        job = stack.job(job_id)
        assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, "no_valid_pixels", 1)
        assert message in (job.error_message or "")
        assert stack.results(job_id) == set()
