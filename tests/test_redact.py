"""Redaction before traces are written (framework/redact.py): property tests over generated PII."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.errors import SpecError
from framework.redact import Redactor, luhn_ok
from framework.spec import RedactPattern, TracingSpec

DEFAULT = Redactor(TracingSpec())
words = st.text(alphabet="abcdefghij klmnop,.!?", max_size=40)


def luhn_complete(prefix: str) -> str:
    for check in "0123456789":
        if luhn_ok(prefix + check):
            return prefix + check
    raise AssertionError


cards = st.builds(luhn_complete, st.from_regex(r"[3-6][0-9]{14}", fullmatch=True))
emails = st.from_regex(r"[a-z][a-z0-9._+-]{0,15}@[a-z][a-z0-9-]{0,10}\.(com|org|co\.uk|io)", fullmatch=True)


def grouped(card: str, sep: str) -> str:
    return sep.join(card[i:i + 4] for i in range(0, len(card), 4)) if sep else card


@settings(max_examples=200)
@given(before=words, after=words, card=cards, sep=st.sampled_from(["", " ", "-"]))
def test_card_numbers_never_survive(before, after, card, sep):
    counts: dict[str, int] = {}
    out = DEFAULT.text(f"{before} {grouped(card, sep)} {after}", counts)
    assert card not in out.replace(" ", "").replace("-", "")
    assert counts.get("card", 0) + counts.get("phone", 0) >= 1


@settings(max_examples=200)
@given(before=words, after=words, email=emails)
def test_emails_never_survive(before, after, email):
    counts: dict[str, int] = {}
    out = DEFAULT.text(f"{before} <{email}> {after}", counts)
    assert email not in out and "[EMAIL]" in out and counts["email"] == 1


@pytest.mark.parametrize("phone", ["+1 415 555 0132", "(415) 555-0132", "+44 20 7946 0958", "06 12 34 56 78",
                                   "+49-30-901820"])
def test_phone_numbers_are_redacted(phone):
    counts: dict[str, int] = {}
    assert DEFAULT.text(f"call me on {phone} please", counts) == "call me on [PHONE] please"


@pytest.mark.parametrize("text", ["order 12345 failed", "error code 500 at 10:42", "invoice INV-2024-0042",
                                  "version 1.4.39", "4111 1111 1111 1112 is not a card (Luhn)"])
def test_ordinary_numbers_are_kept(text):
    counts: dict[str, int] = {}
    out = DEFAULT.text(text, counts)
    assert "[CARD]" not in out and "[EMAIL]" not in out


def test_nested_values_and_counts():
    counts: dict[str, int] = {}
    value = [{"role": "user", "content": "a@b.com and c@d.org, card 4111 1111 1111 1111"}]
    out = DEFAULT.value(value, counts)
    assert out == [{"role": "user", "content": "[EMAIL] and [EMAIL], card [CARD]"}]
    assert counts == {"email": 2, "card": 1}


def test_redaction_can_be_turned_off_and_extended():
    counts: dict[str, int] = {}
    spec = TracingSpec(redact=[], redact_patterns=[RedactPattern(name="account", regex=r"ACC-\d{6}")])
    out = Redactor(spec).text("a@b.com ACC-123456", counts)
    assert out == "a@b.com [ACCOUNT]" and counts == {"account": 1}


def test_a_hook_runs_last_and_a_missing_one_names_the_field():
    spec = TracingSpec(redact_hook="string:capwords")
    assert Redactor(spec).text("mail a@b.com now", {}) == "Mail [email] Now"
    with pytest.raises(SpecError, match="tracing.redact_hook"):
        Redactor(TracingSpec(redact_hook="nowhere.at_all:f"))


def test_a_bad_pattern_is_a_spec_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RedactPattern(name="x", regex="(")


@settings(max_examples=300)
@given(card=cards, sep=st.sampled_from([" ", "-", "  "]), before=st.from_regex(r"[0-9]{1,4}", fullmatch=True),
       after=st.from_regex(r"[0-9]{1,4}", fullmatch=True), where=st.sampled_from(["before", "after", "both"]))
def test_a_card_next_to_an_expiry_cvv_or_order_number_is_still_redacted(card, sep, before, after, where):
    """Digit groups beside the card ("4111 1111 1111 1111 123", "order 2024 4111…") must not hide it."""
    text = grouped(card, sep)
    if where in ("before", "both"):
        text = f"{before} {text}"
    if where in ("after", "both"):
        text = f"{text} {after}"
    out = DEFAULT.text(f"paid with {text} yesterday", {})
    assert card not in "".join(ch for ch in out if ch.isdigit())
