"""Requests no worker could finish: JetStream gave up redelivering them; their clients hear why.

A message that crashed its worker `max_deliver` times triggers JetStream's
max-deliveries advisory. We answer its client with an error and delete it, so
an accepted request is never dropped silently.
"""

from __future__ import annotations

import json
import logging

import nats
from epd.core import subjects
from epd.core.runtime import Runtime
from epd.schemas.reply import ErrorReply

log = logging.getLogger(__name__)
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*"


async def watch_dead_letters(rt: Runtime, streams: list[str] | None = None) -> None:
    """Subscribe (queue group: one gateway answers) to the advisories of our stage streams."""
    for stream in streams or list(subjects.STREAMS):
        await rt.nc.subscribe(ADVISORY.format(stream=stream), queue="epd-dead-letters", cb=_handler(rt))


def _handler(rt: Runtime):  # noqa: ANN202
    async def on_advisory(msg: nats.aio.msg.Msg) -> None:
        try:
            event = json.loads(msg.data)
            stream, seq, deliveries = event["stream"], int(event["stream_seq"]), event.get("deliveries", 0)
            stored = await rt.js.get_msg(stream, seq)
        except (ValueError, KeyError, nats.errors.Error) as e:
            log.warning("max-deliveries advisory not handled: %s", e)
            return
        headers = stored.headers or {}
        request_id = headers.get(subjects.REQUEST_ID_HEADER, "")
        log.error("request %s failed %s deliveries on %s; answering its client", request_id, deliveries, stream)
        message = f"request {request_id} could not be processed: its worker failed {deliveries} times"
        await rt.reply(
            headers.get(subjects.REPLY_HEADER, ""),
            ErrorReply(request_id=request_id, status=503, message=message, type="server_error"),
        )
        await rt.js.delete_msg(stream, seq)

    return on_advisory
