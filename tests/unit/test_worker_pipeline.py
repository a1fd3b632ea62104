"""The pipelined consumer with several messages in flight, on the in-memory fakes: the stages of different jobs
overlap, at most ``in_flight`` messages are in hand, each is settled exactly once whatever stage ended it, and a drain
or a forced shutdown settles exactly the jobs in flight. (On the real backends:
tests/integration/test_worker_pipeline.py.)

Overlap is shown by order, never by speed: a stage of one job waits (with a bound on a hang) for an event of
another's that only a pipelined worker lets happen meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from gpu_worker.consumer import AttemptLimits
from gpu_worker.handler import Reporter
from gpu_worker.pipeline import Pipeline
from gpu_worker.settlement import Action, Interrupted, RetryPolicy, decide
from gpu_worker.shutdown import Shutdown
from shared.errors import InputMissing
from shared.jobs import Job, JobStatus
from tests.jobs import new_job
from tests.unit.test_consumer_settle import Message, World
from tests.unit.test_consumer_settle import make_world as make_world

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds: a bound on a hang, never a speed claim


def until(world: World, event: tuple[str, UUID]) -> None:
    """Wait until the handler has recorded ``event`` (from another thread)."""
    deadline = time.monotonic() + WAIT
    while event not in world.handler.events:
        assert time.monotonic() < deadline, f"{event} never happened: {world.handler.events}"
        time.sleep(0.005)


def forcing_after(world: World, shutdown: Shutdown, *events: tuple[str, UUID]) -> Callable[[], None]:
    """An analysis hook: once every one of ``events`` happened, force the shutdown (a drain, then a second request)
    and stay in the analysis until the shutdown interrupts it."""

    def force_while_analysing() -> None:
        for event in events:
            until(world, event)

        def twice() -> None:
            shutdown.request("SIGTERM")
            shutdown.request("SIGTERM again")

        threading.Thread(target=twice).start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # the analysis: interrupted in here
            time.sleep(0.01)
        pytest.fail("the analysis was not interrupted")

    return force_while_analysing


def hooked(hooks: dict[UUID, Callable[[], object]]) -> Callable[[Job, Reporter], object]:
    """An analysis hook that runs the job's own hook, if it has one."""
    return lambda job, _: hooks.get(job.job_id, lambda: None)()


def in_hand(log: list[tuple[str, str]]) -> int:
    """The most messages received and not yet settled at any point of the receiver's log."""
    held = most = 0
    for what, _ in log:
        held += 1 if what == "received" else -1
        most = max(most, held)
    return most


def test_the_next_download_and_the_last_upload_overlap_the_analysis(make_world: Callable[..., World]) -> None:
    """Job b is prepared while a is analysed; a is finished (uploaded, its result stored) while b is analysed."""
    world = make_world(in_flight=3)
    a, b, c = (new_job(world.jobs) for _ in range(3))
    for job in (a, b, c):
        world.queue(job)
    world.handler.before = hooked(
        {a.job_id: lambda: until(world, ("prepared", b.job_id)), b.job_id: lambda: until(world, ("finished", a.job_id))}
    )
    assert world.consumer.run(max_jobs=3) == 3
    assert [world.job(j).status for j in (a, b, c)] == [JobStatus.SUCCEEDED] * 3
    assert sorted(world.receiver.settled) == sorted(("complete", f"{j.job_id}:1", None) for j in (a, b, c))
    events = world.handler.events
    assert events.index(("prepared", b.job_id)) < events.index(("analysed", a.job_id))
    assert events.index(("finished", a.job_id)) < events.index(("analysed", b.job_id))
    assert [e for e in events if e[0] == "analysed"] == [("analysed", j.job_id) for j in (a, b, c)]  # one at a time
    assert 2 <= in_hand(world.receiver.log) <= 3


@pytest.mark.parametrize("in_flight", [1, 2])
def test_no_more_than_in_flight_messages_are_in_hand(make_world: Callable[..., World], in_flight: int) -> None:
    world = make_world(in_flight=in_flight)
    jobs = [new_job(world.jobs) for _ in range(4)]
    for job in jobs:
        world.queue(job)
    assert world.consumer.run(max_jobs=4) == 4
    assert in_hand(world.receiver.log) <= in_flight
    assert world.consumer.settled[Action.COMPLETE] == 4
    if in_flight == 1:  # exactly the sequential worker: the next message only once the last one is settled
        assert world.receiver.log == [(what, f"{j.job_id}:1") for j in jobs for what in ("received", "complete")]
        assert world.handler.events == [
            (stage, j.job_id) for j in jobs for stage in ("prepared", "analysed", "uploading", "finished")
        ]


@pytest.mark.parametrize("how", ["download error", "poison message", "finished already"])
def test_a_message_that_ends_in_prepare_is_settled_while_another_job_is_analysed(
    make_world: Callable[..., World], how: str
) -> None:
    world = make_world(in_flight=2)
    a, b = new_job(world.jobs), new_job(world.jobs)
    world.queue(a)
    if how == "poison message":
        world.receiver.messages.append(Message(b"not json", "garbage"))
        b_id = "garbage"
    else:
        world.queue(b)
        b_id = f"{b.job_id}:1"
        if how == "finished already":
            b = world.jobs.claim(b.job_id, worker_id="w2", lease=world.consumer._limits.lease, max_attempts=3) or b
            assert world.jobs.succeed(b.job_id, b.attempts, {"by": "w2"}) is not None
    if how == "download error":

        def download_fails(job: Job) -> None:
            if job.job_id == b.job_id:
                raise InputMissing(f"images/{b.job_id}/input.tif is gone")

        world.handler.on_prepare = download_fails

    def b_settled() -> None:  # a's analysis goes on until b's message is settled
        deadline = time.monotonic() + WAIT
        while b_id not in [m for _, m, _ in world.receiver.settled]:
            assert time.monotonic() < deadline, "b was not settled while a was analysed"
            time.sleep(0.005)

    world.handler.before = hooked({a.job_id: b_settled})
    assert world.consumer.run(max_jobs=2) == 2
    expected_b = {
        "download error": ("dead_letter", b_id, "InputMissing"),
        "poison message": ("dead_letter", b_id, "InvalidMessage"),
        "finished already": ("complete", b_id, None),
    }[how]
    assert world.receiver.settled == [expected_b, ("complete", f"{a.job_id}:1", None)]
    assert world.job(a).status is JobStatus.SUCCEEDED
    assert world.handler.runs == [1]  # b never analysed
    if how == "download error":
        assert (world.job(b).status, world.job(b).error_code) == (JobStatus.FAILED, "input_missing")
    if how == "finished already":
        assert world.job(b).result == {"by": "w2"}


def test_a_drain_with_jobs_in_flight_runs_and_settles_each_of_them_once_and_receives_no_more(
    make_world: Callable[..., World],
) -> None:
    world = make_world(in_flight=3)
    a, b, c, d = (new_job(world.jobs) for _ in range(4))
    for job in (a, b, c, d):
        world.queue(job)

    def drain_with_three_in_hand() -> None:
        until(world, ("prepared", c.job_id))
        world.shutdown.request("test")

    world.handler.before = hooked({a.job_id: drain_with_three_in_hand})
    try:
        assert world.consumer.run() == 3
    finally:
        world.shutdown.finished()
    assert [world.job(j).status for j in (a, b, c)] == [JobStatus.SUCCEEDED] * 3
    assert sorted(world.receiver.settled) == sorted(("complete", f"{j.job_id}:1", None) for j in (a, b, c))
    assert world.handler.runs == [1, 1, 1]  # none run twice
    assert (world.job(d).status, world.job(d).attempts) == (JobStatus.QUEUED, 0)  # d was never received...
    assert [m.message_id for m in world.receiver.messages] == [f"{d.job_id}:1"]  # ...and waits for another worker
    assert world.publisher.sent == []


def test_a_forced_shutdown_releases_the_analysed_and_the_prepared_jobs_uncharged_and_finishes_the_finishing_one(
    make_world: Callable[..., World], shutdown: Shutdown
) -> None:
    """a is being finished, b analysed, c prepared (three in hand) when the shutdown is forced: a's settlement
    completes, b is interrupted and c never started: both released uncharged, their next generation sent at once."""
    world = make_world(in_flight=3, shutdown=shutdown)
    a, b, c, d = (new_job(world.jobs) for _ in range(4))
    for job in (a, b, c, d):
        world.queue(job)
    world.handler.on_finish = lambda job: job.job_id == a.job_id and shutdown.forced.wait(WAIT)
    # Forced once c is prepared and a's upload has begun (its upload stage reported, a checkpoint: forced before it,
    # a would be stopped too, as in the real handler).
    forcing = forcing_after(world, shutdown, ("prepared", c.job_id), ("uploading", a.job_id))
    world.handler.before = hooked({b.job_id: forcing})
    assert world.consumer.run() == 3
    assert world.job(a).status is JobStatus.SUCCEEDED  # finishing: never cut short
    for job in (b, c):
        now = world.job(job)
        assert (now.status, now.generation, now.attempts, now.drains, now.charged) == (JobStatus.QUEUED, 2, 1, 1, 0)
    assert sorted((m.message_id, at) for m, at in world.publisher.sent) == sorted(
        [(f"{b.job_id}:2", None), (f"{c.job_id}:2", None)]
    )  # at once
    assert sorted(world.receiver.settled) == sorted(("complete", f"{j.job_id}:1", None) for j in (a, b, c))
    assert world.handler.runs == [1, 1]  # a and b; c never started
    assert [m.message_id for m in world.receiver.messages] == [f"{d.job_id}:1"]


def test_an_error_that_stops_the_worker_is_settled_the_other_jobs_in_hand_too_then_it_is_raised(
    make_world: Callable[..., World],
) -> None:
    world = make_world(in_flight=2)
    a, b, c = (new_job(world.jobs) for _ in range(3))
    for job in (a, b, c):
        world.queue(job)

    def exit_once_b_is_prepared() -> None:
        until(world, ("prepared", b.job_id))
        raise SystemExit(1)

    world.handler.before = hooked({a.job_id: exit_once_b_is_prepared})
    with pytest.raises(SystemExit):
        world.consumer.run()
    assert (world.job(a).status, world.job(a).charged) == (JobStatus.QUEUED, 1)  # settled as an unexpected error
    assert world.job(b).status is JobStatus.SUCCEEDED  # in hand: finished as in a drain
    assert [m.message_id for m in world.receiver.messages] == [f"{c.job_id}:1"]  # not received


class Items:
    """Bare stages for :class:`Pipeline`: items are dicts; ``fail`` names the stage that raises (a bug)."""

    def __init__(self, count: int, fail: str | None = None) -> None:
        self.left = count
        self.fail = fail
        self.finished: list[Any] = []

    def receive(self) -> Any:
        if self.left == 0:
            if self.fail == "receive":
                raise RuntimeError("receive broke")
            return None
        self.left -= 1
        return type("Item", (), {"error": None, "n": self.left})()

    def prepare(self, item: Any) -> bool:
        if self.fail == "prepare":
            raise RuntimeError("prepare broke")
        return True

    def compute(self, item: Any) -> None:
        if self.fail == "compute":
            raise RuntimeError("compute broke")

    def finish(self, item: Any) -> None:
        self.finished.append(item)


@pytest.mark.parametrize("fail", ["prepare", "compute"])
def test_an_error_escaping_a_stage_still_finishes_the_item_with_it(fail: str) -> None:
    stages = Items(3, fail)
    assert Pipeline(stages, in_flight=2, stopping=lambda: False).run(max_items=3) == 3
    assert [type(i.error) for i in stages.finished] == [RuntimeError] * 3


def test_an_error_escaping_receive_stops_receiving_finishes_what_is_in_hand_and_is_raised() -> None:
    stages = Items(2, "receive")
    with pytest.raises(RuntimeError, match="receive broke"):
        Pipeline(stages, in_flight=3, stopping=lambda: False).run()
    assert [i.error for i in stages.finished] == [None, None]


class BrokenTake(Pipeline[Any]):
    """A bug that escapes the main loop as it takes its first item off the line."""

    def _take(self, item: Any) -> bool:
        if not getattr(self, "broke", False):
            self.broke = True
            raise RuntimeError("take broke")
        return super()._take(item)


def test_items_left_waiting_when_the_main_loop_breaks_are_released_not_abandoned() -> None:
    """Every item received is finished, the one taken off the line as the loop broke included, as interrupted: a
    release that charges no attempt (before: RuntimeError, an abandon, and the taken item was never settled)."""
    stages = Items(2)
    pipeline = BrokenTake(stages, in_flight=2, stopping=lambda: False)
    with pytest.raises(RuntimeError, match="take broke"):
        pipeline.run(max_items=2)
    assert len(stages.finished) == pipeline.received >= 1
    assert {type(i.error) for i in stages.finished} == {Interrupted}
    policy = RetryPolicy(max_attempts=3, backoff=timedelta(seconds=1), backoff_max=timedelta(seconds=8))
    assert decide(Interrupted("x"), 1, policy).drain  # released, uncharged


def test_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pipeline(Items(0), in_flight=0, stopping=lambda: False)


def test_a_forced_shutdown_releases_the_analysed_job_without_waiting_for_an_upload_in_progress(
    make_world: Callable[..., World], shutdown: Shutdown
) -> None:
    """a is being uploaded (its upload does not end until b is released), b analysed, when the shutdown is forced: b
    is released (its next generation sent) while a's upload is still under way, not queued behind it."""
    world = make_world(in_flight=2, shutdown=shutdown)
    a, b = (new_job(world.jobs) for _ in range(2))
    for job in (a, b):
        world.queue(job)
    released_during_upload: list[bool] = []

    def upload(job: Job) -> None:
        if job.job_id == a.job_id:
            deadline = time.monotonic() + WAIT
            while not any(m.message_id == f"{b.job_id}:2" for m, _ in world.publisher.sent):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            released_during_upload.append(any(m.message_id == f"{b.job_id}:2" for m, _ in world.publisher.sent))

    world.handler.on_finish = upload
    # Forced once a's upload has begun (its upload stage reported): forced before, a's first upload report, a
    # checkpoint, would stop a too, as in the real handler.
    world.handler.before = hooked({b.job_id: forcing_after(world, shutdown, ("uploading", a.job_id))})
    assert world.consumer.run() == 2
    assert released_during_upload == [True]
    assert (world.job(b).status, world.job(b).charged) == (JobStatus.QUEUED, 0)


def test_a_job_cancelled_while_it_waits_for_the_analysis_is_settled_without_waiting_for_its_turn(
    make_world: Callable[..., World],
) -> None:
    """b is prepared and waits while a is analysed; b's cancellation, seen by b's guard (its lease renewal), settles
    b at once (stopped, cancelled, its message completed) while a's analysis still runs."""
    world = make_world(in_flight=2)
    world.consumer._limits = AttemptLimits(lease=timedelta(seconds=0.3), timeout=timedelta(minutes=10),
                                           hard_exit_after=5)  # fmt: skip
    a, b = (new_job(world.jobs) for _ in range(2))
    for job in (a, b):
        world.queue(job)
    settled_during_a: list[bool] = []

    def analyse_a() -> None:
        until(world, ("prepared", b.job_id))
        world.jobs.request_cancel(b.job_id)
        deadline = time.monotonic() + WAIT
        while not any(mid == f"{b.job_id}:1" for _, mid, _ in world.receiver.settled):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        settled_during_a.append(any(mid == f"{b.job_id}:1" for _, mid, _ in world.receiver.settled))

    world.handler.before = hooked({a.job_id: analyse_a})
    assert world.consumer.run(max_jobs=2) == 2
    assert settled_during_a == [True]
    assert world.job(b).status is JobStatus.CANCELLED
    assert world.handler.runs == [1]  # b never analysed
    assert world.job(a).status is JobStatus.SUCCEEDED


def test_analyses_must_be_between_one_and_in_flight() -> None:
    with pytest.raises(ValueError, match="analyses"):
        Pipeline(Items(0), in_flight=2, stopping=lambda: False, analyses=3)
    with pytest.raises(ValueError, match="analyses"):
        Pipeline(Items(0), in_flight=2, stopping=lambda: False, analyses=0)


def test_with_two_analyses_two_jobs_are_analysed_at_once_each_settled_once(make_world: Callable[..., World]) -> None:
    """WORKER_ANALYSES 2: a's and b's analyses each wait (a barrier) until the other has started, which only two
    computing threads allow; c runs after them. Each is run and settled once."""
    world = make_world(in_flight=3, analyses=2)
    a, b, c = (new_job(world.jobs) for _ in range(3))
    for job in (a, b, c):
        world.queue(job)
    both = threading.Barrier(2, timeout=WAIT)
    world.handler.before = hooked({a.job_id: both.wait, b.job_id: both.wait})
    assert world.consumer.run(max_jobs=3) == 3
    assert [world.job(j).status for j in (a, b, c)] == [JobStatus.SUCCEEDED] * 3
    assert sorted(world.receiver.settled) == sorted(("complete", f"{j.job_id}:1", None) for j in (a, b, c))
    assert world.handler.runs == [1, 1, 1]
    assert in_hand(world.receiver.log) <= 3


def test_a_forced_shutdown_stops_both_analyses_the_main_threads_by_signal_the_others_at_its_checkpoint(
    make_world: Callable[..., World], shutdown: Shutdown
) -> None:
    """Two analyses at once when the shutdown is forced: the one in the main thread is interrupted by the signal,
    the other stops at its next progress report; both are released uncharged, their next generation sent at once."""
    world = make_world(in_flight=2, analyses=2, shutdown=shutdown)
    a, b = (new_job(world.jobs) for _ in range(2))
    for job in (a, b):
        world.queue(job)
    both = threading.Barrier(2, timeout=WAIT)
    threads: dict[UUID, bool] = {}

    def analyse(job: Job, progress: Reporter) -> None:
        threads[job.job_id] = threading.current_thread() is threading.main_thread()
        both.wait()
        if job.job_id == a.job_id:
            shutdown.request("SIGTERM")
            shutdown.request("SIGTERM again")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # interrupted in here: by the signal, or at a checkpoint
            progress.report("indices", 0.5)
            time.sleep(0.01)
        pytest.fail("the analysis was not interrupted")

    world.handler.before = analyse
    assert world.consumer.run() == 2
    assert sorted(threads.values()) == [False, True]  # one in the main thread, one in another
    for job in (a, b):
        now = world.job(job)
        assert (now.status, now.generation, now.attempts, now.drains, now.charged) == (JobStatus.QUEUED, 2, 1, 1, 0)
    assert sorted(m.message_id for m, _ in world.publisher.sent) == sorted(f"{j.job_id}:2" for j in (a, b))
    assert sorted(world.receiver.settled) == sorted(("complete", f"{j.job_id}:1", None) for j in (a, b))
    assert [e for e in world.handler.events if e[0] == "analysed"] == []
