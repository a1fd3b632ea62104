"""The chaos run's plan as data: the faults on a timeline and when each job is submitted (printed in the report).

Times are seconds after the chaos phase starts (the stack is up). ``build_timeline`` lays the faults out one after
the other, each given time to show its effect, with worker SIGKILLs every ``kill_every`` seconds over the whole run
(outages included) and a burst of submits just before the host kill and each outage, so that work is in flight when
they hit. ``submit_times`` gives every job its time: the bursts first, the rest spread evenly until the last fault
ends.
"""

from __future__ import annotations

import enum
import random
from dataclasses import asdict, dataclass
from typing import Any

LAG = 0.5  # seconds from a burst to the outage after it: the burst's jobs are still running when it hits


class Kind(enum.StrEnum):
    BURST = "burst"  # load, not a fault: `count` jobs submitted at once
    KILL_WORKER = "kill_worker"  # SIGKILL a worker (a busy one if one gets busy soon), start a replacement
    TERM_WORKER = "term_worker"  # SIGTERM a worker (graceful drain), start a replacement once it exited
    RESTART_EMULATOR = "restart_emulator"  # `signal` the Service Bus emulator, start it again (same port, data)
    KILL_HOST = "kill_host"  # SIGKILL the Functions host while submits are in flight, start it again
    ORPHANS = "orphans"  # `count` jobs left as a host killed between insert and send leaves them
    BLOB_OUTAGE = "blob_outage"  # Azurite down for `seconds` (SIGTERM, then the same data dir and port)
    PG_OUTAGE = "pg_outage"  # PostgreSQL down for `seconds` (immediate shutdown, then the same data dir and port)


@dataclass(frozen=True)
class Fault:
    at: float
    kind: Kind
    seconds: float = 0.0  # outages: how long the service stays down
    count: int = 0  # bursts and orphans: how many jobs
    signal: str = ""  # restart_emulator: SIGKILL or SIGTERM

    @property
    def end(self) -> float:
        return self.at + self.seconds

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v not in (0, 0.0, "")}
        return {"at": self.at, **data, "kind": self.kind.value}


@dataclass(frozen=True)
class Plan:
    jobs: int
    pg_outage: float
    blob_outage: float
    orphans: int
    kill_every: tuple[float, float]  # seconds between worker SIGKILLs, drawn uniformly
    seed: int = 1
    gap: float = 15.0  # seconds between one fault and the next


def build_timeline(plan: Plan) -> list[Fault]:
    """The faults of ``plan``, by time."""
    burst = max(1, plan.jobs // 8)
    gap = plan.gap
    faults = [Fault(10.0, Kind.ORPHANS, count=plan.orphans)] if plan.orphans else []
    t = 20.0
    faults += [Fault(t, Kind.BURST, count=burst), Fault(t, Kind.KILL_HOST)]
    t += gap
    faults.append(Fault(t, Kind.TERM_WORKER))
    t += gap
    faults.append(Fault(t, Kind.RESTART_EMULATOR, signal="SIGKILL"))
    t += gap
    faults += [Fault(t, Kind.BURST, count=burst), Fault(t + LAG, Kind.BLOB_OUTAGE, seconds=plan.blob_outage)]
    t += LAG + plan.blob_outage + gap
    faults += [Fault(t, Kind.BURST, count=burst), Fault(t + LAG, Kind.PG_OUTAGE, seconds=plan.pg_outage)]
    t += LAG + plan.pg_outage + gap
    faults += [Fault(t, Kind.BURST, count=burst), Fault(t, Kind.KILL_HOST)]
    t += gap
    faults.append(Fault(t, Kind.RESTART_EMULATOR, signal="SIGTERM"))
    end = t + gap
    rng = random.Random(plan.seed)
    t = rng.uniform(*plan.kill_every) / 2
    while t < end:
        faults.append(Fault(round(t, 1), Kind.KILL_WORKER))
        t += rng.uniform(*plan.kill_every)
    return sorted(faults, key=lambda f: f.at)


def last_fault_end(timeline: list[Fault]) -> float:
    return max((f.end for f in timeline), default=0.0)


def submit_times(jobs: int, timeline: list[Fault]) -> list[float]:
    """When each of ``jobs`` jobs is first submitted: the bursts' jobs at their time (while jobs last), the rest
    evenly over the run, until the last fault ends."""
    times: list[float] = []
    for fault in timeline:
        if fault.kind is Kind.BURST:
            times += [fault.at] * min(fault.count, jobs - len(times))
    rest = jobs - len(times)
    span = last_fault_end(timeline)
    times += [round(span * (i + 0.5) / rest, 2) for i in range(rest)]
    return sorted(times)
