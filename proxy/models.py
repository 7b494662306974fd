"""The shared nouns: what a memory is, what a search returns, what a write asks for."""

from __future__ import annotations

import os
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

# Between tenant and user in the store's user id; a control character, so no valid id can contain it.
TENANT_SEPARATOR = "\x1f"
# Every memory is one of these. A category reaches the prompt, so it is never free text: see `category_of`.
# `profile` memories are injected into every request of the user, ahead of the recalled ones (the user's name,
# the language they want answers in, a strong allergy), within profile_max / profile_max_chars; `event` memories
# are dated happenings (`happened_at`).
CATEGORIES = ("fact", "preference", "context", "event", "profile")
PROFILE = "profile"
DEFAULT_CATEGORY = "fact"
# The plural and near names models and import files use, mapped to the fixed set. "profile" is reached only by
# its own name: it makes a memory always injected, which a stray label must not do.
CATEGORY_ALIASES = {
    "facts": "fact", "info": "fact", "information": "fact", "personal": "fact", "biography": "fact",
    "preferences": "preference", "pref": "preference", "prefs": "preference", "like": "preference",
    "likes": "preference", "dislike": "preference", "dislikes": "preference", "taste": "preference",
    "contexts": "context", "situation": "context", "background": "context",
    "events": "event", "plan": "event", "plans": "event", "appointment": "event", "schedule": "event",
    "profiles": "profile",
}
MAX_CATEGORY_INPUT = 64  # longer labels are not looked up at all: they map to the default


def category_of(value: object) -> str:
    """The category a memory is stored (and shown) under, always one of CATEGORIES.

    A string is NFKC-normalised, case-folded and stripped of spaces, `-` and `_` at its ends; then it is taken
    if it names a category, mapped if it is a known alias (`"Preferences"` → `"preference"`, `"likes"` →
    `"preference"`, `"appointment"` → `"event"`), and anything else — a missing, non-string, unknown, over-long
    or multi-line label — becomes `"fact"`. Never raises."""
    if not isinstance(value, str) or len(value) > MAX_CATEGORY_INPUT:
        return DEFAULT_CATEGORY
    label = unicodedata.normalize("NFKC", value).casefold().strip(" \t-_")
    if label in CATEGORIES:
        return label
    return CATEGORY_ALIASES.get(label, DEFAULT_CATEGORY)


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
    category: str = DEFAULT_CATEGORY
    source: str = "api"
    ttl_seconds: float | None = None
    replaces: str | None = None
    happened_at: str | None = None  # ISO 8601 date or date-time, as precise as the user said it
    keep_category: bool = False  # no category was given: a near-duplicate it updates keeps its own


@dataclass(frozen=True, slots=True)
class Forget:
    """An instruction to remove one memory of the user."""

    id: str


Operation = NewMemory | Forget


MAX_USER_ID = 256


def whole_number(text: str, low: int = 0, high: int | None = None) -> int | None:
    """`text` as a whole number written in ASCII digits from `low` to `high` (no bound: None), else None.
    str.isdigit admits "²" (which int() refuses) and other scripts' digits (which it takes)."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if low <= value and (high is None or value <= high) else None


PARTIAL_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2}))?")


def happened_at(value: Any) -> str | None:
    """`value` as a `happened_at`: an ISO 8601 date or date-time as precise as the user said it ("2024",
    "2024-05", "2024-05-12", "2024-05-12T18:30", with an offset or Z), normalised; None when it is none of them."""
    if not isinstance(value, str) or not value.isascii() or not 4 <= len(value.strip()) <= 40:
        return None  # ASCII: Python's own parsers take other scripts' digits
    text: str = value.strip()
    partial = PARTIAL_DATE.fullmatch(text)
    if partial:
        year, month = int(partial.group(1)), partial.group(2)
        if year < 1 or (month is not None and not 1 <= int(month) <= 12):
            return None
        return text
    try:
        if "T" not in text and " " not in text:  # a day ("20240512", "2024-W01-1" too), never a time it lacks
            return date.fromisoformat(text).isoformat()
        return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()
    except ValueError:
        return None


# Characters that change how an id reads, not what it is: Unicode's format characters (category Cf: the byte order
# mark, zero-width spaces, soft hyphens, and the bidirectional embeddings, overrides, isolates and marks that "Trojan
# Source", CVE-2021-42574, abuses to show one id as another) and the line and paragraph separators (Zl, Zp: a log
# line or a terminal breaks on them). Kept: the zero-width non-joiner and joiner (U+200C, U+200D), which Persian
# and emoji sequences need, and the tag characters of flag emoji (U+E0020-E007F). Unicode 15.1's list; a test
# (tests/test_user_ids.py) checks it against the running Python's Unicode database. Added: the other characters
# Unicode says to ignore when shown (Default_Ignorable_Code_Point) that no text needs in an id: the combining
# grapheme joiner U+034F, the Hangul fillers U+115F, U+1160, U+3164, U+FFA0, the Khmer inherent vowels U+17B4-5,
# and the code points it keeps for more of them (U+2065, U+FFF0-FFF8, U+E0000-E0FFF but the tags and selectors).
INVISIBLE_RANGES = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD),
                    (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x115F, 0x1160), (0x17B4, 0x17B5),
                    (0x180E, 0x180E), (0x200B, 0x200B), (0x200E, 0x200F), (0x2028, 0x202E), (0x2060, 0x206F),
                    (0x3164, 0x3164), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFFB),
                    (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3),
                    (0x1D173, 0x1D17A), (0xE0000, 0xE001F), (0xE0080, 0xE00FF), (0xE01F0, 0xE0FFF))


def char_class(ranges: Sequence[tuple[int, int]], escape: Callable[[int], str]) -> str:
    """The inside of a regular expression's [...] for `ranges` (inclusive code point pairs), each written
    with `escape`."""
    return "".join(escape(low) if low == high else f"{escape(low)}-{escape(high)}" for low, high in ranges)


INVISIBLE = re.compile("[" + char_class(INVISIBLE_RANGES, lambda point: f"\\U{point:08x}") + "]")
# What is kept of the invisible kinds shows nothing on its own, so it is kept only where it belongs, one at a time: a
# joiner between two non-ASCII characters that are not spaces (a Persian word, an emoji sequence), a variation
# selector (emoji's, Mongolian's, the ideographic ones) after such a character or in a keycap ("1\ufe0f\u20e3"),
# tag characters inside an emoji flag (U+1F3F4, tags, CANCEL TAG).
JOINER = "\u200c\u200d"
SELECTOR = "\ufe00-\ufe0f\u180b-\u180d\u180f\U000e0100-\U000e01ef"
STRAY_JOINER = re.compile(
    f"(?:^|[\\x00-\\x7f\\s])[{JOINER}]|[{JOINER}](?:$|[\\x00-\\x7f\\s])|[{JOINER}]{{2,}}|[{SELECTOR}]{{2,}}"
    f"|(?:^|\\s)[{SELECTOR}]|(?<=[\\x00-\\x7f])(?<![#*0-9])[{SELECTOR}]|[#*0-9][{SELECTOR}](?!\\u20e3)")
FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
TAG = re.compile("[\U000e0020-\U000e007f]")
KEPT = re.compile(f"[{JOINER}{SELECTOR}\U000e0020-\U000e007f]")
BLANK = re.compile(f"[\\s\u2800{JOINER}{SELECTOR}\\U000e0020-\\U000e007f]*")  # U+2800: the braille blank


def check_name(name: str, noun: str = "user id") -> str | None:
    """Why `name` cannot name a user, session or tenant, or None: non-empty, at most 256 characters, no control
    characters (they would forge log lines and break headers) and no lone surrogates (what bytes that are not
    UTF-8 become when a percent-encoded path or an argument is decoded). Any other character is fine, `/`, `%`
    and `..` included: in a URL the id is one percent-encoded path segment (proxy/routing.py). What an earlier
    release stored stays reachable under this rule: it reads, exports and erases users; check_user_id is the
    stricter rule for ids memories are newly filed under."""
    if not name:
        return f"the {noun} is empty"
    if len(name) > MAX_USER_ID:
        return f"the {noun} is longer than {MAX_USER_ID} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return f"the {noun} contains control characters"
    if not is_unicode(name):
        return f"the {noun} is not valid UTF-8"
    return None


def check_user_id(user: str, noun: str = "user id") -> str | None:
    """Why memories cannot be filed under the user id `user`, or None: check_name, and no id that shows as
    another: none of the INVISIBLE format characters and line breaks, joiners, variation selectors and flag tags
    only where they belong (STRAY_JOINER, FLAG), something visible, and no whitespace at either end."""
    problem = check_name(user, noun)
    if problem:
        return problem
    invisible = INVISIBLE.search(user)
    if invisible is not None:
        return (f"the {noun} contains U+{ord(invisible.group()):04X}, an invisible format character or line break "
                "(it would show the id as another)")
    stray = STRAY_JOINER.search(user) or TAG.search(FLAG.sub("", user))
    if stray is not None:
        point = next(c for c in stray.group() if KEPT.match(c))
        return (f"the {noun} contains U+{ord(point):04X}, a joiner, variation selector or tag character where it "
                "joins nothing (it would show the id as another)")
    if BLANK.fullmatch(user):
        return f"the {noun} has no visible character"
    if user != user.strip():
        return f"the {noun} starts or ends with whitespace (it would show the id as another)"
    return None


def is_unicode(text: str) -> bool:
    """No lone surrogates: the text can be stored and sent as UTF-8."""
    return not any("\ud800" <= c <= "\udfff" for c in text)
