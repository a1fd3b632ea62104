"""The ``$cbs`` node: claims-based security. The emulator accepts every token, as Microsoft's emulator does."""

from __future__ import annotations

from typing import Any

__all__ = ["handle"]


def handle(operation: Any) -> tuple[int, str]:
    """Return (status-code, status-description) for a CBS request."""
    if operation == b"put-token":
        return 202, "Accepted"
    return 400, f"Unsupported CBS operation {operation!r}."
