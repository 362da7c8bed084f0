"""What the application layer raises when a request cannot be carried out; the web maps these to
404 and 409, the CLI to exit status 1."""
from __future__ import annotations


class NotFound(LookupError):
    """The row named does not exist; the sentence names it."""


class Conflict(Exception):
    """The row is in a state that does not allow the change; the sentence says which and why."""
