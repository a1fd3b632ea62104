"""A local Azure Functions host for the HTTP triggers of a v2-model ``FunctionApp``.

Functions Core Tools cannot be installed offline, so ``python -m local.functions_host --app function_app:app`` serves
the app's HTTP functions the way the Functions host does: routes from each function's ``httpTrigger`` binding under
the route prefix from ``host.json`` (``extensions.http.routePrefix``, default ``api``), route constraints
(``{id:guid}``, ``{n:int}``, optional ``{x?}``, catch-all ``{*rest}``), the 100 MB request body limit
(``FUNCTIONS_REQUEST_BODY_SIZE_LIMIT`` overrides), and, like Core Tools, function keys not enforced unless
``FUNCTIONS_HOST_ENFORCE_KEYS=true`` (then ``FUNCTIONS_HOST_KEY`` via ``?code=`` or ``x-functions-key``).

Modules: ``routes`` (the route table), ``invoke`` (HttpRequest in, HttpResponse out), ``server`` (the HTTP server).
"""

from local.functions_host.routes import Route, RouteTable, load_route_prefix
from local.functions_host.server import FunctionsHost, HostConfig

__all__ = ["FunctionsHost", "HostConfig", "Route", "RouteTable", "load_route_prefix"]
