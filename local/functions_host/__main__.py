"""``python -m local.functions_host --app function_app:app [--host 127.0.0.1] [--port 7071] [--host-json host.json]``.

Logs ``Functions host ready: http://HOST:PORT/api`` (with the real port when ``--port 0``) once it accepts requests;
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from local.functions_host.routes import RouteTable, load_route_prefix, routes_of
from local.functions_host.server import DEFAULT_BODY_LIMIT, FunctionsHost, HostConfig

logger = logging.getLogger("local.functions_host")


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` from the current directory (where function_app.py lives)."""
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_name), attribute or "app")


def config_from(args: argparse.Namespace, environ: dict[str, str]) -> HostConfig:
    return HostConfig(
        host=args.host,
        port=args.port,
        body_limit=int(environ.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT", DEFAULT_BODY_LIMIT)),
        enforce_keys=environ.get("FUNCTIONS_HOST_ENFORCE_KEYS", "").lower() in ("1", "true", "yes"),
        function_key=environ.get("FUNCTIONS_HOST_KEY"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.functions_host", description=__doc__)
    parser.add_argument("--app", default="function_app:app", help="module:attribute of the FunctionApp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--host-json", type=Path, default=Path("host.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every HTTP request and AMQP frame at INFO

    app = load_app(args.app)
    table = RouteTable(routes_of(app), load_route_prefix(args.host_json))
    for route in table.routes:
        methods = ",".join(sorted(route.methods))
        logger.info("%s: [%s] /%s/%s", route.function_name, methods, table.prefix, route.template)
    host = FunctionsHost(config_from(args, dict(os.environ)), table)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=host.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("Functions host ready: %s", host.base_url, extra={"action": "host_ready"})
    try:
        host.serve_forever()
    finally:
        host.close()
        logger.info("Functions host stopped", extra={"action": "host_stopped"})


if __name__ == "__main__":
    main()
