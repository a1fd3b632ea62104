"""A request the API refuses because of the client: the one exception the submit and status use cases raise for it.

``code`` is the stable machine-readable name (``functions/problems.py`` maps it to an HTTP status and a title);
``detail`` says what was wrong in words a person can act on. Server-side failures are never ``Rejected``: they are
the :mod:`shared.errors` hierarchy.
"""

from __future__ import annotations


class Rejected(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
