"""A function's trigger binding, as the v2 programming model declares it (``function.json``'s ``bindings``), and the
app settings a binding names: ``%NAME%`` references and ``AzureWebJobs.<function>.Disabled``, matched as the host
matches them (exactly first, then ignoring case, as .NET configuration does)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_SETTING = re.compile(r"%([^%]*)%")


class UnresolvedSetting(ValueError):
    """A ``%NAME%`` expression that cannot be resolved: ``name`` is the missing setting (``None``: an unpaired %)."""

    def __init__(self, expression: str, name: str | None) -> None:
        super().__init__(expression if name is None else f"{expression}: {name}")
        self.expression = expression
        self.name = name


def trigger_binding(function: Any, binding_type: str) -> dict[str, Any] | None:
    """The binding of type ``binding_type`` (``httpTrigger``, ``timerTrigger``) of a v2 function, or ``None``."""
    for raw in function.get_raw_bindings():
        binding = json.loads(raw)
        if binding.get("type") == binding_type:
            return dict(binding)
    return None


def app_setting(environ: Mapping[str, str], name: str) -> str | None:
    """The setting ``name``, matched exactly first, then ignoring case."""
    if name in environ:
        return environ[name]
    return next((value for key, value in environ.items() if key.lower() == name.lower()), None)


def resolve_app_settings(expression: str, environ: Mapping[str, str]) -> str:
    """``expression`` with each ``%NAME%`` replaced by the app setting ``NAME``; :class:`UnresolvedSetting` if one is
    not set or a '%' is unpaired."""
    if expression.count("%") % 2:
        raise UnresolvedSetting(expression, None)

    def setting(found: re.Match[str]) -> str:
        value = app_setting(environ, found[1])
        if value is None:
            raise UnresolvedSetting(expression, found[1])
        return value

    return _SETTING.sub(setting, expression)


def is_disabled(function_name: str, environ: Mapping[str, str]) -> bool:
    """``AzureWebJobs.<function>.Disabled`` (or the Linux spelling with ``_``) is ``true`` or ``1``."""
    for name in (f"AzureWebJobs.{function_name}.Disabled", f"AzureWebJobs_{function_name}_Disabled"):
        if (app_setting(environ, name) or "").lower() in ("1", "true"):
            return True
    return False
