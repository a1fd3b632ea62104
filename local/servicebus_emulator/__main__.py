"""``python -m local.servicebus_emulator --config FILE --host 127.0.0.1 --port N [--http-port M] --data-dir DIR``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.servicebus_emulator", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("local/servicebus.config.json"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672, help="0 binds a free port (printed in the ready line)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="an extra port for the management API, which --port also serves (0 binds a free port)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(".local/servicebus"))
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"servicebus emulator: invalid configuration: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(config, args.host, args.port, args.data_dir, args.http_port))
    except OSError as exc:
        print(
            f"servicebus emulator: cannot listen on {args.host}:{args.port} or use {args.data_dir}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
