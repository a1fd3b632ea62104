"""The command line: global options (accepted before or after the command) and one sub-parser per command."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from cli.api import DEFAULT_API_URL
from cli.upload import UPLOAD_ABOVE

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
EVENTS = ("started", "progress", "completed")
DLQ_ACTIONS = ("redrive", "failed", "none")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="crop-ai",
        description="Command-line client of the Crop AI API: submit GeoTIFFs, follow, cancel and retry jobs, "
        "download their outputs, and look at the service.",
        epilog="Exit codes: 0 ok; 1 a job ended failed or cancelled (--wait) or has nothing to download; "
        "2 bad command line; 3 the API refused the request (4xx); 4 the API is unavailable or failed (5xx, "
        "or health not ok); 5 the API could not be reached; 6 --wait timed out; 130 interrupted.",
    )
    _globals(parser, env, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _globals(common, env, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    submit = command("submit", "submit GeoTIFFs (several files: one batch)")
    submit.add_argument("files", nargs="+", type=Path, metavar="FILE")
    submit.add_argument("--wait", action="store_true", help="follow the jobs until they finish, with progress")
    submit.add_argument("--timeout", type=float, default=600.0, help="--wait: give up after this many seconds")
    submit.add_argument("--poll", type=float, help="--wait: seconds between polls (default: the API's Retry-After)")
    submit.add_argument("--priority", choices=("high", "normal"), help="which queue (default normal)")
    submit.add_argument("--callback-url", help="webhook target (https) for the job's events")
    submit.add_argument(
        "--callback-events",
        type=_events,
        action="extend",
        metavar="EVENTS",
        help=f"webhook event groups, comma-separated: {', '.join(EVENTS)} (default completed)",
    )
    submit.add_argument("--bands", help="band names in file order, comma-separated (default: the file's)")
    submit.add_argument("--analysis", help="crop-health (default) or model:<name>")
    submit.add_argument("--scale", help="reflectance = DN / scale")
    submit.add_argument("--idempotency-key", help="submitting again with the same key returns the same job")
    submit.add_argument(
        "--upload-above",
        type=int,
        default=UPLOAD_ABOVE,
        metavar="BYTES",
        help="a file larger than this is uploaded straight to storage (POST /api/uploads) and submitted by reference "
        f"(default {UPLOAD_ABOVE // (1024 * 1024)} MiB; the API takes bodies of at most 100 MB)",
    )

    command("status", "a job's status, progress, result or error").add_argument("job_id", metavar="ID")

    listing = command("list", "jobs, newest first")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--analysis")
    listing.add_argument("--batch", dest="batch_id", metavar="BATCH_ID")
    listing.add_argument("--created-after", metavar="ISO8601")
    listing.add_argument("--created-before", metavar="ISO8601")
    listing.add_argument("--limit", type=int, help="page size, 1 to 1000 (default 100)")
    listing.add_argument("--next", metavar="CURSOR", help="the cursor a previous page printed")

    command("cancel", "cancel a job (a running one stops at its next step)").add_argument("job_id", metavar="ID")
    command("retry", "run a failed or cancelled job again").add_argument("job_id", metavar="ID")
    command("batch", "a batch's jobs and their statuses").add_argument("batch_id", metavar="ID")
    command("stats", "job counts, throughput, latencies, workers and queue depths")
    command("health", "whether the database, storage and Service Bus answer")

    download = command("download", "save a succeeded job's output files")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("folder", type=Path, metavar="DIR")

    dlq = command("dlq", "dead letters the reconciler drained")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    dlq_list = dlq_commands.add_parser("list", help="list dead letters", parents=[common])
    dlq_list.add_argument("--reason")
    dlq_list.add_argument("--action", choices=DLQ_ACTIONS)
    dlq_list.add_argument("--limit", type=int)
    replay = dlq_commands.add_parser("replay", help="retry the jobs that dead letters failed", parents=[common])
    replay.add_argument("--reason", help="only dead letters with this reason")
    replay.add_argument("--limit", type=int)
    return parser


def _events(text: str) -> list[str]:
    events = [e.strip() for e in text.split(",") if e.strip()]
    unknown = sorted(set(events) - set(EVENTS))
    if not events or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: the event groups are {', '.join(EVENTS)}")
    return events


def _globals(parser: argparse.ArgumentParser, env: Mapping[str, str], *, suppress: bool) -> None:
    """The same options on the top parser (with defaults) and on every command (``SUPPRESS``: given there, they
    override; not given, the top parser's value stands)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--api-url",
        default=default(env.get("CROP_AI_API_URL") or DEFAULT_API_URL),
        help=f"the API's origin or /api URL (env CROP_AI_API_URL, default {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--function-key",
        default=default(env.get("CROP_AI_FUNCTION_KEY") or None),
        help="sent as x-functions-key (env CROP_AI_FUNCTION_KEY)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the API's JSON exactly as it answered, nothing else on stdout",
    )
