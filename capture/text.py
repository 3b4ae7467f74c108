"""Text hygiene: the ONE owner of what every boundary does to prompts, notes and intent names.

Pure functions of ``str`` (no database, no I/O), so SQLite and PostgreSQL store the same thing.
Every boundary that accepts text from people or their tools (the capture API, corrections files
and the inbox, training and evaluation files, the training export, the CLI, the review UI) calls
these instead of its own ``strip()``/``replace("\\x00", "")``.

Free text (prompts, reviewers' notes) — :func:`clean_text`, :func:`clean_prompt`,
:func:`clean_notes`, applied in this order:

1. Surrogates: a pair of surrogate code points becomes the character it encodes; a lone
   surrogate (half an emoji, e.g. ``"\\ud83d"`` from a JSON escape, or an undecodable byte kept by
   ``surrogateescape``) becomes U+FFFD REPLACEMENT CHARACTER. (PostgreSQL and UTF-8 cannot store
   a lone surrogate; replacing rather than dropping keeps a visible trace.)
2. Control characters: every character of Unicode category ``Cc`` except TAB, LF and CR is
   removed — C0 (NUL, ESC, ...), DEL and C1 (U+0080–U+009F). NUL is what PostgreSQL ``text``
   refuses; ESC and CSI would inject terminal escapes into CLI output.
3. NFC normalisation (``é`` typed as one or as two code points is stored as one).
4. Surrounding whitespace is stripped: every ``str.isspace`` character (space, TAB, newlines,
   NBSP U+00A0, ideographic space U+3000, U+2028, ...) plus the zero-width "spaces" U+200B ZERO
   WIDTH SPACE, U+2060 WORD JOINER and U+FEFF BOM at either end. Whitespace inside is kept.

Everything else is kept as it is: emoji (including ZWJ sequences and variation selectors),
right-to-left text and its bidi marks (U+200E, U+200F, U+202A–U+202E, U+2066–U+2069), ZWNJ
and ZWJ (needed by Persian, Indic scripts and emoji), soft hyphens, CJK. Inside free text an
invisible character may be meaningful, so only the ends are trimmed. Truncation to a maximum
length is the caller's (it knows its column).

Intent names — :func:`intent_key`, :func:`intent_name_problem`, :func:`check_intent_name`,
:class:`IntentCatalogue`:

* Allowed form (:data:`INTENT_NAME_PATTERN`): snake_case — lowercase ASCII letters ``a-z``,
  digits ``0-9`` and single underscores between them, 1 to :data:`INTENT_NAME_MAX_CHARS` (64)
  characters: ``music_play``, ``alarm_set``, ``oos``. Every label of the packaged demo set,
  CLINC150 and HWU64 has this form. No dots, hyphens, spaces, capitals, accents or markup
  (``<img src=x onerror=...>`` is refused).
* Surrounding whitespace (``str.isspace``) is removed silently, as every editor adds some;
  anything else that is not in the allowed form is refused, never silently rewritten.
* Comparison key (:func:`intent_key`): NFKC, remove invisible characters (controls, format
  characters, lone surrogates and the other default-ignorable code points: ZWSP, ZWJ, ZWNJ,
  WORD JOINER, soft hyphen, bidi marks, BOM, variation selectors, ...), casefold, NFKC again,
  turn every run of whitespace, dashes, underscores and dots into one ``_``, strip ``_`` at
  both ends. A name in the allowed form is its own key. Two names with the same key differ
  only by case, spacing or invisible characters: a new name whose key equals an existing
  intent's is refused with a message naming the existing one (``Music_Play`` when
  ``music_play`` exists).
* :data:`OOS_INTENT` (``"oos"``, the out-of-scope label) is reserved: it is in every catalogue
  (never "new"), ``OOS`` collides with it, and a new intent may not be one of
  :data:`OOS_ALIASES` (``out_of_scope``, ...), which would split the out-of-scope examples.

Errors are :class:`IntentNameError` (a ``capture.errors.UserError`` and a ``ValueError``) and
its subclasses; each message names the field, what was found (invisible characters shown as
``\\u200b`` and named), and the fix.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable

from capture.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "INTENT_NAME_MAX_CHARS",
    "INTENT_NAME_PATTERN",
    "INTENT_NAME_RULE",
    "OOS_ALIASES",
    "OOS_INTENT",
    "IntentCatalogue",
    "IntentCollisionError",
    "IntentNameError",
    "UnknownIntentError",
    "check_intent_name",
    "clean_notes",
    "clean_prompt",
    "clean_text",
    "describe_char",
    "find_intent_collision",
    "intent_key",
    "intent_name_problem",
    "is_invisible",
    "visible",
]

#: The out-of-scope label; reserved (see the module docstring).
OOS_INTENT = "oos"
#: Names a new intent may not take: they mean "out of scope", which is :data:`OOS_INTENT`.
OOS_ALIASES: frozenset[str] = frozenset(
    {"out_of_scope", "outofscope", "out_of_domain", "ood", "no_intent"}
)
#: Longest allowed intent name, in characters (all ASCII, so also bytes).
INTENT_NAME_MAX_CHARS = 64
#: The allowed form of an intent name (use ``fullmatch``).
INTENT_NAME_PATTERN = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
#: The allowed form, in words, as every message states it.
INTENT_NAME_RULE = (
    "snake_case (a-z, 0-9 and single underscores between them, at most "
    f"{INTENT_NAME_MAX_CHARS} characters)"
)

_SURROGATE = re.compile("[\ud800-\udfff]")
# Category Cc except TAB, LF, CR: C0, DEL, C1.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ZERO_WIDTH_SPACES = "\u200b\u2060\ufeff"
# Every str.isspace character (all are below U+3001) plus the zero-width spaces.
_EDGE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace()) + _ZERO_WIDTH_SPACES
# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) as ranges.
_DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_SEPARATOR_RUN = re.compile(r"[\s_.\-\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d]+")
_SHOWN_CHARS = 3


# --------------------------------------------------------------------------- free text


def _fix_surrogates(value: str) -> str:
    """Pairs of surrogate code points -> the character; lone surrogates -> U+FFFD."""
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def clean_text(value: str) -> str:
    """The stored form of free text (rules 1-4 of the module docstring); ``str -> str``.

    Pure and idempotent (``clean_text(clean_text(s)) == clean_text(s)``); may return ``""``
    (the caller decides whether empty is allowed). The result always encodes as UTF-8 and
    holds no NUL, so PostgreSQL and SQLite store it unchanged. ASCII input takes a fast path
    (the capture request path calls this for every prompt).
    """
    if value.isascii():
        if not value.isprintable():
            value = _CONTROL.sub("", value)
        return value.strip()
    if _SURROGATE.search(value) is not None:
        value = _fix_surrogates(value)
    if _CONTROL.search(value) is not None:
        value = _CONTROL.sub("", value)
    if not unicodedata.is_normalized("NFC", value):
        value = unicodedata.normalize("NFC", value)
    return value.strip(_EDGE)


def clean_prompt(value: str) -> str:
    """A prompt as it is stored and exported: :func:`clean_text` (may be ``""``)."""
    return clean_text(value)


def clean_notes(value: str | None) -> str | None:
    """A reviewer's notes as stored: :func:`clean_text`, and ``None`` when nothing is left
    (``None``, ``""``, only whitespace/controls)."""
    if value is None:
        return None
    return clean_text(value) or None


# --------------------------------------------------------------------------- showing text


def is_invisible(ch: str) -> bool:
    """True for one character that shows as nothing or moves other text: controls (``Cc``),
    format characters (``Cf``: ZWSP, ZWJ, bidi marks, BOM, soft hyphen, ...), surrogates, and
    the other default-ignorable code points (variation selectors, CGJ, Hangul fillers)."""
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs"):
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _DEFAULT_IGNORABLE)


def _escape(ch: str) -> str:
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _show_char(ch: str) -> str:
    if ch in {"\\", "'"}:
        return "\\" + ch
    if ch != " " and (ch.isspace() or is_invisible(ch)):
        return _escape(ch)
    return ch


def visible(value: str, limit: int = 80) -> str:
    """``value`` quoted for a message, every invisible or whitespace character other than a
    plain space written as an escape (``'weather\\u200b'``, ``'a\\x00b'``, ``'\\ud83d'``).

    Longer than ``limit`` characters: cut, with ``…(+N chars)`` after the quote. Emoji, CJK and
    right-to-left letters are shown as they are (their direction marks are escaped, so a
    U+202E in the value cannot reverse the rest of the message).
    """
    shown = value[:limit]
    body = "".join(_show_char(ch) for ch in shown)
    more = len(value) - len(shown)
    return f"'{body}'" + (f"…(+{more} chars)" if more > 0 else "")


def describe_char(ch: str) -> str:
    """One character for a message: ``'\\u200b' (U+200B ZERO WIDTH SPACE)``."""
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF:
        name = "half of a UTF-16 surrogate pair, a broken emoji or symbol"
    else:
        name = unicodedata.name(ch, "") or f"control character, category {unicodedata.category(ch)}"
    return f"{visible(ch)} (U+{cp:04X} {name})"


# --------------------------------------------------------------------------- intent names


class IntentNameError(UserError, ValueError):
    """An intent name that cannot be accepted. ``str(exc)`` is ``"<field>: <detail>"``;
    ``field``, ``found`` (the name as given) and ``detail`` are attributes."""

    def __init__(self, field: str, found: object, detail: str) -> None:
        self.field = field
        self.found = found
        self.detail = detail
        super().__init__(f"{field}: {detail}")


class IntentCollisionError(IntentNameError):
    """A new name that differs from an existing intent (``existing``) only by case, spacing or
    invisible characters."""

    def __init__(self, field: str, found: str, existing: str) -> None:
        self.existing = existing
        super().__init__(
            field,
            found,
            f"found {visible(found)}, which differs from the existing intent {existing!r} only "
            f"by case, spacing or invisible characters; write {existing!r} (a genuinely "
            "different intent needs a name that differs in its letters or digits)",
        )


class UnknownIntentError(IntentNameError):
    """A valid name that is not in the catalogue while new intents are not allowed."""

    def __init__(self, field: str, found: str, known: str, hint: str) -> None:
        super().__init__(
            field,
            found,
            f"{visible(found)} is not a known intent ({known}); fix the spelling, or {hint}",
        )


def intent_key(name: str) -> str:
    """The comparison key of an intent name (see the module docstring); ``str -> str``.

    ``intent_key("Music-Play") == intent_key("music play") == intent_key("music_play\\u200b")
    == "music_play"``. A name in the allowed form is its own key. May return ``""``.
    """
    if INTENT_NAME_PATTERN.fullmatch(name):
        return name
    value = name
    if _SURROGATE.search(value):  # pairs -> the character; lone halves are invisible: dropped
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")
    value = unicodedata.normalize("NFKC", value)
    value = "".join(ch for ch in value if not is_invisible(ch))
    value = unicodedata.normalize("NFKC", value.casefold())
    return _SEPARATOR_RUN.sub("_", value).strip("_")


def _is_allowed(name: str) -> bool:
    return len(name) <= INTENT_NAME_MAX_CHARS and INTENT_NAME_PATTERN.fullmatch(name) is not None


def _reasons(name: str) -> list[str]:
    """What keeps ``name`` (already stripped, non-empty) from the allowed form, in words."""
    reasons: list[str] = []
    if len(name) > INTENT_NAME_MAX_CHARS:
        reasons.append(f"{len(name)} characters, more than {INTENT_NAME_MAX_CHARS}")
    invisible = [ch for ch in dict.fromkeys(name) if is_invisible(ch)]
    if invisible:
        shown = ", ".join(describe_char(ch) for ch in invisible[:_SHOWN_CHARS])
        reasons.append(f"invisible character{'s' if len(invisible) > 1 else ''} {shown}")
    if any("A" <= ch <= "Z" for ch in name):
        reasons.append("uppercase letters")
    spaces = [ch for ch in dict.fromkeys(name) if ch.isspace() and ch != " "]
    if " " in name or spaces:
        shown = ", ".join(describe_char(ch) for ch in spaces[:_SHOWN_CHARS])
        reasons.append(f"spaces {shown}" if shown else "spaces")
    other = [
        ch
        for ch in dict.fromkeys(name)
        if not ("a" <= ch <= "z" or "A" <= ch <= "Z" or "0" <= ch <= "9" or ch == "_")
        and not ch.isspace()
        and not is_invisible(ch)
    ]
    if other:
        reasons.append(
            f"character{'s' if len(other) > 1 else ''} outside a-z, 0-9 and _: "
            + ", ".join(describe_char(ch) for ch in other[:_SHOWN_CHARS])
            + (f" and {len(other) - _SHOWN_CHARS} more" if len(other) > _SHOWN_CHARS else "")
        )
    if not reasons:
        if name.startswith("_") or name.endswith("_"):
            reasons.append("an underscore at the start or end")
        if "__" in name:
            reasons.append("two underscores in a row")
    return reasons


def intent_name_problem(name: object) -> str | None:
    """Why ``name`` is not an acceptable intent name (the detail of a message, without the
    field), or ``None`` when ``name.strip()`` is in the allowed form. Never raises."""
    if not isinstance(name, str):
        return (
            f"expected an intent name in {INTENT_NAME_RULE}, found {type(name).__name__} {name!r}"
        )
    stripped = name.strip()
    if not stripped:
        return f"expected an intent name in {INTENT_NAME_RULE}, found {visible(name)}"
    if _is_allowed(stripped):
        return None
    key = intent_key(stripped)
    fix = (
        f"write {key!r}"
        if _is_allowed(key)
        else "use only lowercase letters a-z, digits 0-9 and single underscores"
    )
    return (
        f"expected an intent name in {INTENT_NAME_RULE}, found {visible(stripped)} "
        f"({'; '.join(_reasons(stripped))}); {fix}"
    )


def check_intent_name(name: object, *, field: str = "intent") -> str:
    """``name`` with surrounding whitespace removed, when that is in the allowed form.

    Raises :class:`IntentNameError` naming ``field``, what was found and the fix otherwise
    (including for a non-``str``). Does not consult any catalogue: see :class:`IntentCatalogue`.
    """
    problem = intent_name_problem(name)
    if problem is not None:
        raise IntentNameError(field, name, problem)
    assert isinstance(name, str)
    return name.strip()


def _show_name(name: str) -> str:
    """A catalogue name in a list: as is when canonical, else quoted with escapes."""
    return name if INTENT_NAME_PATTERN.fullmatch(name) else visible(name)


class IntentCatalogue:
    """The known intents (e.g. the serving model's labels), with their keys precomputed.

    ``names``: the existing intents exactly as stored (legacy names that are not in the allowed
    form are kept and matched exactly). :data:`OOS_INTENT` (``oos_label``) is always included.
    """

    def __init__(self, names: Iterable[str], *, oos_label: str = OOS_INTENT) -> None:
        self.names: frozenset[str] = frozenset(names) | {oos_label}
        by_key: dict[str, list[str]] = {}
        for existing in sorted(self.names):
            by_key.setdefault(intent_key(existing), []).append(existing)
        # Prefer the existing name that is its own key (the canonical one).
        self._by_key = {
            key: sorted(group, key=lambda n: (n != key, n)) for key, group in by_key.items()
        }

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def collision(self, name: str) -> str | None:
        """An existing intent other than ``name`` with the same :func:`intent_key`, or ``None``."""
        stripped = name.strip()
        for existing in self._by_key.get(intent_key(stripped), ()):
            if existing != stripped:
                return existing
        return None

    def _known(self, name: str) -> str:
        names = sorted(self.names)
        if len(names) <= 20:
            return "known: " + ", ".join(map(_show_name, names))
        import difflib  # only on this error path

        close = difflib.get_close_matches(intent_key(name), names, n=3, cutoff=0.5)
        if not close:  # nothing alike: naming three others would only mislead
            return f"{len(names)} known"
        return f"{len(names)} known, closest: {', '.join(map(_show_name, close))}"

    def check(
        self,
        name: object,
        *,
        allow_new: bool = False,
        field: str = "corrected_intent",
        new_intent_hint: str = "pass --allow-new-intent to add a new intent",
    ) -> str:
        """The intent ``name`` refers to (surrounding whitespace removed).

        In order: a name in the catalogue is returned; a name whose key equals an existing
        intent's raises :class:`IntentCollisionError` naming it; a name not in the allowed form
        raises :class:`IntentNameError`; one of :data:`OOS_ALIASES` raises ``IntentNameError``
        (use ``oos``); a new valid name raises :class:`UnknownIntentError` unless ``allow_new``
        (whose message ends with ``new_intent_hint``), else is returned.
        """
        if not isinstance(name, str):
            raise IntentNameError(field, name, str(intent_name_problem(name)))
        stripped = name.strip()
        if stripped in self.names:
            return stripped
        existing = self.collision(stripped)
        if existing is not None:
            raise IntentCollisionError(field, name, existing)
        stripped = check_intent_name(name, field=field)
        if stripped in OOS_ALIASES:
            raise IntentNameError(
                field,
                name,
                f"found {stripped!r}, which means out of scope; write {OOS_INTENT!r}, the "
                "out-of-scope label (a second one would split its examples)",
            )
        if not allow_new:
            raise UnknownIntentError(field, name, self._known(stripped), new_intent_hint)
        logger.debug("new intent %r accepted", stripped)
        return stripped


def find_intent_collision(name: str, existing: Iterable[str]) -> str | None:
    """An intent in ``existing`` (or ``oos``) other than ``name`` that differs from it only by
    case, spacing or invisible characters (same :func:`intent_key`), else ``None``.

    ``find_intent_collision("Music_Play", {"music_play"}) == "music_play"``. For many names
    against one catalogue, build an :class:`IntentCatalogue` once and call ``collision``.
    """
    return IntentCatalogue(existing).collision(name)
