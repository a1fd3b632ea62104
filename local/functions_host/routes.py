"""The route table: each HTTP-triggered function's route template compiled to a regular expression.

Templates follow ASP.NET Core routing as the Functions host uses it: literal segments match case-insensitively,
``{name}`` matches one segment, ``{name:constraint}`` adds a constraint, ``{name?}`` is optional and ``{*name}``
takes the rest of the path. Matched values become ``route_params``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from local.functions_host.bindings import trigger_binding

DEFAULT_ROUTE_PREFIX = "api"
ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"})

_CONSTRAINTS = {
    "guid": r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}|\{[0-9a-fA-F-]{36}\}",
    "int": r"-?\d+",
    "long": r"-?\d+",
    "alpha": r"[A-Za-z]+",
    "bool": r"(?i:true|false)",
    "decimal": r"-?\d+(?:\.\d+)?",
    "double": r"-?\d+(?:\.\d+)?",
    "float": r"-?\d+(?:\.\d+)?",
}
_PARAM = re.compile(r"^\{(?P<star>\*{1,2})?(?P<name>\w+)(?::(?P<constraint>[A-Za-z]+))?(?P<optional>\?)?\}$")


class RouteError(ValueError):
    """A route template this host does not understand."""


@dataclass(frozen=True)
class Route:
    function_name: str
    template: str
    methods: frozenset[str]
    auth_level: str
    binding_name: str
    user_function: Callable[..., Any]
    pattern: re.Pattern[str]

    def match(self, path: str) -> dict[str, str] | None:
        """Route parameters when ``path`` (below the route prefix, no leading slash) matches, else None."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {k: unquote(v) for k, v in found.groupdict().items() if v is not None}


def compile_template(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    for segment in template.strip("/").split("/"):
        param = _PARAM.match(segment)
        if param is None:
            if "{" in segment or "}" in segment:
                raise RouteError(f"unsupported route segment {segment!r} in {template!r}")
            parts.append("/" + re.escape(segment))
            continue
        name, constraint = param["name"], param["constraint"]
        if param["star"]:
            parts.append(f"(?:/(?P<{name}>.*))?")
            continue
        if constraint is not None and constraint.lower() not in _CONSTRAINTS:
            raise RouteError(f"unsupported route constraint {constraint!r} in {template!r}")
        value = _CONSTRAINTS[constraint.lower()] if constraint else r"[^/]+"
        group = f"/(?P<{name}>{value})"
        parts.append(f"(?:{group})?" if param["optional"] else group)
    return re.compile("".join(parts).removeprefix("/") if parts else "", re.IGNORECASE)


def routes_of(app: Any) -> list[Route]:
    """The HTTP-triggered functions of a v2 ``FunctionApp`` (other triggers are ignored)."""
    routes = []
    for function in app.get_functions():
        trigger = trigger_binding(function, "httpTrigger")
        if trigger is None:
            continue
        name = function.get_function_name()
        template = (trigger.get("route") or name).strip("/")
        methods = frozenset(m.upper() for m in trigger.get("methods") or ALL_METHODS)
        routes.append(
            Route(
                function_name=name,
                template=template,
                methods=methods,
                auth_level=str(trigger.get("authLevel", "FUNCTION")).lower(),
                binding_name=trigger.get("name", "req"),
                user_function=function.get_user_function(),
                pattern=compile_template(template),
            )
        )
    return routes


class RouteTable:
    def __init__(self, routes: Iterable[Route], prefix: str = DEFAULT_ROUTE_PREFIX) -> None:
        # Literal routes before parameterised ones, as ASP.NET routing prefers the more specific template.
        self.routes = sorted(routes, key=lambda r: (r.template.count("{"), -len(r.template)))
        self.prefix = prefix.strip("/")

    def resolve(self, path: str, method: str) -> tuple[Route, dict[str, str]] | None:
        """The route for ``path`` (the full URL path) and ``method``, with its parameters; None when nothing fits."""
        rest = path.strip("/")
        if self.prefix:
            head, _, rest = rest.partition("/")
            if head.lower() != self.prefix.lower():
                return None
        for route in self.routes:
            params = route.match(rest)
            if params is not None and method.upper() in route.methods:
                return route, params
        return None


def _http_options(host_json: Path) -> Mapping[str, Any]:
    if not host_json.exists():
        return {}
    config: Mapping[str, Any] = json.loads(host_json.read_text(encoding="utf-8"))
    return dict(config.get("extensions", {}).get("http", {}))


def load_route_prefix(host_json: Path) -> str:
    """``extensions.http.routePrefix`` from ``host.json``; ``api`` when the file or the setting is absent."""
    return str(_http_options(host_json).get("routePrefix", DEFAULT_ROUTE_PREFIX))


def load_max_outstanding_requests(host_json: Path) -> int | None:
    """``extensions.http.maxOutstandingRequests`` from ``host.json``; None (unbounded, as in the host) when the file
    or the setting is absent or -1."""
    limit = int(_http_options(host_json).get("maxOutstandingRequests", -1))
    return None if limit < 0 else limit
