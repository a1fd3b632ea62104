"""``python -m local.stack up|down|status``: the whole pipeline on loopback, started from the repository.

``up`` starts, in order, PostgreSQL (``ROOT/postgres``; a ``DATABASE_URL`` in the environment is used instead),
Azurite (``ROOT/azurite``), the Service Bus emulator (``ROOT/servicebus``), the migrations, the Functions host and
the workers, each with its settings derived from the services before it, and waits until each is ready. It records
every PID in ``ROOT/stack.json`` as it goes, with the URLs clients need::

    {"api_url": "http://127.0.0.1:7071/api", "database_url": "postgresql://postgres@127.0.0.1:5433/postgres",
     "blob_connection_string": "...", "servicebus_connection_string": "...", "queue_name": "jobs",
     "root": "...", "env": {...settings given to the services...},
     "services": [{"name", "pid", "log", "marker", "port", "stop_signal", "grace"}, ...]}

``--models-dir DIR`` (``StackConfig.models_dir``) gives the workers ``MODELS_DIR=DIR``: the pluggable model slot
(``?analysis=model:<name>``, see docs/analysis.md). Without it the workers get whatever ``MODELS_DIR`` the caller's
environment holds (none by default). Workers read the folder at start-up, so models must be in it before ``up``.

Logs go to ``ROOT/logs/<service>.log``. When something fails, what was started is stopped and the error names the
log. ``down`` stops exactly what ``stack.json`` lists (newest first) and is safe to run twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local import services
from local.ports import PortBusy
from local.processes import Service, ServiceFailed, is_alive, stop

logger = logging.getLogger("local.stack")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT / ".local"
STACK_FILE = "stack.json"


@dataclass
class StackConfig:
    root: Path = DEFAULT_ROOT
    postgres_port: int = 5433  # 0 everywhere: any free port
    azurite_port: int = 10000
    servicebus_port: int = 5672
    api_port: int = 7071
    servicebus_config: Path = REPO_ROOT / "local" / "servicebus.config.json"
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)  # extra settings for the host and the workers
    models_dir: Path | None = None  # MODELS_DIR for the workers (model:<name> analyses)
    repo: Path = REPO_ROOT  # the code the services run (local.chaos runs a copy, immune to edits made meanwhile)

    def service_settings(self) -> dict[str, str]:
        """``env``, plus ``MODELS_DIR`` when ``models_dir`` is given."""
        models = {} if self.models_dir is None else {"MODELS_DIR": str(self.models_dir.resolve())}
        return {**self.env, **models}


class StackError(RuntimeError):
    """The stack could not be started; what had started was stopped again."""


def stack_file(root: Path) -> Path:
    return root / STACK_FILE


def read_state(root: Path) -> dict[str, Any] | None:
    path = stack_file(root)
    return dict(json.loads(path.read_text())) if path.exists() else None


def _write_state(root: Path, state: Mapping[str, Any]) -> None:
    path = stack_file(root)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def running(state: Mapping[str, Any]) -> list[Service]:
    return [s for s in map(Service.from_json, state.get("services", [])) if is_alive(s.pid)]


def up(config: StackConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Start everything (see the module docstring); return what was written to ``stack.json``."""
    environ = dict(os.environ if environ is None else environ)
    root = config.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    previous = read_state(root)
    if previous is not None and running(previous):
        down(root)  # a half-dead stack from an earlier run: start clean
    state: dict[str, Any] = {"root": str(root), "services": []}
    launcher = services.Launcher(root, config.repo, environ)

    def record(service: Service | None) -> None:
        if service is not None:
            state["services"].append(service.to_json())
        _write_state(root, state)

    try:
        database_url, pg = launcher.postgres(config.postgres_port)
        state["database_url"] = database_url
        record(pg)
        blob, azurite = launcher.azurite(config.azurite_port)
        state["blob_connection_string"] = blob
        record(azurite)
        launcher.containers(blob, config.env)
        bus, queue, emulator = launcher.servicebus(config.servicebus_port, config.servicebus_config)
        state.update(servicebus_connection_string=bus, queue_name=queue)
        record(emulator)
        extra = config.service_settings()
        env = services.service_env(environ, database_url, blob, bus, queue, extra)
        state["env"] = {k: env[k] for k in sorted(set(env) - set(environ) | set(extra))}
        launcher.migrate(env)  # `python -m shared.migrate` builds the full Settings: every backend must be known
        api_url, host = launcher.functions_host(config.api_port, env)
        state["api_url"] = api_url
        record(host)
        worker_env = services.worker_env(env, config.workers)
        for index in range(config.workers):
            record(launcher.worker(index, worker_env))
    except BaseException as e:  # also Ctrl-C half-way: stop what was started
        down(root)
        if isinstance(e, ServiceFailed | PortBusy | services.SetupFailed):
            raise StackError(str(e)) from e
        raise
    return state


def down(root: Path) -> list[tuple[str, str]]:
    """Stop what ``ROOT/stack.json`` lists, newest first; remove the file. Returns (service, outcome) pairs."""
    state = read_state(root)
    if state is None:
        return []
    outcomes = []
    for service in reversed([Service.from_json(s) for s in state.get("services", [])]):
        outcome = stop(service)
        outcomes.append((service.name, outcome))
        logger.info("%s (PID %d): %s", service.name, service.pid, outcome, extra={"action": "stop"})
    stack_file(root).unlink(missing_ok=True)
    return outcomes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state, data and logs (default .local)")
    defaults = StackConfig()
    for name in ("postgres_port", "azurite_port", "servicebus_port", "api_port"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, name), help="0: any free port")
    parser.add_argument("--servicebus-config", type=Path, default=defaults.servicebus_config)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--models-dir", type=Path, help="MODELS_DIR for the workers (model:<name> analyses)")
    return parser


def _status(root: Path) -> int:
    state = read_state(root)
    if state is None:
        print("stack: not running")
        return 1
    alive = {s.pid for s in running(state)}
    for service in map(Service.from_json, state["services"]):
        flag = "up  " if service.pid in alive else "DOWN"
        print(f"{flag} {service.name:<12} pid {service.pid:<8} port {service.port or '-':<6} log {service.log}")
    print(f"API: {state.get('api_url', '-')}")
    return 0 if len(alive) == len(state["services"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every HTTP request and AMQP frame at INFO
    if args.command == "down":
        if not down(args.root):
            print("stack: nothing to stop")
        return 0
    if args.command == "status":
        return _status(args.root)
    config = StackConfig(
        root=args.root,
        postgres_port=args.postgres_port,
        azurite_port=args.azurite_port,
        servicebus_port=args.servicebus_port,
        api_port=args.api_port,
        servicebus_config=args.servicebus_config,
        workers=args.workers,
        models_dir=args.models_dir,
    )
    try:
        state = up(config)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1
    print(f"stack: state in {stack_file(config.root.resolve())}, logs in {config.root.resolve() / 'logs'}")
    print(f"API: {state['api_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
