"""What a stage sends: jobs to other stages, replies and errors to clients. Stages hold an `Outbox`, not a NATS
connection, so a stage runs in a unit test with a fake one (a list of what it sent)."""

from __future__ import annotations

from typing import Protocol

import msgspec
from epd.core.runtime import Runtime
from epd.schemas.reply import ErrorReply, TokenChunk


class Outbox(Protocol):
    async def publish(self, subject: str, msg: msgspec.Struct, request_id: str, reply_to: str, stage: str) -> None:
        """A job to a stage's queue, stored once this returns; `stage` names it for de-duplication
        (`request_id:stage`: a redelivered handler's second publish is dropped)."""

    async def reply(self, reply_to: str, msg: TokenChunk) -> None:
        """One chunk to the client (none if `reply_to` is empty)."""

    async def error(self, reply_to: str, msg: ErrorReply) -> None:
        """The request's error reply to the client."""


class RuntimeOutbox:
    """The Outbox over a worker's NATS runtime: jobs into JetStream, replies and errors on core NATS."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def publish(self, subject: str, msg: msgspec.Struct, request_id: str, reply_to: str, stage: str) -> None:
        await self.rt.publish(subject, msg, request_id, reply_to, stage)

    async def reply(self, reply_to: str, msg: TokenChunk) -> None:
        await self.rt.reply(reply_to, msg)

    async def error(self, reply_to: str, msg: ErrorReply) -> None:
        await self.rt.reply(reply_to, msg)
