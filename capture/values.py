"""Value helpers shared by every reader and writer of ``nlu_prompt_logs``: clocks and time
windows, float4 rounding, the one UUID parser, text checks, the runners-up JSON shape.

Conventions:

- Time windows are a ``since: datetime | None`` parameter (``created_at > since``), computed by
  the caller from an injectable clock with :func:`since_days` ("last N days" = ``now - N days``).
  ``since`` must be timezone-aware; it is converted to UTC before binding, because SQLite stores
  timestamps as naive UTC strings and compares them as text.
- Datetimes read back (:func:`from_db_datetime`) are always timezone-aware UTC, on both databases.
- ``confidence`` is a PostgreSQL ``REAL`` (float4). :func:`as_real` rounds a value to float4 the
  same way, and every writer stores ``as_real(confidence)`` so that SQLite holds exactly the
  value PostgreSQL holds (and the statistics agree bit for bit). Reads return
  :func:`from_real` (the shortest decimal of the float4: 0.92, as PostgreSQL prints it).
- ``secondary_intents`` is a JSON list of ``{"intent": str, "confidence": float}`` objects, best
  first (:func:`secondary_intents_json` builds it; :func:`parse_secondary_intents` reads it back).
- Text: every text value goes through :mod:`capture.text` (the one owner of text hygiene):
  free text by :func:`non_empty_text` / :func:`optional_text` (``clean_text``/``clean_notes``),
  intent names by ``check_intent_name``; :func:`truncate_text` cuts a stored prompt without
  splitting a character (grapheme cluster).
- Every check raises ``ValueError`` naming the field, what was expected and what was found.
"""

from __future__ import annotations

import json
import logging
import struct
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from capture.text import check_intent_name, clean_notes, clean_text
from capture.types import check_confidence

logger = logging.getLogger(__name__)

#: The longest window a ``days`` parameter may ask for (100 years; ``None`` means no window).
MAX_WINDOW_DAYS = 36_500
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# --------------------------------------------------------------------------- time helpers


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def to_utc(value: datetime, field: str = "datetime") -> datetime:
    """``value`` converted to UTC; naive datetimes are refused (their zone is unknown)."""
    if not isinstance(value, datetime):
        raise ValueError(f"{field}: expected a timezone-aware datetime, found {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field}: expected a timezone-aware datetime, found the naive {value.isoformat()}; "
            "pass e.g. datetime.now(UTC)"
        )
    return value.astimezone(UTC)


def since_days(now: datetime, days: float | None) -> datetime | None:
    """The start of a "last ``days`` days" window ending at ``now`` (``None``: no window)."""
    if days is None:
        return None
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not 0 < days <= MAX_WINDOW_DAYS
    ):
        raise ValueError(
            f"days: expected a number of days in (0, {MAX_WINDOW_DAYS}] or None, found {days!r}"
        )
    return to_utc(now, "now") - timedelta(days=days)


def from_db_datetime(value: datetime | str | None) -> datetime | None:
    """A datetime read back from either database, as timezone-aware UTC.

    SQLite returns naive datetimes holding UTC; PostgreSQL returns aware ones in the session's
    time zone. Strings (raw SQLite text from ``text()`` queries) are parsed as naive UTC.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def floor_hour(value: datetime) -> datetime:
    """The start of the UTC hour ``value`` falls in."""
    return to_utc(value, "datetime").replace(minute=0, second=0, microsecond=0)


def floor_day(value: datetime) -> datetime:
    """The start of the UTC day ``value`` falls in."""
    return floor_hour(value).replace(hour=0)


# --------------------------------------------------------------------------- value helpers


def as_real(value: float) -> float:
    """``value`` rounded to float4, exactly as PostgreSQL stores a ``REAL``."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def from_real(value: float) -> float:
    """The shortest decimal that rounds to the same float4 as ``value``.

    This is how PostgreSQL prints a ``REAL`` (and what psycopg returns); SQLite returns the exact
    binary value (0.9200000166893005 for 0.92), so reads from both go through this.
    """
    target = as_real(value)
    for digits in range(1, 10):
        candidate = float(f"{target:.{digits}g}")
        if as_real(candidate) == target:
            return candidate
    return target


def as_uuid(value: object, field: str) -> uuid.UUID:
    """THE UUID parser: ``value`` (a ``uuid.UUID`` or its string form, surrounding blanks
    ignored) as a UUID, or ``ValueError`` naming ``field``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{field}: expected a UUID (uuid.UUID or its string form), found {value!r}")


def optional_uuid(value: uuid.UUID | str | None, field: str) -> uuid.UUID | None:
    """:func:`as_uuid`, letting ``None`` through."""
    return None if value is None else as_uuid(value, field)


def non_empty_text(value: object, field: str) -> str:
    """``value`` as stored (:func:`capture.text.clean_text`: controls and NUL removed, lone
    surrogates -> U+FFFD, NFC, surrounding whitespace stripped); ``ValueError`` naming ``field``
    unless it is a string with something left after cleaning."""
    if isinstance(value, str):
        cleaned = clean_text(value)
        if cleaned:
            return cleaned
    raise ValueError(f"{field}: expected a non-empty string, found {value!r}")


def optional_text(value: object, field: str) -> str | None:
    """``value`` as stored (:func:`capture.text.clean_notes`): ``None`` when it is ``None`` or
    nothing is left after cleaning; ``ValueError`` naming ``field`` for a non-string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string or None, found {value!r}")
    return clean_notes(value)


# Code points that belong to the character before them (grapheme-cluster extenders): combining
# marks (categories Mn, Mc, Me), ZWNJ/ZWJ, variation selectors, emoji modifiers and tag characters.
_EXTEND_RANGES: tuple[tuple[int, int], ...] = (
    (0x200C, 0x200D),
    (0xFE00, 0xFE0F),
    (0xFF9E, 0xFF9F),
    (0x1F3FB, 0x1F3FF),
    (0xE0020, 0xE007F),
    (0xE0100, 0xE01EF),
)
_ZWJ = "\u200d"


def _extends(ch: str) -> bool:
    if unicodedata.category(ch) in ("Mn", "Mc", "Me"):
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _EXTEND_RANGES)


def _conjunct(before: str, after: str) -> bool:
    """An Indic conjunct: a virama (combining class 9), then a letter."""
    return unicodedata.combining(before) == 9 and unicodedata.category(after) == "Lo"


def _regional_indicator(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def truncate_text(value: str, max_chars: int) -> str:
    """``value`` (already cleaned) cut to at most ``max_chars`` code points without splitting a
    character: the cut moves back to the start of the grapheme cluster it would split (a letter
    and its combining accents, an emoji with its ZWJ sequence, skin tone or variation selector, a
    flag's pair of regional indicators, an Indic conjunct joined by a virama, CR LF), then
    surrounding whitespace is trimmed again (:func:`capture.text.clean_text`). A Python ``str``
    holds no surrogate pairs (``clean_text`` joined them), so no pair is split either. A single
    cluster longer than ``max_chars`` is cut at ``max_chars``. A ``value`` within the limit is
    returned as is."""
    if len(value) <= max_chars:
        return value
    cut = max_chars
    while cut > 0 and (
        _extends(value[cut])
        or value[cut - 1] == _ZWJ
        or (value[cut - 1] == "\r" and value[cut] == "\n")
        or _conjunct(value[cut - 1], value[cut])
    ):
        cut -= 1
    if cut > 0 and _regional_indicator(value[cut]):
        run = 0
        while run < cut and _regional_indicator(value[cut - 1 - run]):
            run += 1
        cut -= run % 2  # an odd run before the cut: its last indicator pairs with value[cut]
    if cut == 0:
        cut = max_chars
    return clean_text(value[:cut])


SecondaryIntents = Iterable[tuple[str, float] | Mapping[str, Any]]


def secondary_intents_json(secondary: SecondaryIntents) -> list[dict[str, Any]]:
    """The stored JSON shape of the runners-up: ``[{"intent": str, "confidence": float}, ...]``.

    Accepts ``(intent, confidence)`` pairs (as in ``Prediction.secondary_intents``) or mappings
    with those two keys; intent names must be in the allowed form
    (:func:`capture.text.check_intent_name`, surrounding whitespace removed), confidences are
    validated and stored as the shortest decimal of their float4 (:func:`from_real`).
    """
    out: list[dict[str, Any]] = []
    if isinstance(secondary, str | bytes):
        raise ValueError(
            f"secondary_intents: expected a list of (intent, confidence) pairs, found {secondary!r}"
        )
    for rank, item in enumerate(secondary):
        where = f"secondary_intents[{rank}]"
        name: Any
        conf: Any
        if isinstance(item, Mapping):
            name, conf = item.get("intent"), item.get("confidence")
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            name, conf = item
        else:
            raise ValueError(f"{where}: expected an (intent, confidence) pair, found {item!r}")
        intent = check_intent_name(name, field=f"{where}.intent")
        check_confidence(conf, f"{where}.confidence")
        out.append({"intent": intent, "confidence": from_real(float(conf))})
    return out


def parse_secondary_intents(value: object) -> tuple[tuple[str, float], ...]:
    """The stored JSON list read back as ranked ``(intent, confidence)`` pairs."""
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        value = json.loads(value)
    pairs: list[tuple[str, float]] = []
    for item in value if isinstance(value, list) else ():
        if isinstance(item, Mapping):
            pairs.append((str(item["intent"]), from_real(float(item["confidence"]))))
        else:
            name, conf = item
            pairs.append((str(name), from_real(float(conf))))
    return tuple(pairs)
