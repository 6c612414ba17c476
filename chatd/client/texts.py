"""What the client itself says to the person, shared by both front ends."""

from __future__ import annotations

from chatd.client.session import Closed, ConnectionLost, Event, Reconnected


def status_text(event: Event) -> str | None:
    """The client's own words for a session event, or None when it needs none.

    These are about the connection, not the room, so pipe mode writes them to
    stderr and a bot reading stdout sees only what people and the server said.
    """
    if isinstance(event, ConnectionLost):
        return "connection lost, retrying…"
    if isinstance(event, Reconnected):
        return f"reconnected as {event.name}"
    if isinstance(event, Closed) and event.by_server:
        if event.reason:
            return f"the server ended the session: {event.reason}"
        return "the server ended the session"
    return None
