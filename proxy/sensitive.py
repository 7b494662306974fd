"""Obvious secrets never become memories: API keys and tokens, payment card numbers, stated passwords.

The model is asked never to write secrets into a <memory> block, but the store cannot trust that: every text
is checked here before it is written, whatever path it came by. The patterns aim at few false positives; a
memory dropped for looking like a secret is logged by the caller, without the text.
"""

from __future__ import annotations

import re

TOKEN_PATTERNS = [
    r"\bsk-(?:proj-|ant-|or-)?[A-Za-z0-9_\-]{16,}",     # OpenAI, Anthropic, OpenRouter keys
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",                    # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",                     # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{30,}",
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",                  # Slack tokens
    r"\bAIza[0-9A-Za-z_\-]{35}\b",                       # Google API keys
    r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",    # Stripe keys
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWTs
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\b[Bb]earer\s+[A-Za-z0-9_\-\.=]{20,}",
]
PASSWORD = re.compile(
    r"\b(?:password|passwd|passcode|passphrase|pin|mot de passe|contraseña|senha|passwort|kennwort)\b"
    r"\s*(?:is|was|=|:|est|es|é|ist)\s*\S+", re.IGNORECASE)
TOKENS = re.compile("|".join(TOKEN_PATTERNS))
CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def secret_kind(text: str) -> str | None:
    """What kind of secret the text holds ("token", "card", "password"), or None."""
    if TOKENS.search(text):
        return "token"
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "card"
    if PASSWORD.search(text):
        return "password"
    return None
