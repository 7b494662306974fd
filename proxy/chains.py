"""Which conversation a Responses API turn belongs to: a `previous_response_id` chain is one conversation.

    name(request, body, chains)   the session of a turn: X-Memory-Session, else `metadata.session_id`, else the
                                  `conversation` (Conversations API), else the chain's; "" for a turn that starts a
                                  chain (it is named by its own response's id once that is known)
    chains.link(response_id, s)   a response made in session `s`: a turn that names it as its previous one is in `s`

The map is bounded (the least recently used links go first, past `capacity`: ~200 bytes each) and lives in one
process. With several workers or instances, a turn whose previous response another process made cannot be
traced to its chain's start: it starts a conversation named by that previous response's id, so one conversation
may be kept as several sessions (each recalled by the others as a past conversation). A client that needs one
name across processes sends X-Memory-Session, `metadata.session_id` or a `conversation`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from starlette.requests import Request

from proxy.sessions import session_id, session_key

CAPACITY = 100_000


class Chains:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._sessions: OrderedDict[str, str] = OrderedDict()  # response id → the session it was made in

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, response_id: str) -> str:
        """The session of the chain `response_id` belongs to; the id itself when this process never saw it."""
        found = self._sessions.get(response_id)
        if found is None:
            return response_id
        self._sessions.move_to_end(response_id)
        return found

    def link(self, response_id: str, session: str) -> None:
        self._sessions[response_id] = session
        self._sessions.move_to_end(response_id)
        while len(self._sessions) > self.capacity:
            self._sessions.popitem(last=False)


def name(request: Request, body: dict[str, Any], chains: Chains) -> str:
    """The session a Responses API turn belongs to ("" when it starts a chain). Only our own header can be
    refused (BadRequest); the API's fields name a session as proxy.sessions.session_key reads them."""
    explicit = session_id(request, body)
    if explicit is not None:
        return explicit
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    named = session_key(conversation)
    if named is not None:
        return named
    previous = body.get("previous_response_id")
    return (session_key(chains.session(previous)) or "") if isinstance(previous, str) and previous else ""
