from __future__ import annotations

import pytest

from proxy.sensitive import luhn_valid, secret_kind


@pytest.mark.parametrize(("text", "kind"), [
    ("My OpenAI key is sk-proj-abcdefghijklmnopqrstuvwx1234", "credential"),
    ("aws AKIAIOSFODNN7EXAMPLE for prod", "credential"),
    ("token ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "credential"),
    ("use eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "credential"),
    ("Card 4111 1111 1111 1111 exp 12/29", "card"),
    ("card number 5500-0000-0000-0004", "card"),
    ("User's password is hunter2", "password"),
    ("mon mot de passe est soleil", "password"),
    ("PIN: 1234", "pin-code"),
])
def test_secrets_are_recognised(text: str, kind: str) -> None:
    assert secret_kind(text) == kind


@pytest.mark.parametrize("text", [
    "User is vegetarian",
    "User's phone ends with 1234",
    "User was born in 1987 and has 2 kids",
    "Order number 1234 5678 9012 3456 arrived",  # fails the Luhn check: not a card
    "User forgot their password last week",       # mentions a password, states none
    "User works at sk-tech, a startup",
    "User likes the PINE forest",
])
def test_ordinary_facts_pass(text: str) -> None:
    assert secret_kind(text) is None


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
