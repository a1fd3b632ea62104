"""Benchmark the Service Bus emulator through the real SDK; prints one JSON object.

``python -m bench.servicebus_emulator [--messages N] [--batch 100] [--prefetch 100]`` starts the emulator on a free
port with a temporary data directory, sends N messages in batches, receives them in PEEK_LOCK mode and completes
each one (sync SDK, one client, as the worker does), and reports messages per second for each phase and end to
end. The target on the 2-core dev machine is >= 1,000 msg/s for send + receive + complete.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage

from local.servicebus_emulator import start_emulator
from local.servicebus_emulator.process import connection_string

CONFIG = Path(__file__).resolve().parents[1] / "local" / "servicebus.config.json"


def run(messages: int, batch_size: int, prefetch: int, body_size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as data_dir:
        process, port = start_emulator(CONFIG, Path(data_dir))
        try:
            with ServiceBusClient.from_connection_string(connection_string("127.0.0.1", port)) as client:
                body = b"x" * body_size
                with client.get_queue_sender("jobs") as sender:
                    start = time.perf_counter()
                    for offset in range(0, messages, batch_size):
                        batch = sender.create_message_batch()
                        for i in range(offset, min(offset + batch_size, messages)):
                            batch.add_message(ServiceBusMessage(body, message_id=f"bench-{i}"))
                        sender.send_messages(batch)
                    send_s = time.perf_counter() - start
                received = 0
                with client.get_queue_receiver("jobs", prefetch_count=prefetch, max_wait_time=5) as receiver:
                    start = time.perf_counter()
                    while received < messages:
                        got = receiver.receive_messages(max_message_count=batch_size, max_wait_time=5)
                        if not got:
                            break
                        for message in got:
                            receiver.complete_message(message)
                        received += len(got)
                    receive_s = time.perf_counter() - start
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
    total = send_s + receive_s
    return {
        "benchmark": "servicebus_emulator",
        "messages": messages,
        "received": received,
        "batch_size": batch_size,
        "prefetch": prefetch,
        "body_bytes": body_size,
        "send_msg_per_s": round(messages / send_s, 1),
        "receive_complete_msg_per_s": round(received / receive_s, 1),
        "end_to_end_msg_per_s": round(received / total, 1),
        "target_msg_per_s": 1000,
        "meets_target": received == messages and received / total >= 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--body-bytes", type=int, default=256)
    args = parser.parse_args(argv)
    result = run(args.messages, args.batch, args.prefetch, args.body_bytes)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
