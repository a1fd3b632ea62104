"""``GET /api/jobs``: the query's filters and their refusals, the cursor, keyset pages over the in-memory store, and
the function's answer."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import azure.functions as func
import pytest

from functions import deps
from shared.errors import DatabaseUnavailable
from shared.jobs import Job, JobFilter, JobStatus
from shared.listing import DEFAULT_LIMIT, ListQuery, decode_cursor, encode_cursor, list_jobs, parse_query
from shared.rejection import Rejected
from shared.settings import Settings
from tests.fakes import InMemoryJobStore, unit_deps
from tests.functions_client import BASE, body, function
from tests.jobs import claimed, job_record, new_job

T0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


def refused(params: dict[str, str]) -> Rejected:
    with pytest.raises(Rejected) as info:
        parse_query(params)
    return info.value


def test_no_parameter_lists_everything_a_default_page_at_a_time() -> None:
    assert parse_query({}) == ListQuery(JobFilter(), DEFAULT_LIMIT)


def test_every_filter() -> None:
    batch_id = uuid.uuid4()
    query = parse_query(
        {"status": "failed", "analysis": "model:crops", "created_after": "2025-01-31T12:00:00Z",
         "created_before": "2025-01-31T14:00:00+02:00", "batch_id": str(batch_id), "limit": "1000",
         "code": "the-function-key", "unknown": "ignored"}
    )  # fmt: skip
    assert query == ListQuery(
        JobFilter(
            status=JobStatus.FAILED, analysis="model:crops", created_after=T0,
            created_before=datetime(2025, 1, 31, 14, 0, tzinfo=timezone(timedelta(hours=2))), batch_id=batch_id,
        ),
        1000,
    )  # fmt: skip


def test_an_unencoded_plus_in_an_offset_is_understood() -> None:
    # ?created_after=2025-01-31T13:00:00+01:00 typed into a URL: the "+" arrives as a space.
    assert parse_query({"created_after": "2025-01-31T13:00:00 01:00"}).where.created_after == T0


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"status": "done"}, "status"),
        ({"status": ""}, "status"),
        ({"analysis": ""}, "analysis"),
        ({"analysis": "x" * 201}, "analysis"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "2025-01-31T12:00:00"}, "created_after"),  # no offset: which time is it?
        ({"created_before": "2025-13-01T00:00:00Z"}, "created_before"),
        ({"batch_id": "nope"}, "batch_id"),
        ({"batch_id": uuid.UUID(int=1).hex}, "batch_id"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"limit": "1_0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"),
    ],
)
def test_a_bad_filter_is_refused_naming_its_parameter(params: dict[str, str], named: str) -> None:
    problem = refused(params)
    assert problem.code == "invalid_filter"
    assert problem.detail.startswith(named)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "ü",
        "a" * 500,
        _b64(b"not json"),
        _b64(b"\xff\xfe"),
        _b64(b"{}"),
        _b64(b"[1, 2]"),
        _b64(b'["2025-01-31T12:00:00+00:00"]'),
        _b64(b'["2025-01-31T12:00:00", "' + str(uuid.UUID(int=1)).encode() + b'"]'),  # no offset
        _b64(b'["yesterday", "' + str(uuid.UUID(int=1)).encode() + b'"]'),
        _b64(b'["2025-01-31T12:00:00+00:00", "not a uuid"]'),
        _b64(b'["2025-01-31T12:00:00+00:00", "' + str(uuid.UUID(int=1)).encode() + b'", 3]'),
    ],
)
def test_anything_but_a_cursor_of_ours_is_an_invalid_cursor(cursor: str) -> None:
    assert refused({"next": cursor}).code == "invalid_cursor"


def test_a_cursor_carries_the_last_rows_key_and_is_url_safe() -> None:
    job = job_record(JobStatus.QUEUED, created_at=datetime(2025, 1, 31, 12, 0, 0, 999999, tzinfo=UTC))
    cursor = encode_cursor(job)
    assert cursor.isascii()
    assert not set(cursor) & set("+/=&?#% ")
    assert json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))) == [
        "2025-01-31T12:00:00.999999+00:00",
        str(job.job_id),
    ]
    assert decode_cursor(cursor) == (job.created_at, job.job_id)
    assert parse_query({"next": cursor}).where.after == (job.created_at, job.job_id)


def _jobs(n: int) -> tuple[InMemoryJobStore, list[Job]]:
    """``n`` jobs, some at the same instant (the job id breaks the tie), newest first."""
    store = InMemoryJobStore()
    made = [new_job(store) for _ in range(n)]
    for i, job in enumerate(made):  # pairs share a created_at
        store._jobs[job.job_id] = job.model_copy(update={"created_at": T0 + timedelta(seconds=i // 2)})
    return store, sorted(store._jobs.values(), key=lambda j: (j.created_at, j.job_id), reverse=True)


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 11])
def test_pages_cover_every_job_once_in_order(limit: int) -> None:
    store, expected = _jobs(11)
    seen, params = [], {"limit": str(limit)}
    while True:
        page = list_jobs(store, parse_query(params))
        assert len(page.jobs) <= limit
        seen += [summary.job_id for summary in page.jobs]
        if page.next is None:
            break
        params["next"] = page.next
    assert seen == [job.job_id for job in expected]


def test_the_last_full_page_says_there_is_no_next() -> None:
    store, _ = _jobs(4)
    page = list_jobs(store, parse_query({"limit": "4"}))
    assert (len(page.jobs), page.next) == (4, None)


def test_a_new_job_does_not_shift_the_next_page() -> None:
    store, expected = _jobs(6)
    first = list_jobs(store, parse_query({"limit": "3"}))
    newest = new_job(store)  # created now, after every other: it belongs on page one, which was already read
    assert newest.created_at > T0
    second = list_jobs(store, parse_query({"limit": "3", "next": first.next or ""}))
    assert [s.job_id for s in first.jobs + second.jobs] == [j.job_id for j in expected]


def test_filters_apply_on_every_page() -> None:
    store, _ = _jobs(8)
    running = [claimed(store, job) for job in list(store._jobs.values())[::2]]
    seen, params = [], {"status": "running", "limit": "3"}
    while True:
        page = list_jobs(store, parse_query(params))
        seen += page.jobs
        if page.next is None:
            break
        params["next"] = page.next
    assert {s.job_id for s in seen} == {j.job_id for j in running}
    assert {s.status for s in seen} == {JobStatus.RUNNING}


@pytest.fixture
def store() -> Iterator[InMemoryJobStore]:
    jobs = InMemoryJobStore()
    settings = Settings.from_env({"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x"})
    deps.use(
        unit_deps(settings, jobs=jobs)
    )  # fmt: skip
    yield jobs
    deps.use(None)


def get_jobs(params: dict[str, str]) -> func.HttpResponse:
    req = func.HttpRequest("GET", f"{BASE}/jobs", params=params, body=b"")
    response: func.HttpResponse = function("list_jobs")(req)
    return response


def test_the_function_answers_a_page(store: InMemoryJobStore) -> None:
    jobs = [new_job(store) for _ in range(3)]
    response = get_jobs({"limit": "2"})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    page = body(response)
    assert set(page) == {"jobs", "next"}
    assert [j["job_id"] for j in page["jobs"]] == [str(j.job_id) for j in jobs[::-1][:2]]
    rest = body(get_jobs({"limit": "2", "next": page["next"]}))
    assert ([j["job_id"] for j in rest["jobs"]], rest["next"]) == ([str(jobs[0].job_id)], None)


@pytest.mark.parametrize(
    ("params", "code"), [({"status": "nope"}, "invalid_filter"), ({"next": "garbage"}, "invalid_cursor")]
)
def test_the_function_refuses_with_a_problem(store: InMemoryJobStore, params: dict[str, str], code: str) -> None:
    response = get_jobs(params)
    assert (response.status_code, response.mimetype) == (400, "application/problem+json")
    assert body(response)["code"] == code


def test_the_function_answers_503_while_the_database_is_down(store: InMemoryJobStore) -> None:
    store.failure = DatabaseUnavailable("psycopg.OperationalError: connection to 10.0.0.4 refused")
    response = get_jobs({})
    assert response.status_code == 503
    assert body(response)["code"] == "database_unavailable"
    assert "10.0.0.4" not in response.get_body().decode()
