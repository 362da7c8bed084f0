"""``ServiceError``: the HTTP status the API answers with and a sentence the pages show as it is."""
from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")
