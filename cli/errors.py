"""Exit codes and the errors that end a command with one of them.

CliError                 a command cannot do what was asked (exit_code says which kind)
├── ProblemResponse      the API answered a problem+json (4xx: 3, 5xx: 4)
├── Unreachable          no answer from the API (connection refused, timeout): 5
├── UnexpectedResponse   an answer that is not the API's (not JSON, not the documented shape): 5
└── UploadFailed         storage refused a direct upload's block or block list (an expired SAS...): 4
"""

from __future__ import annotations

import enum
from typing import Any

from shared.openapi import Problem


class ExitCode(enum.IntEnum):
    OK = 0
    JOB_NOT_SUCCEEDED = 1  # --wait: a job ended failed or cancelled
    USAGE = 2  # a bad command line (argparse exits 2 too), a file that is not there
    REJECTED = 3  # the API refused the request (a 4xx problem: bad input, unknown job, conflict, 429)
    UNAVAILABLE = 4  # the API or a backend behind it failed (a 5xx problem: 503 with Retry-After, 500)
    UNREACHABLE = 5  # no usable answer: connection refused, timeout, or a body that is not the API's
    WAIT_TIMEOUT = 6  # --wait: the jobs were not finished within --timeout
    INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    exit_code = ExitCode.UNREACHABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProblemResponse(CliError):
    """A problem+json answer (RFC 9457); ``body`` is the API's JSON exactly as it came."""

    def __init__(self, problem: Problem, body: str) -> None:
        super().__init__(f"{problem.status} {problem.code}: {problem.detail}")
        self.problem = problem
        self.body = body
        self.exit_code = ExitCode.REJECTED if problem.status < 500 else ExitCode.UNAVAILABLE

    @property
    def extra(self) -> dict[str, Any]:
        """Members beyond the RFC's and ``code`` (``job_id``, ``index``, ...)."""
        return dict(self.problem.model_extra or {})


class UsageError(CliError):
    exit_code = ExitCode.USAGE


class Unreachable(CliError):
    exit_code = ExitCode.UNREACHABLE


class UnexpectedResponse(CliError):
    exit_code = ExitCode.UNREACHABLE


class UploadFailed(CliError):
    """Storage refused a direct upload (``cli.upload``)."""

    exit_code = ExitCode.UNAVAILABLE
