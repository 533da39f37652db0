"""The error a stage raises to fail one request with a status for its client."""

from __future__ import annotations


class RequestFailed(Exception):
    """A request cannot be served; `status` and message go to its client."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
