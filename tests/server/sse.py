"""A small Server-Sent Events reader for the tests (the parsing rules of the HTML standard)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import httpx

__all__ = ["Event", "events"]


@attrs.frozen
class Event:
    """One dispatched event, or a comment line (``comment`` set, nothing else).

    ``last_id`` is the stream's last event id when the event was dispatched, as a browser's
    ``EventSource.lastEventId`` would hold it.
    """

    event: str = ""
    data: str = ""
    last_id: str = ""
    has_id: bool = False
    comment: str | None = None


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events (and comments) of a streaming ``text/event-stream`` response."""
    last_id = ""
    kind, has_id = "", False
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield Event(comment=line[1:].strip())
            continue
        if not line:
            if data:
                yield Event(event=kind, data="\n".join(data), last_id=last_id, has_id=has_id)
            kind, data, has_id = "", [], False
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            last_id, has_id = value, True
