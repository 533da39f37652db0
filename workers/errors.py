"""The error a stage raises to fail one request with a status for its client."""

from __future__ import annotations


class RequestFailed(Exception):
    """A request cannot be served; `status` and message go to its client."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", resumable: bool = False
    ) -> None:
        """`resumable`: the client may continue the request from the tokens it has (schemas.reply.ErrorReply)."""
        super().__init__(message)
        self.status = status
        self.type = type_
        self.resumable = resumable
