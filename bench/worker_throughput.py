"""Worker throughput: the project's worker against the seeds' naive consumer, side by side in one run, as JSON.

``python -m bench.worker_throughput [--tiny 60] [--medium 20] [--large 6] [--workers 1,2] [--warmup 1]
[--db-rtt-ms 0] [--blob-rtt-ms 0] [--bus-rtt-ms 0]``

Starts the local stack without workers (``local.stack.up``: PostgreSQL, Azurite, the Service Bus emulator, the
Functions host, its timer out of the way) in a temporary directory on free ports. Then, for each worker count and
each consumer, one after the other on the same machine and the same job sets:

* ``project``: ``python -m gpu_worker`` processes, started as ``local.stack`` starts them (``Launcher.worker`` with
  ``services.worker_env``: the stack's settings plus, for N workers, ``WORKER_PROCESSES=N`` and the
  ``OMP_NUM_THREADS`` that follows, as ``make up`` gives them; every other setting, jobs in flight included, at its
  default; ``consumer_env`` and ``worker_settings`` in the output show them);
* ``naive``: ``python -m bench.naive_worker`` processes (receive one, download, analyse, upload one by one, one
  UPDATE, complete; torch/OpenMP defaults).

Start-up and model loading are not timed: the processes are started and waited for until ready (the worker's
heartbeat file, the naive consumer's ready file, both written once their receivers answered), then, per job set,
``--warmup`` jobs per process are run and waited for (first-call costs), then the timed jobs are created and their
images stored (``shared.submission``: validate, insert, upload; nothing sent yet). The clock starts just before the
first send (``shared.submission.hand_over``: send, confirm) and stops at the last ``finished_at`` of those jobs:
``jobs_per_s`` = jobs / that time. ``cpu_s_per_job``: user + system CPU seconds of the consumer processes over the
same interval (from ``/proc``), per job. Job sets: ``tiny`` (tests/data/s2_rgbn_fields_128.tif, 128x128x4),
``medium`` (tests/data/s2_l1c_fields_256.tif, 256x256x13), ``large`` (1024x1024x13, ``bench.analysis.make_scene``).
``project_over_naive`` = project jobs/s / naive jobs/s for the same job set and worker count.

``--db-rtt-ms``: both consumers reach PostgreSQL through :class:`bench.latency_proxy.DelayProxy`, which adds that
much to each round trip (about what separates an Azure VM from Azure Database for PostgreSQL; locally a round trip
is well under 0.1 ms), so a consumer pays for its statements per job as it would there. ``database`` in the output: the
round trip added, and ``SELECT 1`` medians measured directly and as the consumers reach the database.
``--blob-rtt-ms`` and ``--bus-rtt-ms`` do the same for Blob Storage (Azurite) and Service Bus (the emulator): locally
each is a loopback connection, in Azure a network hop to a shared service, so a consumer that waits for each request
in turn (the naive one) pays for every one of them there, and a pipelined one less. The delay is per direction of
each exchange, not per byte: the bandwidth stays the loopback's. ``round_trips_added_ms`` in the output, and
``requests_ms``: the median of one Blob Storage request (a container's properties) and of one Service Bus request
(a peek), as the benchmark reaches the backends (directly) and as the consumers do. The benchmark's own sends and
polls go to the backends directly.

The stack shares the machine's cores with the consumers, so its CPU bounds what any consumer can reach. Over the same
interval, ``stack_cpu_s_per_job``: user + system CPU seconds, per job, of the stack's processes (PostgreSQL, Azurite,
the Service Bus emulator, the Functions host: each with its descendants, PostgreSQL's backends, and the children they
reaped), ``stack_cpu_s_per_job_by_service`` the same per service. ``ceiling_jobs_per_s`` = usable cores / stack CPU s
per job: the jobs/s of a consumer whose own CPU were zero (and the benchmark's, sending and polling, too).
``ceiling_over_naive`` = the project's ceiling / naive jobs/s: the most ``project_over_naive`` could be.
``cores_busy``: the consumers' and the stack's CPU seconds over the interval / (its seconds x usable cores), the share
of the machine a run kept busy; at 1.0 a consumer can only go faster by using less CPU per job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import rasterio
from azure.servicebus import ServiceBusClient
from azure.storage.blob import BlobServiceClient

from bench.analysis import make_scene
from bench.api_latency import timed
from bench.latency_proxy import DelayProxy, upstream_of
from local import services
from local.processes import Service, spawn, stop, wait_ready
from local.stack import REPO_ROOT, StackConfig, down, up
from shared.bus import JobPublisher, servicebus_client
from shared.db import PostgresJobStore, open_pool
from shared.geotiff import Limits
from shared.jobs import Job
from shared.settings import Settings
from shared.storage import BlobStore
from shared.submission import hand_over, input_blob_name, store_input, validate_image

log = logging.getLogger("bench.worker_throughput")

DATA = REPO_ROOT / "tests" / "data"
CONSUMERS = ("project", "naive")
SHOWN_ENV = ("WORKER_", "OMP_", "MKL_", "TORCH_", "GDAL_")  # what could change the consumers' speed: reported
DONE = (
    "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status IN ('failed', 'cancelled')),"
    " max(finished_at) FROM jobs WHERE job_id = ANY(%s)"
)


@dataclass(frozen=True)
class JobSet:
    name: str
    path: Path
    count: int

    def describe(self) -> dict[str, Any]:
        with rasterio.open(self.path) as ds:
            shape = [ds.width, ds.height, ds.count]
        return {"path": str(self.path), "bytes": self.path.stat().st_size, "shape": shape, "jobs": self.count}


class Bench:
    """The stack's clients (as the submit path uses them) and the consumers' environment."""

    def __init__(self, root: Path, state: dict[str, Any], config: StackConfig, environ: dict[str, str]) -> None:
        self.root = root
        self.env = services.service_env(
            environ, state["database_url"], state["blob_connection_string"], state["servicebus_connection_string"],
            state["queue_name"], config.service_settings(),
        )  # fmt: skip
        self.settings = Settings.from_env(self.env)
        self.limits = Limits(self.settings.max_upload_bytes, self.settings.max_pixels, self.settings.max_bands)
        self.pool = open_pool(self.settings)
        self.jobs = PostgresJobStore(self.pool)
        self.store = BlobStore.from_settings(self.settings)
        self.client = servicebus_client(self.settings)
        self.publisher = JobPublisher(self.client, self.settings.priority_queues)
        self.launcher = services.Launcher(root, REPO_ROOT, environ)
        self.stack = {service["name"]: service["pid"] for service in state["services"]}  # the stack's processes
        self.cores = len(os.sched_getaffinity(0))
        self.consumer_overrides: dict[str, str] = {}  # settings the consumers get instead of the stack's (proxies)

    def close(self) -> None:
        self.publisher.close()  # closes the client too
        self.store.close()
        self.pool.close()

    def prepare(self, data: bytes, count: int) -> list[Job]:
        """``count`` jobs created and their images stored, as a submit does before its send."""
        image = validate_image(data, self.limits, None, None, None)
        prepared = []
        for _ in range(count):
            job_id = uuid4()
            job, _ = self.jobs.create(job_id=job_id, input_blob=input_blob_name(job_id), input_sha256=image.sha256,
                                      params=image.params, idempotency_key=None)  # fmt: skip
            store_input(job, image.data, self.jobs, self.store, owned=True)
            prepared.append(job)
        return prepared

    def consumer_env(self, kind: str, count: int) -> dict[str, str]:
        """The project's workers get what ``local.stack`` gives ``count`` workers (``services.worker_env``: their
        share of the CPUs); the naive consumer the stack's settings alone. Both reach the backends as
        ``consumer_overrides`` says (through :class:`bench.latency_proxy.DelayProxy`), where it says."""
        env = services.worker_env(self.env, count) if kind == "project" else dict(self.env)
        return env | self.consumer_overrides

    def start(self, kind: str, count: int, extra: Mapping[str, str] | None = None) -> list[Service]:
        """``count`` processes of the ``kind`` consumer, ready; ``extra``: environment on top of theirs."""
        env = self.consumer_env(kind, count) | dict(extra or {})
        started: list[Service] = []
        try:
            for index in range(count):
                started.append(self.launcher.worker(index, env) if kind == "project" else self._naive(index, env))
        except BaseException:
            for service in started:
                stop(service)
            raise
        return started

    def _naive(self, index: int, env: dict[str, str]) -> Service:
        ready = self.root / f"naive-{index}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.root / "logs" / f"naive-{index}.log"
        argv = [sys.executable, "-m", "bench.naive_worker", "--ready-file", str(ready)]
        proc, _ = spawn(argv, log_path, env, REPO_ROOT)
        wait_ready(f"naive-{index}", proc, log_path, timeout=180, probe=ready.exists)
        return Service(f"naive-{index}", proc.pid, str(log_path), "bench.naive_worker", None, "SIGTERM", 15.0)

    def run(self, jobs: list[Job], pids: list[int], timeout: float) -> dict[str, Any]:
        """Send the jobs' messages; wait until all succeeded. jobs/s from the first send to the last finish."""
        cpu, stack = cpu_seconds(pids), stack_cpu_seconds(self.stack)
        started = datetime.now(UTC)
        for job in jobs:
            hand_over(job, self.jobs, self.publisher)
        sent = (datetime.now(UTC) - started).total_seconds()
        finished = self._wait([job.job_id for job in jobs], timeout)
        after, stack_after = cpu_seconds(pids), stack_cpu_seconds(self.stack)
        used = None if cpu is None or after is None else after - cpu
        seconds = (finished - started).total_seconds()
        return {
            "jobs": len(jobs), "seconds": round(seconds, 3), "jobs_per_s": round(len(jobs) / seconds, 3),
            "cpu_s_per_job": None if used is None else round(used / len(jobs), 3), "send_seconds": round(sent, 3),
            **self._stack_share(stack, stack_after, used, len(jobs), seconds),
        }  # fmt: skip

    def _stack_share(
        self,
        before: Mapping[str, float] | None,
        after: Mapping[str, float] | None,
        consumers: float | None,
        jobs: int,
        seconds: float,
    ) -> dict[str, Any]:
        """The stack's CPU per job over a run, per service; the jobs/s it leaves room for on these cores; and the
        share of the cores the consumers and the stack kept busy (``consumers``: their CPU seconds)."""
        if before is None or after is None:
            return {"stack_cpu_s_per_job": None, "stack_cpu_s_per_job_by_service": None, "ceiling_jobs_per_s": None,
                    "cores_busy": None}  # fmt: skip
        by_service = {name: (after[name] - before[name]) / jobs for name in before}
        per_job = sum(by_service.values())
        busy = None if consumers is None else (consumers + per_job * jobs) / seconds / self.cores
        return {
            "stack_cpu_s_per_job": round(per_job, 4),
            "stack_cpu_s_per_job_by_service": {name: round(v, 4) for name, v in by_service.items()},
            "ceiling_jobs_per_s": round(self.cores / per_job, 3) if per_job > 0 else None,
            "cores_busy": None if busy is None else round(busy, 3),
        }

    def _wait(self, job_ids: list[UUID], timeout: float) -> datetime:
        deadline = time.monotonic() + timeout
        with psycopg.connect(str(self.settings.database_url), autocommit=True) as conn:
            while True:
                row = conn.execute(DONE, (job_ids,)).fetchone()
                assert row is not None
                succeeded, failed, last = row
                if failed:
                    raise SystemExit(f"{failed} jobs failed; see the logs in {self.root / 'logs'}")
                if succeeded == len(job_ids):
                    return last  # type: ignore[no-any-return]
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(job_ids) - succeeded} jobs not done after {timeout:.0f} s")
                time.sleep(0.02)


@contextmanager
def bench_stack(prefix: str) -> Iterator[Bench]:
    """The local stack without workers (its timer out of the way) in a new temporary directory, with its clients;
    stopped and removed afterwards, or stopped with its logs kept when the benchmark failed."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    config = StackConfig(root, 0, 0, 0, 0, workers=0, env={"RECONCILE_SCHEDULE": "0 0 0 1 1 *"})
    try:
        bench = Bench(root, up(config, environ), config, environ)
        try:
            yield bench
        finally:
            bench.close()
    except BaseException:
        log.error("logs kept in %s", root / "logs")
        down(root)
        raise
    down(root)
    shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds of the processes (all their threads), or None where /proc is not there."""
    total = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    except OSError:
        return None
    return total / os.sysconf("SC_CLK_TCK")


def stack_cpu_seconds(roots: Mapping[str, int]) -> dict[str, float] | None:
    """User + system CPU seconds of each named process with all its live descendants, each with the CPU of the
    children it reaped (``cutime``, ``cstime``: a PostgreSQL backend that exited is in its postmaster's), or None
    where /proc is not there. A descendant that exits between two calls moves into its parent's count: the
    difference of two calls is the CPU the trees used in between."""
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return None
    parent, used = {}, {}
    for name in entries:
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(name)
        parent[pid] = int(fields[1])
        used[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime (fields 14 to 17 of proc(5))
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for service, root in roots.items():
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            total += used.get(pid, 0)
            todo.extend(children.get(pid, ()))
        out[service] = total / os.sysconf("SC_CLK_TCK")
    return out


def worker_settings(settings: Settings) -> dict[str, str]:
    """The project worker's ``WORKER_*`` settings as it sees them (defaults unless the environment sets them)."""
    fields = Settings.model_fields.items()
    return {f.alias: str(getattr(settings, name)) for name, f in fields if f.alias and f.alias.startswith("WORKER_")}


def delayed(proxied: contextlib.ExitStack, setting: str, rtt_ms: float) -> str:
    """``setting`` (a URL or connection string naming its backend as ``host:port``) through a new
    :class:`DelayProxy` that adds ``rtt_ms`` to each round trip, open until ``proxied`` closes."""
    host, port = upstream_of(setting)
    proxy = proxied.enter_context(DelayProxy(port, delay=rtt_ms / 2000, host=host))
    return proxy.rehost(setting)


def blob_request_ms(connection_string: str, container: str, count: int = 50) -> float:
    """The median milliseconds of one Blob Storage request (a container's properties) through the SDK."""
    with BlobServiceClient.from_connection_string(connection_string) as service:
        client = service.get_container_client(container)
        return timed(client.get_container_properties, count)["p50"]


def bus_request_ms(connection_string: str, queue: str, count: int = 50) -> float:
    """The median milliseconds of one Service Bus request (a peek: a request and its response on the AMQP link)
    through the SDK."""
    with ServiceBusClient.from_connection_string(connection_string) as client, client.get_queue_receiver(queue) as rx:
        return timed(lambda: rx.peek_messages(1), count)["p50"]


def round_trip_ms(database_url: str, count: int = 200) -> float:
    """The median milliseconds of ``SELECT 1`` on one connection to ``database_url``."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return timed(lambda: conn.execute("SELECT 1").fetchone(), count)["p50"]


def measure(bench: Bench, sets: list[JobSet], workers: int, warmup: int, timeout: float) -> dict[str, Any]:
    """{set: {consumer: result}} for one worker count, each consumer's processes started once for every set."""
    out: dict[str, dict[str, Any]] = {s.name: {} for s in sets}
    for kind in CONSUMERS:
        services_ = bench.start(kind, workers)
        try:
            pids = [s.pid for s in services_]
            for job_set in sets:
                data = job_set.path.read_bytes()
                log.warning("%s x%d: %s, %d jobs", kind, workers, job_set.name, job_set.count)
                if warmup:
                    bench.run(bench.prepare(data, warmup * workers), pids, timeout)
                out[job_set.name][kind] = bench.run(bench.prepare(data, job_set.count), pids, timeout)
        finally:
            for service in services_:
                stop(service)
    for result in out.values():
        result["project_over_naive"] = round(result["project"]["jobs_per_s"] / result["naive"]["jobs_per_s"], 3)
        ceiling = result["project"]["ceiling_jobs_per_s"]
        result["ceiling_over_naive"] = None if ceiling is None else round(ceiling / result["naive"]["jobs_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", type=int, default=60, help="timed tiny jobs (128x128x4)")
    parser.add_argument("--medium", type=int, default=20, help="timed medium jobs (256x256x13)")
    parser.add_argument("--large", type=int, default=6, help="timed 1024x1024x13 jobs")
    parser.add_argument("--large-size", type=int, default=1024, help="side of the large jobs' scene")
    parser.add_argument("--workers", default="1,2", help="worker process counts, comma-separated")
    parser.add_argument("--warmup", type=int, default=1, help="untimed jobs per process before each job set")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one job set")
    rtt_help = "milliseconds added to each of the consumers' %s round trips (%s)"
    parser.add_argument("--db-rtt-ms", type=float, default=0.0, help=rtt_help % ("PostgreSQL", "Azure: ~1"))
    assumed = "Azure: ~5, assumed"
    parser.add_argument("--blob-rtt-ms", type=float, default=0.0, help=rtt_help % ("Blob Storage", assumed))
    parser.add_argument("--bus-rtt-ms", type=float, default=0.0, help=rtt_help % ("Service Bus", assumed))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    counts = [int(n) for n in args.workers.split(",")]
    with bench_stack("cropai-bench-throughput-") as bench, contextlib.ExitStack() as proxied:
        added = {"DATABASE_URL": args.db_rtt_ms, "AzureWebJobsStorage": args.blob_rtt_ms,
                 "ServiceBusConnection": args.bus_rtt_ms}  # fmt: skip
        for setting, rtt_ms in added.items():
            if rtt_ms > 0:
                bench.consumer_overrides[setting] = delayed(proxied, bench.env[setting], rtt_ms)
        direct = str(bench.settings.database_url)
        database = {
            "rtt_ms_added": args.db_rtt_ms,
            "rtt_ms_direct": round_trip_ms(direct),
            "rtt_ms_consumers": round_trip_ms(bench.consumer_overrides.get("DATABASE_URL", direct)),
        }
        blob, bus = bench.env["AzureWebJobsStorage"], bench.env["ServiceBusConnection"]
        container, queue = bench.settings.images_container, bench.settings.jobs_queue
        requests_ms = {
            "blob_direct": blob_request_ms(blob, container),
            "blob_consumers": blob_request_ms(bench.consumer_overrides.get("AzureWebJobsStorage", blob), container),
            "bus_direct": bus_request_ms(bus, queue),
            "bus_consumers": bus_request_ms(bench.consumer_overrides.get("ServiceBusConnection", bus), queue),
        }
        large = make_scene(bench.root / f"scene_{args.large_size}.tif", args.large_size)
        sets = [
            JobSet("tiny", DATA / "s2_rgbn_fields_128.tif", args.tiny),
            JobSet("medium", DATA / "s2_l1c_fields_256.tif", args.medium),
            JobSet("large", large, args.large),
        ]
        sets = [s for s in sets if s.count > 0]
        by_workers = {str(n): measure(bench, sets, n, args.warmup, args.timeout) for n in counts}
        report = {
            "benchmark": "worker_throughput",
            "project_over_naive": {
                s.name: {n: by_workers[n][s.name]["project_over_naive"] for n in by_workers} for s in sets
            },
            "ceiling_over_naive": {
                s.name: {n: by_workers[n][s.name]["ceiling_over_naive"] for n in by_workers} for s in sets
            },
            "results": {s.name: {n: by_workers[n][s.name] for n in by_workers} for s in sets},
            "job_sets": {s.name: s.describe() for s in sets},
            "warmup_jobs_per_process": args.warmup,
            "consumer_env": {
                f"{kind} x{n}": {
                    k: v for k, v in sorted(bench.consumer_env(kind, n).items()) if k.startswith(SHOWN_ENV)
                }
                for kind in CONSUMERS
                for n in counts
            },
            "worker_settings": worker_settings(bench.settings),
            "database": database,
            "round_trips_added_ms": {"database": args.db_rtt_ms, "blob": args.blob_rtt_ms, "bus": args.bus_rtt_ms},
            "requests_ms": requests_ms,
            "machine": {
                "cpus": os.cpu_count(),
                "usable_cores": bench.cores,
                "python": platform.python_version(),
                "load_1m": os.getloadavg()[0],
            },
        }
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
