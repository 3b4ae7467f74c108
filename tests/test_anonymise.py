"""PII scrubbing: realistic and adversarial strings, and ordinary numbers that must survive."""

from __future__ import annotations

import pytest

from tasks.anonymise import (
    CARD,
    EMAIL,
    IBAN,
    PHONE,
    URL,
    iban_like,
    iban_valid,
    luhn_valid,
    scrub_pii,
)

#: (text, what scrub_pii makes of it), by the kind of PII in the text
SCRUBBED: dict[str, list[tuple[str, str]]] = {
    "email": [
        ("email me at john.doe+test@example.co.uk please", f"email me at {EMAIL} please"),
        ("ANNA_O'NEIL@Mail.Example.ORG.", f"ANNA_O'{EMAIL}."),
        ("reply to a@b.io,thanks", f"reply to {EMAIL},thanks"),
        ("<bob.smith@corp-mail.com>", f"<{EMAIL}>"),
        ("écrivez à marie.curie@université.fr", f"écrivez à {EMAIL}"),
        ("mail: ανδρέας@example.gr", f"mail: {EMAIL}"),
    ],
    "phone": [
        ("call +44 20 7946 0958 now", f"call {PHONE} now"),
        ("+1-415-555-2671", PHONE),
        ("(+49) 30 1234567", PHONE),
        ("my number is (555) 123-4567.", f"my number is {PHONE}."),
        ("555.123.4567 or 555-123-4567", f"{PHONE} or {PHONE}"),
        ("1 415 555 2671", PHONE),
        ("4155552671", PHONE),
        ("06 12 34 56 78", PHONE),
        ("020 7946 0958", PHONE),
        ("0171 1234567", PHONE),
        ("07700 900123", PHONE),
        ("0049 30 1234567", PHONE),
        ("in 2024 call 020 7946 0958 now", f"in 2024 call {PHONE} now"),
        ("tel:+33612345678", f"tel:{PHONE}"),
        ("Ruf an: +49 (0)30 1234567!", f"Ruf an: {PHONE}!"),
        ("tel. 030/1234567", f"tel. {PHONE}"),
        ("appel 06.12.34.56.78", f"appel {PHONE}"),
    ],
    "card": [
        ("my card is 4111 1111 1111 1111 thanks", f"my card is {CARD} thanks"),
        ("5500-0000-0000-0004", CARD),
        ("4012888888881881", CARD),
        ("amex 3782 822463 10005", f"amex {CARD}"),
        # Luhn fails: not a card (and not a phone shape either).
        ("4111-1111-1111-1112", "4111-1111-1111-1112"),
        ("0000 0000 0000 0000", "0000 0000 0000 0000"),
    ],
    "url": [
        ("see https://example.com/a?b=c. ok", f"see {URL}. ok"),
        ("(http://foo.bar/x)", f"({URL})"),
        ("HTTPS://user:pw@host.example.com/path", URL),
        ("www.foo.org, then", f"{URL}, then"),
        ("docs.python.org/3/library/re.html", URL),
        ("go to shop.example.com:8080/cart!", f"go to {URL}!"),
        ("ftp://files.example.net/pub", URL),
    ],
    "iban": [
        ("IBAN DE89 3704 0044 0532 0130 00", f"IBAN {IBAN}"),
        ("GB82WEST12345698765432.", f"{IBAN}."),
        ("fr14 2004 1010 0505 0001 3m02 606", IBAN),
        ("NO9386011117947", IBAN),
        # Mistyped check digits, but a German IBAN by country, length and digits: still scrubbed.
        ("DE89 3704 0044 0532 0130 01", IBAN),
    ],
}


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [(kind, text, expected) for kind, cases in SCRUBBED.items() for text, expected in cases],
)
def test_pii_is_replaced_by_its_placeholder(kind: str, text: str, expected: str) -> None:
    assert scrub_pii(text) == expected, kind


def test_checksums() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert not iban_valid("DE89 3704 0044 0532 0130 01")
    assert not iban_valid("DE89 3704 0044 0532 0130 0")  # wrong length for DE
    assert iban_like("DE89 3704 0044 0532 0130 01")
    # A random token in IBAN shape: bad checksum and mostly letters, left alone.
    assert not iban_like("AB12CDEFGHIJKLMNOP")
    assert scrub_pii("token AB12CDEFGHIJKLMNOP here") == "token AB12CDEFGHIJKLMNOP here"


@pytest.mark.parametrize(
    "text",
    [
        "meeting at 3",
        "room 1204",
        "call me at 5pm",
        "order 66",
        "it is 2025",
        "due 12/03/2024",
        "at 10:30",
        "costs $1,299.99",
        "upgrade to v2.3.1",
        "code 4821",
        "PIN 1234 and zip 90210",
        "on 01.02.2023 10:30 and 2024-03-12 14:00",
        "am 01.02.2023 10 Uhr",
        "on 01/02/2023 10 people",
        "timestamp 2024-03-12T10:30:00Z",
        "lat 52.520008 lon 13.404954",
        "Summe 1.299,99 EUR",
        "pi is 3.14159265358979",
        "1 000 000 people",
        "between 1990-2025",
        "ip 192.168.0.1",
        "flight BA2490 seat 14C",
        "file.py and e.g. foo.bar",
        "score 3-2, 7 of 10, 100%",
        "ticket #123456",
        "transfer 250 EUR to savings",
        "what is 12 * 34 + 5678",
        "",
    ],
)
def test_ordinary_numbers_and_text_are_kept(text: str) -> None:
    assert scrub_pii(text) == text


def test_mixed_message_keeps_surrounding_words() -> None:
    text = (
        "Hi, I'm at room 1204 at 10:30; email jane@corp.com or call +1 (415) 555-2671, "
        "refund $1,299.99 to DE89370400440532013000 via https://pay.example.com/x?id=7"
    )
    assert scrub_pii(text) == (
        f"Hi, I'm at room 1204 at 10:30; email {EMAIL} or call {PHONE}, "
        f"refund $1,299.99 to {IBAN} via {URL}"
    )


@pytest.mark.parametrize(
    "chunk",
    [
        "a",
        "a@",
        "a.",
        "1 ",
        "1",
        "1-",
        "(1",
        "+1 ",
        "DE89",
        "a@a.",
        "www.",
        "1.2.",
        "a-",
        "0",
        "é",
        "1/",
        "0 ",
    ],
)
def test_adversarial_inputs_finish_and_keep_length(chunk: str) -> None:
    """100k-character strings built to trigger backtracking; each pattern is linear by
    construction, so these return at once (no timing assertion: a quadratic pattern hangs)."""
    text = chunk * (100_000 // len(chunk))
    scrubbed = scrub_pii(text + " x@y.com")
    assert scrubbed.endswith(f" {EMAIL}")
    assert len(scrubbed) <= len(text) + len(EMAIL) + 1


def test_long_benign_text_is_unchanged() -> None:
    text = "order 66 room 1204 at 10:30 for $1,299.99 " * 2_000
    assert scrub_pii(text) == text


def test_placeholders_are_stable_under_rescrubbing() -> None:
    once = scrub_pii("mail a@b.com, call +44 20 7946 0958, card 4111 1111 1111 1111")
    assert scrub_pii(once) == once
