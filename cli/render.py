"""Human-readable output (rich): one function per kind of answer, each taking the API's JSON as parsed by its model
and dumped back (``model_dump(mode="json")``), so that they read the same names as the API documents."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "queued": "blue",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "completed": "green",
    "ok": "green",
    "unavailable": "red",
}
FRACTIONS = ("valid_fraction", "cloud_fraction", "clear_fraction", "vegetation_fraction", "water_fraction")
INDEX_COLUMNS = ("mean", "std", "p10", "p50", "p90")
ID_WIDTH = 36  # a UUID, never cut: it is what the next command takes

Json = Mapping[str, Any]


def plain(value: Any) -> Text:
    """A table cell from the API's data: text, never rich markup (``[...]`` stays as it is)."""
    return Text(str(value))


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def accepted(body: Json) -> RenderableType:
    line = Text.assemble("job ", (str(body["job_id"]), "bold"), " ", status_text(str(body["status"])))
    lines: list[RenderableType] = [line, Text(f"  status: {body.get('status_url', '')}")]
    if body.get("webhook_secret"):
        lines.append(Text(f"  webhook secret (shown once): {body['webhook_secret']}"))
    return Group(*lines)


def batch_accepted(body: Json) -> RenderableType:
    table = Table(title=f"batch {body['batch_id']}", title_justify="left")
    table.add_column("job", no_wrap=True, min_width=ID_WIDTH)
    table.add_column("status")
    for job in body.get("jobs", []):
        table.add_row(plain(job["job_id"]), status_text(str(job["status"])))
    extra = [Text(f"webhook secret (shown once): {body['webhook_secret']}")] if body.get("webhook_secret") else []
    return Group(table, *extra)


def job(view: Json) -> RenderableType:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", plain(view["job_id"]))
    table.add_row("status", _status_line(view))
    for key in ("analysis", "priority", "attempts", "retries", "batch_id"):
        if view.get(key) is not None:
            table.add_row(key, plain(view[key]))
    for key in ("created_at", "started_at", "finished_at", "updated_at"):
        if view.get(key):
            table.add_row(key.removesuffix("_at"), plain(view[key]))
    if view.get("progress") and view["status"] == "running":
        table.add_row("progress", progress_text(view["progress"]))
    if view.get("error"):
        table.add_row("error", Text(f"{view['error'].get('code')}: {view['error'].get('message', '')}", style="red"))
    parts: list[RenderableType] = [table]
    if isinstance(view.get("result"), Mapping):
        parts.append(result(view["result"]))
    return Group(*parts)


def _status_line(view: Json) -> Text:
    text = status_text(str(view["status"]))
    if view.get("cancel_requested"):
        text.append(" (cancel requested)", style="yellow")
    return text


def progress_text(progress: Json) -> str:
    fraction = progress.get("fraction")
    shown = f" {fraction:.0%}" if isinstance(fraction, int | float) else ""
    return f"{progress.get('stage', '?')}{shown}"


def result(body: Json) -> RenderableType:
    lines: list[RenderableType] = []
    scene = body.get("scene")
    if isinstance(scene, Mapping):
        lines.append(
            Text(
                f"scene {scene.get('width')} x {scene.get('height')} px, {scene.get('band_count')} bands, "
                f"{scene.get('crs')}, WGS 84 bounds {scene.get('bounds_wgs84')}"
            )
        )
    fractions = [f"{k.removesuffix('_fraction')} {body[k]:.1%}" for k in FRACTIONS if isinstance(body.get(k), float)]
    if fractions:
        lines.append(Text(", ".join(fractions)))
    if isinstance(body.get("cover"), Mapping):
        lines.append(Text("cover " + ", ".join(f"{k} {v:.1%}" for k, v in body["cover"].items())))
    for key, title in (("indices", "indices"), ("indices_clear", "indices over clear pixels")):
        if isinstance(body.get(key), Mapping) and body[key]:
            lines.append(indices(title, body[key]))
    if isinstance(body.get("outputs"), Mapping):
        lines.append(Text("outputs: " + ", ".join(sorted(body["outputs"])) + " (crop-ai download ID DIR)"))
    if body.get("model_version"):
        lines.append(Text(f"model {body['model_version']}", style="dim"))
    return Group(*lines)


def indices(title: str, values: Json) -> Table:
    table = Table("index", *INDEX_COLUMNS, title=title, title_justify="left")
    for name, stats in values.items():
        cells = [_number(stats.get(c)) if isinstance(stats, Mapping) else "-" for c in INDEX_COLUMNS]
        table.add_row(name.upper(), *cells)
    return table


def job_page(page: Json) -> RenderableType:
    table = Table()
    table.add_column("job", no_wrap=True, min_width=ID_WIDTH)
    for name in ("status", "analysis", "priority", "attempts", "created", "error"):
        table.add_column(name)
    for row in page.get("jobs", []):
        table.add_row(
            plain(row["job_id"]),
            status_text(str(row["status"])),
            plain(row.get("analysis") or ""),
            plain(row.get("priority") or ""),
            plain(row.get("attempts", "")),
            short_time(row.get("created_at")),
            plain(row.get("error_code") or ""),
        )
    footer = Text(f"next page: crop-ai list --next {page['next']}" if page.get("next") else "no more jobs")
    return Group(table, footer)


def batch(view: Json) -> RenderableType:
    counts = ", ".join(f"{k} {v}" for k, v in (view.get("counts") or {}).items() if v)
    head = Text.assemble(f"batch {view['batch_id']}: {view.get('size')} jobs, ", status_text(str(view["status"])))
    table = Table()
    table.add_column("job", no_wrap=True, min_width=ID_WIDTH)
    table.add_column("status")
    table.add_column("error")
    for row in view.get("jobs", []):
        table.add_row(plain(row["job_id"]), status_text(str(row["status"])), plain(row.get("error_code") or ""))
    return Group(head, Text(counts), table)


def stats(body: Json) -> RenderableType:
    jobs = Table("status", "jobs", title="jobs", title_justify="left")
    for name, count in (body.get("jobs") or {}).items():
        jobs.add_row(status_text(name), plain(count))
    windows = Table("", "submitted", "succeeded", "failed", "cancelled", title="throughput", title_justify="left")
    for key, label in (("last_5_minutes", "last 5 min"), ("last_60_minutes", "last 60 min")):
        counts = body.get(key) or {}
        windows.add_row(label, *(plain(counts.get(c, "-")) for c in ("submitted", "succeeded", "failed", "cancelled")))
    times = Table("seconds", "p50", "p95", title="latency (last 60 min)", title_justify="left")
    for key, label in (("queue_wait_seconds", "queue wait"), ("run_seconds", "run")):
        values = body.get(key) or {}
        times.add_row(label, _number(values.get("p50")), _number(values.get("p95")))
    oldest = body.get("oldest_queued_age_seconds")
    times.caption = f"oldest queued job: {_number(oldest).strip()} s" if oldest is not None else "no queued job"
    workers = Table(
        "worker", "host", "device", "current job", "last beat", "alive", title="workers", title_justify="left"
    )
    for w in body.get("workers") or []:
        alive = Text("yes", style="green") if w.get("alive") else Text("no", style="red")
        row = [plain(w.get(k) or "") for k in ("worker_id", "host", "device", "current_job", "last_beat")]
        workers.add_row(*row, alive)
    queues = Table("queue", "active", "scheduled", "dead-letter", title="queues", title_justify="left")
    for q in body.get("queues") or []:
        queues.add_row(*(plain(q.get(k, "")) for k in ("name", "active", "scheduled", "dead_letter")))
    if body.get("queues_error"):
        queues.caption = f"queue depths {body['queues_error']}"
    return Group(jobs, windows, times, workers, queues)


def health(body: Json) -> RenderableType:
    table = Table("check", "ok", "latency ms", title=Text.assemble("health: ", status_text(str(body["status"]))))
    for name, check in (body.get("checks") or {}).items():
        ok = Text("ok", style="green") if check.get("ok") else Text("failed", style="red")
        table.add_row(name, ok, _number(check.get("latency_ms")))
    return table


def dead_letters(body: Json) -> RenderableType:
    table = Table("message", "job", "reason", "deliveries", "enqueued", "action", "job status")
    for d in body.get("dead_letters", []):
        keys = ("message_id", "job_id", "reason", "delivery_count", "enqueued_at", "action", "job_status")
        table.add_row(*(plain(d.get(k) if d.get(k) is not None else "") for k in keys))
    return table


def replayed(body: Json) -> RenderableType:
    ids = body.get("replayed") or []
    lines: list[RenderableType] = [Text(f"replayed {len(ids)} job(s), skipped {body.get('skipped', 0)}")]
    lines.extend(Text(f"  {job_id}") for job_id in ids)
    return Group(*lines)


def downloaded(job_id: str, files: Mapping[str, str]) -> RenderableType:
    table = Table(title=f"job {job_id}", title_justify="left")
    table.add_column("output")
    table.add_column("file", overflow="fold")
    for key, path in files.items():
        table.add_row(key, plain(path))
    return table


def short_time(value: Any) -> str:
    """``2025-01-31T12:00:00.123456+00:00`` → ``2025-01-31 12:00:00`` (UTC, as the API writes it)."""
    return str(value)[:19].replace("T", " ") if value else ""


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"
