"""``submit --wait``: poll each job until it is finished, showing its progress (``progress.stage``/``fraction``)
as a rich progress bar on a terminal, or one line per change otherwise (a log, CI). Between polls it sleeps the
API's ``Retry-After`` unless ``--poll`` says otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cli.api import Api
from cli.render import progress_text
from shared.status import JobView

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_POLL = 2.0  # without a Retry-After
MIN_POLL = 0.2


@dataclass
class Outcome:
    views: dict[str, JobView] = field(default_factory=dict)  # the last view of each job
    bodies: dict[str, str] = field(default_factory=dict)  # ... and its JSON as the API answered it
    finished: bool = False

    @property
    def all_succeeded(self) -> bool:
        return self.finished and all(_dump(v)["status"] == "succeeded" for v in self.views.values())


class Tracker(Protocol):
    def update(self, job_id: str, view: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def wait(
    api: Api,
    job_ids: Sequence[str],
    *,
    timeout: float,
    poll: float | None,
    console: Console,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Poll until every job is terminal or ``timeout`` seconds have passed (``finished`` says which)."""
    outcome = Outcome()
    tracker: Tracker = Bars(console, job_ids) if console.is_terminal else Lines(console)
    deadline = clock() + timeout
    try:
        pending = list(job_ids)
        while True:
            hints: list[float] = []
            for job_id in pending:
                response = api.job(job_id)
                view = JobView.model_validate_json(response.content)
                outcome.views[job_id], outcome.bodies[job_id] = view, response.text
                tracker.update(job_id, _dump(view))
                if (after := response.headers.get("Retry-After", "")).isdigit():
                    hints.append(float(after))
            delay = poll if poll is not None else max(min(hints, default=DEFAULT_POLL), MIN_POLL)
            pending = [j for j in pending if _dump(outcome.views[j])["status"] not in TERMINAL]
            if not pending:
                outcome.finished = True
                return outcome
            if clock() + delay > deadline:
                return outcome
            sleep(delay)
    finally:
        tracker.close()


class Bars:
    """One progress bar per job: its stage and fraction while running, its status once finished."""

    def __init__(self, console: Console, job_ids: Sequence[str]) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[job]}"),
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {
            job_id: self.progress.add_task("queued", total=1.0, job=job_id[:8]) for job_id in job_ids
        }
        self.progress.start()

    def update(self, job_id: str, view: dict[str, Any]) -> None:
        status = str(view["status"])
        progress = view.get("progress") or {}
        fraction = progress.get("fraction") if isinstance(progress.get("fraction"), int | float) else None
        if status == "succeeded":
            fraction = 1.0
        description = str(progress.get("stage", status)) if status == "running" and progress else status
        if view.get("cancel_requested") and status == "running":
            description += " (cancelling)"
        self.progress.update(self.tasks[job_id], description=description, completed=fraction or 0.0)

    def close(self) -> None:
        self.progress.stop()


class Lines:
    """Not a terminal: a line whenever a job's status or stage changes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self.last: dict[str, str] = {}

    def update(self, job_id: str, view: dict[str, Any]) -> None:
        status = str(view["status"])
        progress = view.get("progress")
        line = f"{status} ({progress_text(progress)})" if status == "running" and progress else status
        if self.last.get(job_id) != line:
            self.last[job_id] = line
            self.console.print(
                f"job {job_id}: {line}, {time.monotonic() - self.started:.0f} s", highlight=False, markup=False
            )

    def close(self) -> None:
        pass


def _dump(view: JobView) -> dict[str, Any]:
    return view.model_dump(mode="json")
