"""Which queue the next message comes from, and how long each receive waits, with scripted receivers.

The real SDK against the emulator (and the order jobs actually run in) is tests/integration/test_worker_api.py's.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from azure.servicebus import ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusConnectionError

from gpu_worker.inbox import HIGH_RECHECK, IDLE_WAIT, PEEK, QUICK, PriorityInbox, Received
from gpu_worker.locks import LostLocks
from gpu_worker.receiver import SerialReceiver

WAIT = 10.0  # seconds: a bound on a hang, never a speed claim


class Message:
    def __init__(self, name: str, *, expired: bool = False) -> None:
        self.message_id = name
        self.lock_token = uuid.uuid4()
        self.locked_until_utc = datetime.now(UTC) + timedelta(seconds=-1 if expired else 60)


class Link:
    """What :func:`gpu_worker.inbox.link_of` finds: the SDK's AMQP link."""

    def __init__(self) -> None:
        self.current_link_credit = 0
        self.flows: list[int] = []

    def flow(self, *, link_credit: int) -> None:
        self.flows.append(link_credit)
        self.current_link_credit = link_credit


class Handler:
    def __init__(self) -> None:
        self._link = Link()


class Receiver:
    """A queue of scripted messages; records each receive's wait. An empty receive leaves a credit, as the SDK's."""

    def __init__(self, name: str, log: list[tuple[str, float]], *messages: Message) -> None:
        self.name = name
        self.log = log
        self.messages = deque(messages)
        self._handler = Handler()
        self.error: Exception | None = None

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[Message]:
        assert max_message_count == 1
        self.log.append((self.name, max_wait_time))
        if self.error is not None:
            raise self.error
        if self.messages:
            return [self.messages.popleft()]
        self._handler._link.current_link_credit = 1
        return []


def names(count: int, prefix: str) -> list[Message]:
    return [Message(f"{prefix}{i}") for i in range(1, count + 1)]


class World:
    """``step``: the seconds each round takes on the inbox's clock (by default each job runs ``HIGH_RECHECK``, so
    jobs-high is looked at before every job)."""

    def __init__(self, high: int = 0, normal: int = 0, burst: int = 2, step: float = HIGH_RECHECK) -> None:
        self.log: list[tuple[str, float]] = []
        self.high = Receiver("high", self.log, *names(high, "h"))
        self.normal = Receiver("normal", self.log, *names(normal, "n"))
        self.locks = LostLocks()
        self.now, self.step = 1000.0, step
        self.inbox = PriorityInbox(
            cast(ServiceBusReceiver, self.normal), cast(ServiceBusReceiver, self.high), burst=burst, wait=5.0,
            locks=self.locks, clock=lambda: self.now,
        )  # fmt: skip

    def drain(self, rounds: int = 50) -> list[str]:
        order = []
        for _ in range(rounds):
            received = self.inbox.receive()
            self.now += self.step
            if received is not None:
                order.append(cast(Any, received.message).message_id)
        return order


def test_high_priority_first() -> None:
    world = World(high=2, normal=3)
    assert world.drain() == ["h1", "h2", "n1", "n2", "n3"]


def test_a_steady_high_stream_lets_a_normal_job_through_every_burst_plus_one() -> None:
    world = World(high=7, normal=3, burst=2)
    assert world.drain() == ["h1", "h2", "n1", "h3", "h4", "n2", "h5", "h6", "n3", "h7"]


def test_after_a_burst_an_empty_normal_queue_costs_one_quick_look() -> None:
    world = World(high=5, normal=0, burst=2)
    assert world.drain(5) == ["h1", "h2", "h3", "h4", "h5"]
    assert world.log[:4] == [("high", IDLE_WAIT), ("high", QUICK), ("normal", QUICK), ("high", QUICK)]


def test_each_message_names_the_receiver_that_settles_it() -> None:
    world = World(high=1, normal=1)
    first, second = world.inbox.receive(), world.inbox.receive()
    assert isinstance(first, Received)
    assert isinstance(second, Received)
    assert (cast(Any, first.receiver.receiver), first.priority) == (world.high, "high")
    assert (cast(Any, second.receiver.receiver), second.priority) == (world.normal, "normal")


class Renewer:
    """Records what the inbox registers with its renewer (the worker's ``gpu_worker.renewal.LockRenewer``)."""

    def __init__(self) -> None:
        self.registered: list[tuple[Any, Any]] = []

    def register(self, receiver: Any, renewable: Any) -> None:
        self.registered.append((receiver, renewable))


def test_each_message_handed_out_is_registered_with_the_renewer_through_its_serial_receiver() -> None:
    world = World(high=1, normal=1)
    renewer = Renewer()
    world.inbox._renewer = cast(Any, renewer)
    world.high.messages.appendleft(Message("stale", expired=True))  # skipped: never registered
    received = [r for r in (world.inbox.receive() for _ in range(4)) if r is not None]
    assert [(r.receiver, r.message.message_id) for r in received] == [
        (world.inbox._normal, "n1"), (world.inbox._high, "h1"),
    ]  # fmt: skip
    assert [(r, m.message_id) for r, m in renewer.registered] == [
        (world.inbox._normal, "n1"),
        (world.inbox._high, "h1"),
    ]
    assert isinstance(world.inbox._high, SerialReceiver)


class Blocking(Receiver):
    """A receive that waits until ``release`` is set; records what else was called while it waited."""

    def __init__(self) -> None:
        super().__init__("blocking", [])
        self.receiving = threading.Event()
        self.release = threading.Event()
        self.calls: list[str] = []

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[Message]:
        self.receiving.set()
        self.release.wait(WAIT)
        self.calls.append("receive returned")
        return []

    def complete_message(self, message: Message) -> None:
        self.calls.append("complete")

    def renew_message_lock(self, message: Message, **kwargs: Any) -> datetime:
        self.calls.append("renew")
        return message.locked_until_utc


@pytest.mark.parametrize("call", ["complete", "renew"])
def test_a_settlement_or_a_renewal_from_another_thread_waits_for_the_receive_in_progress(call: str) -> None:
    """The SDK's receiver is not thread-safe: the preparing thread's receive, the finishing thread's settlement and
    the renewer's renewals are serialised on the receiver."""
    blocking = Blocking()
    serial = SerialReceiver(cast(ServiceBusReceiver, blocking))
    message = cast(Any, Message("m1"))
    receive = threading.Thread(target=serial.receive_messages, args=(1, 5.0))
    receive.start()
    assert blocking.receiving.wait(WAIT)
    other = threading.Thread(
        target=serial.complete_message if call == "complete" else serial.renew_message_lock, args=(message,)
    )
    other.start()
    other.join(0.2)
    assert other.is_alive()  # waiting for the receive's lock
    blocking.release.set()
    receive.join(WAIT)
    other.join(WAIT)
    assert blocking.calls == ["receive returned", call]


def test_while_busy_each_queue_is_asked_quickly_and_once_idle_each_waits_in_turn() -> None:
    world = World(normal=1)
    world.drain(3)
    assert world.log == [
        ("high", IDLE_WAIT),  # a fresh inbox waits: nothing is known to be waiting
        ("normal", IDLE_WAIT),  # n1
        ("high", PEEK),  # right after a job: a look at the high queue, found empty last time
        ("normal", QUICK),  # more may be waiting
        ("high", IDLE_WAIT),  # both were empty: an idle worker waits on each in turn
        ("normal", IDLE_WAIT),
    ]
    assert IDLE_WAIT <= 0.5  # an idle worker picks a high-priority job up within about this


def test_a_busy_worker_looks_at_the_empty_high_queue_once_per_recheck_and_a_high_job_waits_at_most_that() -> None:
    """Tiny jobs, 62.5 ms each: a PEEK before each cost 20 ms of the preparing thread's 33 ms per job."""
    world = World(normal=20, step=HIGH_RECHECK / 4)
    assert world.drain(9) == [f"n{i}" for i in range(1, 10)]
    asks = [(queue, wait) for queue, wait in world.log if queue == "high"]
    assert asks == [("high", IDLE_WAIT), ("high", PEEK), ("high", PEEK)]  # before n1, n5 and n9: HIGH_RECHECK apart
    world.high.messages.append(Message("h1"))  # arrives while n9 runs
    order = world.drain(5)
    assert order == ["n10", "n11", "n12", "h1", "n13"]  # taken at the next look, within HIGH_RECHECK of its arrival
    assert world.drain(20)[-1] == "n20"


def test_an_idle_worker_asks_the_high_queue_first_at_every_round_whatever_the_recheck() -> None:
    world = World(step=0.0)
    world.drain(2)
    world.high.messages.append(Message("h1"))
    world.normal.messages.append(Message("n1"))
    assert world.drain(2) == ["h1", "n1"]
    assert world.log[:5] == [("high", IDLE_WAIT), ("normal", IDLE_WAIT)] * 2 + [("high", IDLE_WAIT)]  # h1: asked


def test_an_empty_receive_takes_its_credit_back() -> None:
    world = World(normal=1)
    world.drain(1)
    assert world.high._handler._link.flows == [0]  # empty: the credit is revoked
    assert world.normal._handler._link.flows == []  # the credit was used by the message
    assert world.high._handler._link.current_link_credit == 0


def test_a_message_whose_lock_ran_out_in_the_buffer_is_skipped() -> None:
    world = World()
    world.high.messages.append(Message("stale", expired=True))
    world.normal.messages.append(Message("n1"))
    assert world.drain(1) == ["n1"]


def test_a_busy_worker_whose_high_queue_handed_over_a_stale_message_looks_again_at_the_next_round() -> None:
    """The broker redelivers the skipped message at once: no waiting ``HIGH_RECHECK`` for it."""
    world = World(normal=3, step=0.0)
    assert world.drain(1) == ["n1"]
    world.high.messages.append(Message("stale", expired=True))
    world.now += HIGH_RECHECK
    assert world.drain(1) == ["n2"]  # the stale one skipped, the normal queue asked
    world.high.messages.append(Message("h1"))  # its redelivery
    assert world.drain(1) == ["h1"]
    assert [queue for queue, _ in world.log[2:]] == ["high", "normal", "high"]


def test_a_skipped_message_whose_renewal_failed_first_is_forgotten() -> None:
    """The renewer reported the failure while the message waited; the inbox then skips it: no token stays behind."""
    world = World()
    stale = Message("stale")
    world.locks.on_renew_failure(cast(Any, stale), ConnectionError("link detached"))
    assert world.locks.lost(cast(Any, stale))
    stale.locked_until_utc = datetime.now(UTC) - timedelta(seconds=1)
    world.high.messages.append(stale)
    assert world.drain(1) == []
    assert world.locks._lost == set()


def test_a_renewal_failure_reported_after_the_skip_records_nothing() -> None:
    """The renewer finds the skipped message's lock run out and reports it: the lock is lost by its time alone."""
    world = World()
    stale = Message("stale", expired=True)
    world.high.messages.append(stale)
    assert world.drain(1) == []
    world.locks.on_renew_failure(cast(Any, stale), None)
    assert world.locks._lost == set()
    assert world.locks.lost(cast(Any, stale))


def test_an_sdk_without_the_link_where_credit_is_revoked_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    world.high._handler = cast(Any, SimpleNamespace(_link=SimpleNamespace(current_link_credit=0)))  # no flow()
    world.drain(3)
    warned = [r for r in caplog.records if getattr(r, "action", None) == "credit_revoke_unavailable"]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert world.normal._handler._link.flows == [0, 0, 0]  # the other receiver's credit is still taken back


def test_a_failed_receive_passes_through_and_the_next_round_waits_long_enough_to_reopen_a_link() -> None:
    world = World(high=2)
    world.drain(1)
    world.high.error = ServiceBusConnectionError(message="connection lost")
    with pytest.raises(ServiceBusConnectionError):
        world.inbox.receive()
    world.high.error = None
    world.log.clear()
    assert world.drain(1) == ["h2"]
    assert world.log == [("high", IDLE_WAIT)]


def test_a_wait_below_the_cap_is_what_an_idle_round_waits_on_each_queue() -> None:
    """``WORKER_MAX_WAIT_TIME`` under ``IDLE_WAIT`` (above it, the cap: the other tests' 5 s waits 0.5 s)."""
    log: list[tuple[str, float]] = []
    high, normal = Receiver("high", log), Receiver("normal", log, Message("n1"))
    now = [0.0]
    inbox = PriorityInbox(
        cast(ServiceBusReceiver, normal), cast(ServiceBusReceiver, high), burst=2, wait=0.1, locks=LostLocks(),
        clock=lambda: now[0],
    )  # fmt: skip
    assert inbox.receive() is not None
    now[0] += HIGH_RECHECK
    assert inbox.receive() is None  # busy: a quick look at each
    assert inbox.receive() is None  # idle
    assert log == [("high", 0.1), ("normal", 0.1), ("high", PEEK), ("normal", QUICK), ("high", 0.1), ("normal", 0.1)]


def test_a_stream_of_normal_jobs_only_peeks_at_the_empty_high_queue_and_a_high_job_still_comes_first() -> None:
    world = World(normal=3)
    assert world.drain(2) == ["n1", "n2"]
    world.high.messages.append(Message("h1"))  # arrives while n2 runs
    assert world.drain(3) == ["h1", "n3"]
    assert world.log == [
        ("high", IDLE_WAIT), ("normal", IDLE_WAIT),  # n1
        ("high", PEEK), ("normal", QUICK),  # n2: the high queue was empty, a peek is enough
        ("high", PEEK),  # h1, already there: taken at the first look
        ("high", QUICK), ("normal", QUICK),  # n3: after a high job, the high queue may hold more
        ("high", PEEK), ("normal", QUICK),  # both empty
    ]  # fmt: skip
