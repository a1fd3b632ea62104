"""A throwaway PostgreSQL for tests and the local stack.

``start_postgres(data_dir)`` runs the system's ``initdb``/``pg_ctl`` (found on ``PATH`` or under
``/usr/lib/postgresql/*/bin``) on a free loopback port with ``trust`` authentication and durability switched off
(``fsync``, ``synchronous_commit``, ``full_page_writes``): fast, and only ever for data that may be lost. Unix
sockets are disabled; clients connect over TCP to 127.0.0.1.

PostgreSQL refuses to run as root. When we are root the server runs as ``nobody`` (``subprocess``'s ``user=``), the
data directory is handed to that user, and every parent directory must be searchable by others.

Without system binaries it falls back to the ``pgserver`` PyPI package (which bundles them), when installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from local.ports import free_port

logger = logging.getLogger(__name__)

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"
_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "unix_socket_directories": "''",
    "listen_addresses": "'127.0.0.1'",
}


class PostgresError(RuntimeError):
    """PostgreSQL could not be initialised or started; the message says why and where the log is."""


@dataclass(frozen=True)
class PostgresServer:
    url: str
    data_dir: Path
    port: int
    pid: int | None
    stop: Callable[[], None]
    log: Path | None = None


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: ``PATH`` first, then the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _major(p.parent.name), reverse=True)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


def _unsearchable_parent(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that other users cannot enter (missing ones will be created 0755)."""
    existing = (p for p in path.resolve().parents if p.exists())
    return next((p for p in existing if not p.stat().st_mode & stat.S_IXOTH), None)


def reachable_data_dir(preferred: Path) -> Path:
    """``preferred``, or, when we are root and the server's user could not reach it, a stable place under /tmp."""
    if _run_as() is None or _unsearchable_parent(preferred) is None:
        return preferred
    digest = hashlib.sha1(str(preferred.resolve()).encode()).hexdigest()[:10]
    fallback = Path(tempfile.gettempdir()) / f"crop-ai-postgres-{digest}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    logger.info("PostgreSQL data in %s: %s is not reachable by %s", fallback, preferred, UNPRIVILEGED_USER)
    return fallback / preferred.name


def _check_searchable(path: Path) -> None:
    parent = _unsearchable_parent(path)
    if parent is not None:
        raise PostgresError(
            f"{parent} is not searchable by other users, so PostgreSQL (running as {UNPRIVILEGED_USER!r} because "
            f"we are root) cannot reach {path}; choose a data directory elsewhere (e.g. under /tmp)"
        )


def _pg(bin_dir: Path, args: list[str], user: tuple[int, int] | None, log: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    uid, gid = user if user is not None else (None, None)
    with log.open("ab") as out:
        proc = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            user=uid,
            group=gid,
            extra_groups=[] if user is not None else None,
            check=False,
        )
    if proc.returncode != 0:
        raise PostgresError(f"{' '.join(args[:1] + args[-1:])} failed (exit {proc.returncode}); see {log}")


def _chown_tree(path: Path, user: tuple[int, int]) -> None:
    os.chown(path, *user)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *user)


def _read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def start_postgres(data_dir: Path, port: int | None = None, log_path: Path | None = None) -> PostgresServer:
    """Initialise ``data_dir`` when empty, start the server on ``port`` (free one when None); wait until ready."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return _start_pgserver(data_dir)
    data_dir = data_dir.resolve()
    log = (log_path or data_dir.parent / f"{data_dir.name}.log").resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    user = _run_as()
    if user is not None:
        _check_searchable(data_dir)
        if _unsearchable_parent(log) is not None:
            log = data_dir.parent / f"{data_dir.name}.log"  # beside the data, which the server's user can reach
            log.touch()
        os.chown(log, *user)
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _chown_tree(data_dir, user)
        _pg(
            bin_dir,
            ["initdb", "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            user,
            log,
        )
    port = port or free_port()
    options = " ".join(f"-c {k}={v}" for k, v in {**_SETTINGS, "port": str(port)}.items())
    _pg(bin_dir, ["pg_ctl", "-D", str(data_dir), "-l", str(log), "-o", options, "-w", "-t", "60", "start"], user, log)

    def stop() -> None:
        _pg(bin_dir, ["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "-t", "60", "stop"], user, log)

    url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
    logger.info("PostgreSQL ready at %s", url, extra={"action": "postgres_ready"})
    return PostgresServer(url=url, data_dir=data_dir, port=port, pid=_read_pid(data_dir), stop=stop, log=log)


def _start_pgserver(data_dir: Path) -> PostgresServer:
    try:
        import pgserver  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise PostgresError(
            "no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin, and the pgserver package is not installed "
            "(pip install pgserver)"
        ) from e
    server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    url = str(server.get_uri())
    return PostgresServer(url=url, data_dir=data_dir, port=0, pid=None, stop=server.cleanup)
