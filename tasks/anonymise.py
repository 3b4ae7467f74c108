"""PII scrubbing for the anonymised training store: ``scrub_pii(text) -> str``.

Emails, phone numbers, card numbers, URLs and IBANs become typed placeholders (``<EMAIL>``,
``<PHONE>``, ``<CARD>``, ``<URL>``, ``<IBAN>``). Ordinary numbers ("room 1204", "order 66",
"2025", "12/03/2024", "10:30", "$1,299.99", "v2.3.1") stay as they are.

Every pattern is built to run in linear time on hostile input: each candidate may only *start*
at the beginning of a run (a negative lookbehind on the run's own characters), the repeated
parts are separated by characters the repeated class cannot contain, and the remaining
repetitions are bounded. A candidate is then validated in Python (Luhn for cards, ISO 13616
mod-97 for IBANs, digit counts and shapes for phone numbers) so the regexes can stay simple.
"""

from __future__ import annotations

import logging
import re
from typing import Final

logger = logging.getLogger(__name__)

EMAIL: Final = "<EMAIL>"
PHONE: Final = "<PHONE>"
CARD: Final = "<CARD>"
URL: Final = "<URL>"
IBAN: Final = "<IBAN>"
PLACEHOLDERS: Final = (EMAIL, PHONE, CARD, URL, IBAN)

_TRAILING_PUNCT = ".,;:!?'\")]}"

# URLs with a scheme (may contain '@', so they go before emails).
_URL_SCHEME_RE = re.compile(r"(?<![\w])(?:https?|ftp)://[^\s<>\"'`]+", re.IGNORECASE | re.ASCII)
# Emails: the local part may only start where its run starts, so a long run is scanned once.
# Unicode-aware (internationalised addresses: marie@université.fr).
_EMAIL_RE = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]+@[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}",
)
# Scheme-less URLs: www.<anything> or a host ending in a common top-level domain.
_TLDS = (
    "com|org|net|edu|gov|io|co|ai|app|dev|info|biz|me|uk|de|fr|es|it|nl|eu|us|ca|au|ch|at|be|"
    "se|no|dk|fi|pl|pt|ie|jp|cn|in|br|ru"
)
_URL_BARE_RE = re.compile(
    r"(?<![\w.@/\-])(?:www\.[^\s<>\"'`]+|"
    r"(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+(?:" + _TLDS + r")(?![\w\-])"
    r"(?::[0-9]{1,5})?(?:/[^\s<>\"'`]*)?)",
    re.IGNORECASE | re.ASCII,
)
# IBAN: country code, check digits, 11-30 alphanumerics, optionally in groups of four.
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?"
    r"(?![A-Za-z0-9])",
    re.ASCII,
)
# Card-like: 13-19 digits, single spaces or dashes allowed between digits.
_CARD_RE = re.compile(r"(?<![0-9+])[0-9](?:[ \-]?[0-9]){12,18}(?![0-9])", re.ASCII)
# Phone candidates: 7-17 digits joined by short runs of separators; validated in Python.
_PHONE_CANDIDATE_RE = re.compile(
    r"(?<![\w+.\-])(?:\+ ?|\(\+?)?[0-9](?:[ ()./\-]{0,3}[0-9]){6,16}\)?(?![\w:])",
    re.ASCII,
)
_PHONE_GROUP_RE = re.compile(r"(?:\+ ?|\(\+?)?[0-9]+\)?", re.ASCII)
_NANP_SEPARATED_RE = re.compile(
    r"(?:1[ .\-]?)?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .\-]?)[0-9]{3}[ .\-][0-9]{4}", re.ASCII
)
_NANP_BARE_RE = re.compile(r"1?[2-9][0-9]{2}[2-9][0-9]{6}", re.ASCII)
_NON_DIGIT_RE = re.compile(r"[^0-9]", re.ASCII)
_DATE_RE = re.compile(
    r"(?<![0-9])[0-9]{1,2}([./\-])[0-9]{1,2}\1(?:19|20)[0-9]{2}(?![0-9])", re.ASCII
)


def _trim_url(match: re.Match[str]) -> str:
    """Replace a URL, keeping sentence punctuation that follows it outside the placeholder."""
    value = match.group(0)
    stripped = value.rstrip(_TRAILING_PUNCT)
    return URL + value[len(stripped) :]


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn checksum."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


# IBAN lengths of the countries most likely to appear (ISO 13616 registry).
IBAN_LENGTHS: Final = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28,
    "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
    "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TR": 26,
}  # fmt: skip


def iban_valid(candidate: str) -> bool:
    """True when ``candidate`` (spaces allowed) is a well-formed IBAN with a valid mod-97 check."""
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    remainder = 0
    for char in compact[4:] + compact[:4]:
        value = int(char, 36)  # 0-9 -> 0-9, A-Z -> 10-35 (ISO 13616)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return remainder == 1


def iban_like(candidate: str) -> bool:
    """True for a valid IBAN, and for a mistyped one: a known country code, that country's
    length, and a mostly numeric account part (so random tokens and codes are left alone)."""
    if iban_valid(candidate):
        return True
    compact = candidate.replace(" ", "").upper()
    bban = compact[4:]
    return IBAN_LENGTHS.get(compact[:2]) == len(compact) and sum(
        char.isdigit() for char in bban
    ) * 2 >= len(bban)


def _replace_iban(match: re.Match[str]) -> str:
    value = match.group(0)
    return IBAN if iban_like(value) else value


def _replace_card(match: re.Match[str]) -> str:
    value = match.group(0)
    digits = _NON_DIGIT_RE.sub("", value)
    # Issuer numbers never start with 0 (that is a trunk/international phone prefix), and a run of
    # one repeated digit is a placeholder, not a card.
    if digits[0] != "0" and len(set(digits)) > 1 and luhn_valid(digits):
        return CARD
    return value


def is_phone_number(text: str) -> bool:
    """True when ``text`` (one candidate span) has the shape of a phone number.

    International (``+`` or ``00`` prefix, 8-15 digits after it), North American (``(415)
    555-2671``, ``415-555-2671``, ``1 415 555 2671``, bare valid ten digits) or national with a
    trunk ``0`` (``020 7946 0958``, ``06 12 34 56 78``, ``0171 1234567``: 9-11 digits).
    """
    digits = _NON_DIGIT_RE.sub("", text)
    count = len(digits)
    # Country codes never start with 0.
    if text.startswith(("+", "(+")):
        return 8 <= count <= 15 and digits[0] != "0"
    if digits.startswith("00"):
        return text.startswith("00") and 10 <= count <= 17 and digits[2] != "0"
    if _NANP_SEPARATED_RE.fullmatch(text) or _NANP_BARE_RE.fullmatch(text):
        return True
    # A trunk-0 national number, but not a date with a time or count after it ("01.02.2023 10").
    return text.startswith(("0", "(0")) and 9 <= count <= 11 and not _DATE_RE.search(text)


def _replace_phone(match: re.Match[str]) -> str:
    """Replace the phone numbers inside one candidate span.

    The candidate may glue a phone to neighbouring numbers ("in 2024 call 020 7946 0958" gives
    "2024 020 7946 0958"), so the longest valid run of whole digit groups is taken from left to
    right. A candidate has at most 17 groups, so this is bounded work per candidate.
    """
    value = match.group(0)
    if is_phone_number(value):
        return PHONE
    groups = [(g.start(), g.end()) for g in _PHONE_GROUP_RE.finditer(value)]
    # digits_before[k]: digits in groups[:k], to skip runs too short or long to be a phone.
    digits_before = [0]
    for start, end in groups:
        digits_before.append(digits_before[-1] + sum(c.isdigit() for c in value[start:end]))
    pieces: list[str] = []
    cursor = 0
    i = 0
    while i < len(groups):
        found = 0
        for j in range(len(groups), i, -1):
            if not 8 <= digits_before[j] - digits_before[i] <= 17:
                continue
            if is_phone_number(value[groups[i][0] : groups[j - 1][1]]):
                found = j
                break
        if found:
            pieces.append(value[cursor : groups[i][0]])
            pieces.append(PHONE)
            cursor = groups[found - 1][1]
            i = found
        else:
            i += 1
    pieces.append(value[cursor:])
    return "".join(pieces)


def scrub_pii(text: str) -> str:
    """Return ``text`` with emails, URLs, IBANs, card numbers and phone numbers replaced.

    Placeholders: ``<EMAIL>``, ``<URL>``, ``<IBAN>``, ``<CARD>``, ``<PHONE>``. Runs in time
    linear in ``len(text)``.
    """
    if not text:
        return text
    text = _URL_SCHEME_RE.sub(_trim_url, text)
    text = _EMAIL_RE.sub(EMAIL, text)
    text = _URL_BARE_RE.sub(_trim_url, text)
    text = _IBAN_RE.sub(_replace_iban, text)
    text = _CARD_RE.sub(_replace_card, text)
    return _PHONE_CANDIDATE_RE.sub(_replace_phone, text)
