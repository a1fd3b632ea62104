"""``crop-ai``: the entry point (``[project.scripts]``). Parses the command line, runs the command, turns an error
into a message on stderr and its exit code (listed in ``crop-ai --help`` and :class:`cli.errors.ExitCode`)."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import httpx
from rich.console import Console

from cli.api import Api
from cli.args import build_parser
from cli.commands import COMMANDS, Output
from cli.errors import CliError, ExitCode, ProblemResponse


def main(
    argv: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    out: Output | None = None,  # tests: consoles writing to buffers
    transport: httpx.BaseTransport | None = None,  # tests: an in-process API
) -> int:
    args = build_parser(environ).parse_args(argv)
    out = out or Output(json=False, out=Console(), err=Console(stderr=True))
    out.json = args.json
    try:
        with Api(args.api_url, args.function_key, transport=transport) as api:
            return int(COMMANDS[args.command](api, args, out))
    except ProblemResponse as e:
        if args.json:
            out.out.file.write(e.body.strip() + "\n")
        extra = "".join(f", {k} {v}" for k, v in e.extra.items())
        out.error(f"{e.problem.status} {e.problem.code}: {e.problem.detail}{extra}")
        return int(e.exit_code)
    except CliError as e:
        out.error(e.message)
        return int(e.exit_code)
    except KeyboardInterrupt:
        out.error("interrupted")
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
