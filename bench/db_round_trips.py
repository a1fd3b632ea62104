"""Database round trips per job: the statements the project's worker sends PostgreSQL against the naive consumer's, as
JSON.

``python -m bench.db_round_trips [--tiny 20] [--medium 10]``

Starts the local stack without workers (as ``bench.worker_throughput`` does) and has PostgreSQL log every statement
(``log_statement = 'all'``), each line prefixed with the client's ``application_name``. Each consumer runs as one
process with ``PGAPPNAME`` set, so its statements are told apart from the benchmark's own (creating the jobs, the
send and its confirmation, polling for the end). Per job set, after one untimed job: ``statements_per_job`` are the
consumer's statements over the timed jobs, per job; ``by_statement`` the same per statement (its first 60
characters; ``<empty>`` is the connection pool's check when it hands a connection out). On this machine a round trip
costs ~0.1 ms; between an Azure VM and Azure Database for PostgreSQL in the same region, about 1 ms: there each
statement a job saves is about a millisecond of its latency, and of the worker's time.

The naive consumer (``bench.naive_worker``) writes one UPDATE per job and nothing else: no claim, no fencing, no
progress, no webhook outbox. ``project_over_naive`` is the ratio of their statements per job.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import psycopg

from bench.worker_throughput import CONSUMERS, DATA, Bench, bench_stack
from local.processes import stop

log = logging.getLogger(__name__)

APP = "bench-consumer"  # the consumers' application_name
PREFIX = f"{APP}|LOG:"


def statements(logs: list[Path]) -> dict[str, int]:
    """Statements the consumer sent, by their first 60 characters, from PostgreSQL's logs (``%a|`` prefix)."""
    counts: dict[str, int] = {}
    for path in logs:
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith(PREFIX):
                continue
            body = line[len(PREFIX) :].strip()
            if body.startswith("statement:"):  # the simple query protocol
                text = body[len("statement:") :].strip()
            elif body.startswith("execute "):  # the extended one: "execute <name>: <sql>"
                text = body.split(":", 1)[1].strip()
            else:
                continue
            if not text and i + 1 < len(lines) and "|" not in lines[i + 1][:64]:
                text = lines[i + 1].strip()  # a statement that starts on a new line
            key = " ".join(text.split())[:60] or "<empty>"
            counts[key] = counts.get(key, 0) + 1
    return counts


def measure(bench: Bench, kind: str, path: Path, count: int, timeout: float) -> dict[str, Any]:
    [service] = bench.start(kind, 1, {"PGAPPNAME": APP})
    logs = sorted((bench.root / "logs").glob("postgres*"))
    try:
        data = path.read_bytes()
        bench.run(bench.prepare(data, 1), [service.pid], timeout)  # first-call costs, and the first connections
        before = statements(logs)
        bench.run(bench.prepare(data, count), [service.pid], timeout)
        after = statements(logs)
    finally:
        stop(service)
    by = {k: (n - before.get(k, 0)) / count for k, n in after.items() if n > before.get(k, 0)}
    return {
        "jobs": count,
        "statements_per_job": round(sum(by.values()), 2),
        "by_statement": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.db_round_trips", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", type=int, default=20, help="jobs of 128x128x4")
    parser.add_argument("--medium", type=int, default=10, help="jobs of 256x256x13 (cloud mask and cover too)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one job set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    sets = {
        "tiny": (DATA / "s2_rgbn_fields_128.tif", args.tiny),
        "medium": (DATA / "s2_l1c_fields_256.tif", args.medium),
    }
    with bench_stack("cropai-bench-roundtrips-") as bench:
        with psycopg.connect(str(bench.settings.database_url), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("ALTER SYSTEM SET log_line_prefix = '%a|'")
            conn.execute("SELECT pg_reload_conf()")
        results: dict[str, dict[str, Any]] = {}
        for name, (path, count) in sets.items():
            if count <= 0:
                continue
            log.warning("%s: %d jobs", name, count)
            results[name] = {kind: measure(bench, kind, path, count, args.timeout) for kind in CONSUMERS}
            naive = results[name]["naive"]["statements_per_job"]
            results[name]["project_over_naive"] = round(results[name]["project"]["statements_per_job"] / naive, 2)
    print(json.dumps({"benchmark": "db_round_trips", "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
