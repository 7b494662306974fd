"""What must never become a memory (secrets), and what may only as the operator allows (e-mail addresses and
phone numbers).

The model is asked never to write secrets into a <memory> block, but the store cannot trust that: every field of
every memory is checked here before it is written, whatever path it came by (proxy/memories.py `Cleaning`).

    normalise(text)     NFKC, format characters (zero-width, soft hyphen, bidi, BOM) removed, spaces folded:
                        what is matched, so `sk-\u200bproj-…` or fullwidth letters hide nothing
    secret_kind(text)   "credential" | "card" | "password" | "pin-code" | None
    find_contacts(text) the e-mail addresses and phone numbers in a text, for `contact_info = mask | refuse`

Two layers, measured side by side in `python -m bench.secrets` (labelled corpus: bench/secrets_corpus.py):
- Credential formats: the plugins of Yelp's detect-secrets (AWS, GitHub, Slack, Stripe, JWT, private keys,
  basic-auth URLs, Twilio, SendGrid, ...) run on the normalised text, plus the issuers' prefixes it does not
  know yet (OpenAI project keys, Anthropic, Hugging Face, GitLab, ...) and long random tokens.
- What a scanner of source code does not look for, ours: passwords, PINs and door codes stated in prose in a
  dozen phrasings and languages ("tulip-42 is the user's bank password"), card numbers with any separators
  (Luhn-checked), card security codes, AWS secret access keys and other keys named in words.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

# Format characters (Unicode category Cf: zero-width space/joiners, soft hyphen, word joiner, bidi controls,
# BOM, tag characters) and C0/C1 controls: invisible, so they are dropped before matching.
FORMAT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891"
                    "\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
                    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e007f]")


def normalise(text: str) -> str:
    """The text as it is matched: NFKC (fullwidth and compatibility forms folded), format and control
    characters removed, runs of white space as one space."""
    return " ".join(FORMAT.sub("", unicodedata.normalize("NFKC", text)).split())


# --- credential formats ---------------------------------------------------------------------------------------

# detect-secrets plugins left out: entropy scans flag every word of prose, a public IP is no secret, and its
# keyword plugin (`password = "…"` in code) is covered by our own prose rules below, which it would duplicate.
LIBRARY_SKIPPED = frozenset({"Base64 High Entropy String", "Hex High Entropy String", "Public IP (ipv4)"})


@functools.cache
def library_plugins(keyword: bool = False) -> tuple[Any, ...]:
    """detect-secrets' plugin instances (imported on first use: they pull in `requests`)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    skipped = LIBRARY_SKIPPED | ({"Secret Keyword"} if not keyword else set())
    mapping: dict[str, Any] = get_mapping_from_secret_type_to_class()
    return tuple(cls() for kind, cls in sorted(mapping.items()) if kind not in skipped)


def library_finds(text: str, *, keyword: bool = False) -> bool:
    """Whether a detect-secrets plugin finds a secret in `text` (its keyword plugin read as a config file)."""
    from detect_secrets.plugins.keyword import CONFIG_DENYLIST_REGEX_TO_GROUP, KeywordDetector

    for plugin in library_plugins(keyword):
        found = (plugin.analyze_string(text, denylist_regex_to_group=CONFIG_DENYLIST_REGEX_TO_GROUP)
                 if isinstance(plugin, KeywordDetector) else plugin.analyze_string(text))
        if next(iter(found), None) is not None:
            return True
    return False


# Issuers' prefixes detect-secrets 1.5 does not know (or knows only in older shapes).
PREFIXED = re.compile(
    r"\b(?:sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-|or-v1-)?[A-Za-z0-9_\-]{20,}"
    r"|hf_[A-Za-z]{30,}|gsk_[A-Za-z0-9]{40,}|glpat-[A-Za-z0-9_\-]{20,}|github_pat_\w{40,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|dop_v1_[a-f0-9]{64}|shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}|npm_[A-Za-z0-9]{36}|pypi-AgE[A-Za-z0-9_\-]{40,}"
    r"|r8_[A-Za-z0-9]{30,}|ATATT3[A-Za-z0-9_\-=]{30,}|sq0csp-[A-Za-z0-9_\-]{30,}|xox[abposer]-[A-Za-z0-9\-]{10,}"
    r"|AIza[0-9A-Za-z_\-]{35}|(?:sk|rk)_live_[A-Za-z0-9]{20,}|SG\.[\w\-]{16,}\.[\w\-]{16,}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s:/@]*:[^\s:/@]{3,}@", re.IGNORECASE)
# A long run of key characters that mixes upper case, lower case and digits: a random token whatever its issuer.
RANDOM_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_\-])(?=[A-Za-z0-9+/=_\-]*[a-z])(?=[A-Za-z0-9+/=_\-]*[A-Z])"
                          r"(?=[A-Za-z0-9+/=_\-]*\d)[A-Za-z0-9+/=_\-]{32,}")
# A key named in words, then a value that looks generated (16+ key characters with a letter and a digit).
KEY_WORDS = (r"(?:api[ _\-]?key|access[ _\-]?key|secret(?:[ _\-]access)?[ _\-]?key|client[ _\-]?secret|app[ _\-]?secret"
             r"|secret|access[ _\-]?token|auth[ _\-]?token|api[ _\-]?token|token|bearer|authorization|accountkey"
             r"|private[ _\-]?key|credentials?)")
NAMED_KEY = re.compile(KEY_WORDS + r"\b[^\n]{0,40}?[\s:=\"']"
                       r"(?=[A-Za-z0-9+/=_\-]*[0-9])(?=[A-Za-z0-9+/=_\-]*[A-Za-z])[A-Za-z0-9+/=_\-]{16,}",
                       re.IGNORECASE)


def credential_in(text: str) -> bool:
    return bool(PREFIXED.search(text) or PRIVATE_KEY.search(text) or URL_PASSWORD.search(text)
                or RANDOM_TOKEN.search(text) or NAMED_KEY.search(text))


# --- payment cards ----------------------------------------------------------------------------------------------

# 13-19 digits in groups of 1-6, any one separator between groups (space, dash, dot, slash, underscore, middle
# dot, once NFKC has made a no-break space a space): `4111.1111.1111.1111`, `4111/1111/...`, `3782 822463 10005`.
CARD = re.compile(r"(?<![\d.,/\-])[2-6]\d{0,5}(?:(?: ?[ \-./_·] ?)?\d{1,6}){2,7}(?![\d])")
CARD_CODE = re.compile(r"\b(?:cvv2?|cvc2?|cv2|csc|card (?:security|verification) (?:code|value)|security code)\b"
                       r"[^\d\n]{0,40}\b\d{3,4}\b", re.IGNORECASE)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812-1, which every payment card number passes."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_in(text: str) -> bool:
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return True
    return False


# --- passwords and codes stated in prose --------------------------------------------------------------------------

PASSWORD_WORDS = (r"(?:password|passwd|pwd|pw|passphrase|pass ?code|passwort|kennwort|wachtwoord|has[lł]o|senha"
                  r"|contrase[nñ]a|clave|mot de passe|credentials|security (?:answer|question))")
# Nouns that make "password X" a thing about passwords, not a password: "password manager is Bitwarden".
COMPOUNDS = (r"(?:manager|managers|rules?|policy|policies|field|hints?|reset|security|strength|requirements?|length"
             r"|change|protected|app|vault|generator|admin|approach|workshop|course|page|prompt|recovery|expiry|"
             r"hygiene|leak|less|name|names|attempts?|screen|s)")
# Words after "is" that describe a password instead of giving one.
NOT_VALUES = ("a", "an", "the", "not", "never", "no", "none", "easy", "hard", "simple", "strong", "weak", "long",
              "short", "secure", "same", "different", "new", "old", "required", "needed", "wrong", "correct",
              "forgotten", "expired", "changed", "reset", "stored", "saved", "written", "managed", "too", "very",
              "still", "always", "also", "only", "in", "on", "at", "by", "to", "of", "for", "with", "from", "and",
              "or", "but", "it", "this", "that", "what", "which", "who", "how", "where", "when", "there", "here",
              "now", "then", "so", "set", "kept", "private", "secret", "unknown", "lost", "blank", "empty",
              "missing", "encrypted", "hidden", "shared", "available", "one", "something", "anything", "nothing",
              "yours", "mine", "his", "hers", "theirs", "ours", "user", "user's", "my", "your", "her", "their",
              "our", "its")
LINK = (r"(?::=|->|-->|[:=]|(?<!\w)(?:is|was|est|es|ist|é|è|to|c'est|it's|it is|are|sind|set to|changed to|now|"
        r"to be|has been|have been|lautet|will be|becomes|became)(?!\w))")
VALUE = (r"(?!(?:" + "|".join(map(re.escape, NOT_VALUES)) + r")(?:[\s.!?,;]|$))"
         r"(?P<value>\"[^\"]{2,64}\"|'[^']{2,64}'|[^\s\"',;()]{2,64})")
# "<keyword> [for the mail account] is <value>", "<keyword>: <value>", "pass: <value>"
# The words between keyword and link never cross a verb ("password is easy to forget" states none); a colon or an
# equals sign further on still counts ("Password is the dog's name followed by 99: Rex99").
FILLER = r"(?:(?!\s(?:is|was|are|est|es|ist|é|è|lautet|has)\s)[^.:=\n]){0,40}?"
STATED_AFTER = re.compile(rf"\b{PASSWORD_WORDS}\b(?! {COMPOUNDS}\b)(?:{FILLER}\s*{LINK}|[^.:=\n]{{0,60}}?[:=])\s*"
                          rf"(?:now |still )?{VALUE}", re.IGNORECASE)
STATED_PASS = re.compile(rf"\bpass\s*[:=]\s*{VALUE}|\bpass (?P<value2>[^\s\"',;()]*\d[^\s\"',;()]*)", re.IGNORECASE)
# "... and password blue-Moon-77", "the Facebook password (hunter2)", "use password 'tulip-42'": a value right after
# the word, if it has a digit or a symbol (a plain word there is more often the next word of the sentence).
STATED_NEXT = re.compile(rf"\b{PASSWORD_WORDS}\s*[(\"']?\s*[^\s\"',;()]*[\d!@#$%^&*+=?~|<>][^\s\"',;()]*",
                         re.IGNORECASE)
# "uses Lisbon1999 as the password for iCloud"
STATED_AS = re.compile(rf"\b(?:uses?|using|with|chose|picked|has)\s+{VALUE}\s+as\s+"
                       rf"(?:[^\s.]+\s+){{0,3}}?{PASSWORD_WORDS}\b(?! {COMPOUNDS}\b)", re.IGNORECASE)
# "<value> is the user's bank password", "<value> — that's her Gmail password", "<value> es la contraseña"
STATED_BEFORE = re.compile(rf"(?<![^\s\"'(]){VALUE}\s*(?:,|—|-|\u2013)?\s+(?:is|was|es|est|ist|é|è|that's|"
                           rf"c'est)\s+(?:[^\s.]+\s+){{0,4}}?{PASSWORD_WORDS}\b(?! {COMPOUNDS}\b)", re.IGNORECASE)
# Keys and codes that unlock something, named in words: "the Wi-Fi key is 8F3K-29LM-QQ71", "backup codes: 8271-6252"
UNLOCK_KEY = re.compile(r"\b(?:wi-?fi|wlan|network|wpa2?|licen[cs]e|product|recovery|backup|activation|encryption"
                        r"|bitlocker|2fa|mfa|one-time|otp|totp|seed)\s+(?:key|keys|code|codes|phrase|secret)\b"
                        rf"[^.\n]{{0,20}}?(?:{LINK}|\s)\s*(?=[^\s,;]*\d)[A-Za-z0-9][A-Za-z0-9\-]{{3,}}", re.IGNORECASE)
CODE_WORDS = (r"(?:pin(?:[ \-]?(?:code|number|nummer))?|puk(?: code)?|code pin|geheimzahl|(?:door|alarm|garage|gate"
              r"|entry|unlock|access|building|entrance|lock ?screen|safe|locker|padlock|voicemail|atm|t[üu]r|tor)"
              r"(?: [a-z]+){0,2} ?code|code (?:to|for|of|de|du|des|d'|für) ?[\w' ]{0,30}"
              r"|c[oó]digo (?:de|del) [\w ]{0,30}|combination(?: of the [a-z]+| lock)?|passcode)")
# Digits (a trailing # for a keypad), digits in groups ("84-21-09"), or a short code mixing digits and letters.
CODE_VALUE = r"(?P<code>\d{3,10}#?|\d{1,3}(?:[\-/ ]\d{1,3}){2,4}|(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{3,10})"
# "PIN 4821", "PIN: 4821", "the door code is 4821#", "code PIN de la carte : 4821", "unlocks it with PIN 4821"
CODE_STATED = re.compile(rf"\b{CODE_WORDS}\b(?:\s*[:=#]?\s*|(?:[^.:=\n\d]{{0,40}}?)\s*(?:{LINK}|:)\s*){CODE_VALUE}"
                         rf"(?![\d])", re.IGNORECASE)
CODE_BEFORE = re.compile(r"(?<![\d\-/])\d{3,10}\s+(?:is|was|es|est|ist)\s+(?:[^\s.]+\s+){0,3}?"
                         r"(?:pin|puk|passcode|geheimzahl)\b", re.IGNORECASE)


# "login: admin / Qwerty!234", "creds: bob@mail.com / Netfl1x!": a user name, a slash, a secret-looking value.
LOGIN_PAIR = re.compile(r"\b(?:login|log-?in|creds|credentials)\b[^/\n]{0,20}?[:=]?\s*[^\s/]{1,64}\s*/\s*"
                        r"(?:password\s*)?[^\s\"',;()]*[\d!@#$%^&*+=?~|][^\s\"',;()]*", re.IGNORECASE)
# The key of a named Wi-Fi network: "wifi at grandma's: network Casa, key ola12345"
NETWORK_KEY = re.compile(r"\b(?:wi-?fi|wlan|wpa2?|router)\b[^.\n]{0,40}?\b(?:key|password|pass|pw|code)\b\s*[:=]?\s*"
                         r"(?=[^\s,;]*\d)[^\s,;]{4,64}", re.IGNORECASE)
# A wallet's recovery (BIP-39 seed) phrase: twelve or more lower-case words after its name.
SEED_PHRASE = re.compile(r"\b(?:recovery|seed|mnemonic|backup|secret|wallet)\s+(?:phrase|words)\b\s*[:=]?\s*"
                         r"(?:[a-z]{3,8}[ ,]+){11,23}[a-z]{3,8}\b", re.IGNORECASE)


KEYWORD = re.compile(rf"\b{PASSWORD_WORDS}\b", re.IGNORECASE)


def stated_password(text: str) -> bool:
    # The patterns built around a password word are the costly ones: tried only when such a word is there.
    keyed = (STATED_AFTER, STATED_BEFORE, STATED_AS, STATED_NEXT) if KEYWORD.search(text) else ()
    return any(pattern.search(text) for pattern in (*keyed, STATED_PASS, UNLOCK_KEY, LOGIN_PAIR, NETWORK_KEY,
                                                    SEED_PHRASE))


def stated_code(text: str) -> bool:
    return bool(CODE_STATED.search(text) or CODE_BEFORE.search(text) or CARD_CODE.search(text))


# --- the detector -------------------------------------------------------------------------------------------------

CHECKS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("credential", credential_in), ("credential", library_finds), ("card", card_in),
    ("password", stated_password), ("pin-code", stated_code),
)


def secret_kind(text: str) -> str | None:
    """What kind of secret `text` holds ("credential", "card", "password", "pin-code"), or None. The text is
    normalised first; costs 0.1-0.2 ms for a memory-sized text on a 2-core machine (`python -m bench.secrets`)."""
    folded = normalise(text)
    if not folded:
        return None
    for kind, check in CHECKS:
        if check(folded):
            return kind
    return None


# --- contact details ------------------------------------------------------------------------------------------

EMAIL = re.compile(r"(?<![\w.+\-])[A-Za-z0-9][\w.+\-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}\.)+[A-Za-z]{2,24}\b")
CONTACT_KINDS = ("email", "phone")


def find_contacts(text: str, region: str = "US") -> Iterator[tuple[int, int, str]]:
    """(start, end, "email" | "phone") of each e-mail address and valid phone number in `text`, in order. Phone
    numbers are found by Google's libphonenumber (the `phonenumbers` port); one written without a country code is
    read as a number of `region` (ISO 3166-1 alpha-2)."""
    import phonenumbers

    found = [(m.start(), m.end(), "email") for m in EMAIL.finditer(text)]
    found += [(m.start, m.end, "phone") for m in phonenumbers.PhoneNumberMatcher(text, region)]
    taken = -1
    for start, end, kind in sorted(found):
        if start >= taken:  # an address's digits are never a phone number too
            taken = end
            yield start, end, kind


def mask_contacts(text: str, region: str = "US") -> tuple[str, int]:
    """The text with each e-mail address as `[email]` and each phone number as `[phone]`, and how many."""
    parts, last, count = [], 0, 0
    for start, end, kind in find_contacts(text, region):
        parts += [text[last:start], f"[{kind}]"]
        last, count = end, count + 1
    return "".join(parts) + text[last:], count
