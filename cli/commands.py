"""The commands: each calls the API, parses the answer with the server's own model, and prints it: the API's JSON
exactly as it came with ``--json``, a rich rendering otherwise. Each returns the exit code."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from rich.console import Console, Group, RenderableType

from cli import render
from cli.api import Api
from cli.errors import ExitCode, UnexpectedResponse, UsageError
from cli.watch import wait
from shared.batches import BatchAccepted, BatchView
from shared.dead_letters import DeadLetterPage, ReplayResult
from shared.health import Health
from shared.stats import Stats
from shared.status import JobPage, JobView
from shared.submission import Accepted

M = TypeVar("M", bound=BaseModel)


@dataclass
class Output:
    json: bool
    out: Console  # stdout: the answer
    err: Console  # stderr: progress, messages

    def error(self, message: str) -> None:
        """A message on stderr, on one line, as written (no markup, no wrapping)."""
        self.err.print(f"crop-ai: {message}", highlight=False, markup=False, soft_wrap=True)

    def answer(self, text: str, rendered: Callable[[], RenderableType]) -> None:
        if self.json:
            self.out.file.write(text if text.endswith("\n") else text + "\n")
            self.out.file.flush()
        else:
            self.out.print(rendered())


def parse(model: type[M], response: httpx.Response) -> M:
    """The body as ``model``: the same validation the server's answers were built with."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as e:
        raise UnexpectedResponse(
            f"{response.request.method} {response.request.url}: not a {model.__name__}: {e}"
        ) from e


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def submit(api: Api, args: argparse.Namespace, out: Output) -> int:
    response, job_ids, shown = _send(api, args)
    if not args.wait:
        out.answer(response.text, shown)
        return ExitCode.OK
    if not out.json:
        out.out.print(shown())
    outcome = wait(api, job_ids, timeout=args.timeout, poll=args.poll, console=out.err)
    bodies = [outcome.bodies[j].strip() for j in job_ids]
    views = [render.job(dump(outcome.views[j])) for j in job_ids]
    out.answer(bodies[0] if len(bodies) == 1 else "[" + ",".join(bodies) + "]", partial(Group, *views))
    if not outcome.finished:
        out.error(f"not finished after {args.timeout:.0f} s")
        return ExitCode.WAIT_TIMEOUT
    return ExitCode.OK if outcome.all_succeeded else ExitCode.JOB_NOT_SUCCEEDED


def _send(api: Api, args: argparse.Namespace) -> tuple[httpx.Response, list[str], Callable[[], RenderableType]]:
    """POST one file to /jobs, several to /batches; the answer, the job ids, and how to show the answer."""
    for path in args.files:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    events = ",".join(args.callback_events) if args.callback_events else None
    given = {
        "bands": args.bands,
        "analysis": args.analysis,
        "scale": args.scale,
        "priority": args.priority,
        "callback_url": args.callback_url,
        "callback_events": events,
    }
    params = {key: value for key, value in given.items() if value is not None}
    large = [path for path in args.files if path.stat().st_size > args.upload_above]
    if len(args.files) == 1 and large:  # past what a request body may carry: straight to storage, then by reference
        upload_id = api.upload(args.files[0])
        response = api.submit_reference({"upload_id": upload_id, **params}, args.idempotency_key)
        accepted = parse(Accepted, response)
        return response, [str(accepted.job_id)], partial(render.accepted, dump(accepted))
    if large:
        raise UsageError(f"{large[0]}: larger than --upload-above; submit files this large one at a time")
    if len(args.files) == 1:
        response = api.submit(args.files[0], params, args.idempotency_key)
        accepted = parse(Accepted, response)
        return response, [str(accepted.job_id)], partial(render.accepted, dump(accepted))
    response = api.submit_batch(args.files, params, args.idempotency_key)
    batch = parse(BatchAccepted, response)
    return response, [str(job.job_id) for job in batch.jobs], partial(render.batch_accepted, dump(batch))


def status(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.job(args.job_id)
    view = parse(JobView, response)
    out.answer(response.text, lambda: render.job(dump(view)))
    return ExitCode.OK


def list_jobs(api: Api, args: argparse.Namespace, out: Output) -> int:
    names = ("status", "analysis", "batch_id", "created_after", "created_before", "limit", "next")
    params = {name: str(getattr(args, name)) for name in names if getattr(args, name) is not None}
    response = api.jobs(params)
    page = parse(JobPage, response)
    out.answer(response.text, lambda: render.job_page(dump(page)))
    return ExitCode.OK


def cancel(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.cancel(args.job_id)
    view = parse(JobView, response)
    out.answer(response.text, lambda: render.job(dump(view)))
    return ExitCode.OK


def retry(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.retry(args.job_id)
    view = parse(JobView, response)
    out.answer(response.text, lambda: render.job(dump(view)))
    return ExitCode.OK


def batch(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.batch(args.batch_id)
    view = parse(BatchView, response)
    out.answer(response.text, lambda: render.batch(dump(view)))
    return ExitCode.OK


def stats(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.stats()
    body = parse(Stats, response)
    out.answer(response.text, lambda: render.stats(dump(body)))
    return ExitCode.OK


def health(api: Api, args: argparse.Namespace, out: Output) -> int:
    response = api.health()
    body = parse(Health, response)
    out.answer(response.text, lambda: render.health(dump(body)))
    return ExitCode.OK if response.status_code == 200 else ExitCode.UNAVAILABLE


def dlq(api: Api, args: argparse.Namespace, out: Output) -> int:
    if args.dlq_command == "replay":
        request = {k: v for k, v in {"reason": args.reason, "limit": args.limit}.items() if v is not None}
        response = api.replay(request)
        result = parse(ReplayResult, response)
        out.answer(response.text, lambda: render.replayed(dump(result)))
        return ExitCode.OK
    params = {k: str(v) for k, v in {"reason": args.reason, "action": args.action, "limit": args.limit}.items() if v}
    response = api.dead_letters(params)
    page = parse(DeadLetterPage, response)
    out.answer(response.text, lambda: render.dead_letters(dump(page)))
    return ExitCode.OK


def download(api: Api, args: argparse.Namespace, out: Output) -> int:
    view = dump(parse(JobView, api.job(args.job_id)))
    outputs = (view.get("result") or {}).get("outputs") or {}
    if view["status"] != "succeeded" or not outputs:
        out.error(f"job {args.job_id} is {view['status']}: no output files to download")
        return ExitCode.JOB_NOT_SUCCEEDED
    folder: Path = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    for key, url in sorted(outputs.items()):
        name = httpx.URL(url).path.rsplit("/", 1)[-1] or key
        path = folder / (f"{key}-{name}" if any(Path(p).name == name for p in saved.values()) else name)
        path.write_bytes(api.download(url).content)
        saved[key] = str(path)
    text = json.dumps({"job_id": view["job_id"], "files": saved})
    out.answer(text, lambda: render.downloaded(str(view["job_id"]), saved))
    return ExitCode.OK


COMMANDS: dict[str, Callable[[Api, argparse.Namespace, Output], int]] = {
    "submit": submit,
    "status": status,
    "list": list_jobs,
    "cancel": cancel,
    "retry": retry,
    "batch": batch,
    "stats": stats,
    "health": health,
    "dlq": dlq,
    "download": download,
}
