"""The shared nouns: what a memory is, what a search returns, what a write asks for."""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

# Between tenant and user in the store's user id; a control character, so no valid id can contain it.
TENANT_SEPARATOR = "\x1f"
# What a memory can be. `profile` memories are injected into every request of the user, ahead of the recalled
# ones (the user's name, the language they want answers in, a strong allergy), within profile_k / profile_max_chars.
CATEGORIES = ("fact", "preference", "context", "event", "profile")
PROFILE = "profile"


def new_id() -> str:
    """A 20-hex-digit id that sorts by creation time (ms), then at random.

    Sortable ids give newest-first listing and stable cursors without a second index.
    """
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(4).hex()}"


@dataclass(frozen=True, slots=True)
class Memory:
    id: str
    user: str
    text: str
    category: str
    source: str
    created_at: float
    updated_at: float
    expires_at: float | None = None
    supersedes: str | None = None
    superseded_by: str | None = None
    # When it happened, as the user said it (ISO 8601, as precise as said: "2024", "2024-05", "2024-05-12").
    happened_at: str | None = None
    # When it stopped being current: the moment a newer memory replaced it (history keeps [created_at, valid_until)).
    valid_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As the API shows it: the user without the tenant namespace the store files it under."""
        return {**asdict(self), "user": self.user.rpartition(TENANT_SEPARATOR)[2]}

    @property
    def active(self) -> bool:
        """Recallable: not replaced by a newer memory and not expired."""
        return self.superseded_by is None and (self.expires_at is None or self.expires_at > time.time())


@dataclass(frozen=True, slots=True)
class Hit:
    memory: Memory
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.memory.to_dict(), "score": round(self.score, 6)}


@dataclass(frozen=True, slots=True)
class NewMemory:
    """A memory to write. `replaces` names an older memory of the same user that this one supersedes."""

    text: str
    category: str = "fact"
    source: str = "api"
    ttl_seconds: float | None = None
    replaces: str | None = None
    happened_at: str | None = None  # ISO 8601 date or date-time, as precise as the user said it


@dataclass(frozen=True, slots=True)
class Forget:
    """An instruction to remove one memory of the user."""

    id: str


Operation = NewMemory | Forget


MAX_USER_ID = 256
PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?")


def happened_at(value: Any) -> str | None:
    """`value` as a `happened_at`: an ISO 8601 date or date-time as precise as the user said it ("2024",
    "2024-05", "2024-05-12", "2024-05-12T18:30", with an offset or Z), normalised; None when it is none of them."""
    if not isinstance(value, str) or not 4 <= len(value.strip()) <= 40:
        return None
    text: str = value.strip()
    partial = PARTIAL_DATE.fullmatch(text)
    if partial:
        year, month = int(partial.group(1)), partial.group(2)
        if year < 1 or (month is not None and not 1 <= int(month) <= 12):
            return None
        return text
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return None


def check_user_id(user: str) -> str | None:
    """Why a user id is unacceptable, or None when it is fine: non-empty, at most 256 characters, and no control
    characters (they would forge log lines and break headers)."""
    if not user:
        return "the user id is empty"
    if len(user) > MAX_USER_ID:
        return f"the user id is longer than {MAX_USER_ID} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in user):
        return "the user id contains control characters"
    return None
