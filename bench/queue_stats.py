"""Benchmark reading queue counts from the Service Bus emulator's management API; prints one JSON object.

``python -m bench.queue_stats [--messages N] [--calls 200]`` starts the emulator on a free port with a temporary
data directory, fills one queue with N messages, then times ``QueueStats.counts([queue])`` (one
``get_queue_runtime_properties``: an HTTP GET on a kept-alive connection, the emulator counting the queue's rows in
SQLite) ``calls`` times, on an empty queue and on the full one, and reports p50 / p95 / max in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage

from local.servicebus_emulator import start_emulator
from local.servicebus_emulator.process import connection_string
from shared.queue_stats import QueueStats

CONFIG = Path(__file__).resolve().parents[1] / "local" / "servicebus.config.json"


def _latencies(stats: QueueStats, queue: str, calls: int) -> dict[str, float]:
    stats.counts([queue])  # warm: the connection is opened once
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        stats.counts([queue])
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 3),
        "max_ms": round(samples[-1], 3),
    }


def run(messages: int, calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as data_dir:
        process, port = start_emulator(CONFIG, Path(data_dir))
        try:
            conn = connection_string("127.0.0.1", port)
            with QueueStats.from_connection_string(conn) as stats:
                empty = _latencies(stats, "jobs", calls)
                with ServiceBusClient.from_connection_string(conn) as client, client.get_queue_sender("jobs") as sender:
                    for offset in range(0, messages, 100):
                        batch = sender.create_message_batch()
                        for i in range(offset, min(offset + 100, messages)):
                            batch.add_message(ServiceBusMessage(b"x" * 256, message_id=f"bench-{i}"))
                        sender.send_messages(batch)
                full = _latencies(stats, "jobs", calls)
                (counts,) = stats.counts(["jobs"])
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    return {
        "benchmark": "queue_stats",
        "calls": calls,
        "empty_queue": empty,
        "full_queue": {"messages": counts.active, **full},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    json.dump(run(args.messages, args.calls), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
