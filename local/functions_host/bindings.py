"""A function's trigger binding, as the v2 programming model declares it (``function.json``'s ``bindings``)."""

from __future__ import annotations

import json
from typing import Any


def trigger_binding(function: Any, binding_type: str) -> dict[str, Any] | None:
    """The binding of type ``binding_type`` (``httpTrigger``, ``timerTrigger``) of a v2 function, or ``None``."""
    for raw in function.get_raw_bindings():
        binding = json.loads(raw)
        if binding.get("type") == binding_type:
            return dict(binding)
    return None
