"""``POST /api/jobs``'s options over HTTP: the 202 body's priority and webhook secret, and admission control."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import azure.functions as func
import pytest

from functions import deps
from tests import geotiffs
from tests.functions_client import body, get_job, post_job
from tests.unit.test_functions import World, assert_problem


@pytest.fixture
def world() -> Iterator[World]:
    w = World(MAX_BACKLOG="1")
    deps.use(w.deps())
    yield w
    deps.use(None)


def test_the_body_says_the_priority_and_has_a_secret_only_with_a_callback(world: World) -> None:
    plain = body(post_job(geotiffs.crafted()))
    assert (plain["priority"], "webhook_secret" in plain) == ("normal", False)
    world.jobs.cancel(world.job(plain["job_id"]).job_id)  # room in the backlog again
    params = {"priority": "high", "callback_url": "https://example.com/hook", "callback_events": "completed"}
    hooked = post_job(geotiffs.crafted(), params=params, headers={"Idempotency-Key": "h"})
    assert hooked.status_code == 202
    accepted = body(hooked)
    assert accepted["priority"] == "high"
    assert accepted["webhook_secret"].startswith("whsec_")
    assert body(post_job(geotiffs.crafted(), params=params, headers={"Idempotency-Key": "h"})) == accepted
    assert "webhook_secret" not in body(get_job(accepted["job_id"]))


def test_a_full_backlog_is_a_429_with_retry_after_and_a_replay_still_answers(world: World) -> None:
    first = post_job(geotiffs.crafted(), headers={"Idempotency-Key": "k"})
    assert first.status_code == 202
    full = post_job(geotiffs.crafted(width=40))
    problem = assert_problem(full, 429, "backlog_full")
    assert full.headers["Retry-After"] == "3"
    assert "1 jobs are queued and the limit is 1" in str(problem["detail"])
    assert len(world.jobs._jobs) == 1
    replay = post_job(geotiffs.crafted(), headers={"Idempotency-Key": "k"})
    assert (replay.status_code, body(replay)["job_id"]) == (200, body(first)["job_id"])


@pytest.mark.parametrize(
    ("params", "code"),
    [({"priority": "low"}, "invalid_priority"), ({"callback_url": "https://localhost/x"}, "invalid_callback_url")],
)
def test_bad_options_are_400(world: World, params: dict[str, str], code: str) -> None:
    assert_problem(post_job(geotiffs.crafted(), params=params), 400, code)


def test_the_202_does_not_wait_for_the_send_to_be_recorded() -> None:
    """functions.submit hands the process's ConfirmBehind to the hand-over: the answer comes while the database has
    not recorded the send yet, and the record follows."""
    from shared.confirmations import ConfirmBehind
    from tests.functions_client import function
    from tests.unit.test_confirmations import Gated

    w = World()
    w.jobs = Gated()
    w.jobs.gate.clear()
    confirms = ConfirmBehind(w.jobs)
    deps.use(dataclasses.replace(w.deps(), confirms=confirms))
    try:
        request = func.HttpRequest("POST", "http://127.0.0.1:7071/api/jobs", headers={"Content-Type": "image/tiff"},
                                   params={}, body=geotiffs.crafted())  # fmt: skip
        answer = function("submit_job")(request)
        assert answer.status_code == 202
        job = w.job(body(answer)["job_id"])
        assert (job.sent_at, [m.message_id for m in w.publisher.messages]) == (None, [f"{job.job_id}:1"])
        w.jobs.gate.set()
        assert confirms.flush(timeout=5)
        assert w.job(job.job_id).sent_at is not None
    finally:
        w.jobs.gate.set()
        confirms.close()
        deps.use(None)
