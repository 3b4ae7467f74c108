"""capture/text.py: the one set of text-hygiene rules, checked on exact strings.

Free text (prompts and notes) is cleaned; intent names are validated, never rewritten (apart from
surrounding whitespace), and compared by their key. The same tables run through the prompt,
notes and intent-name functions.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from capture.errors import UserError
from capture.text import (
    INTENT_NAME_MAX_CHARS,
    OOS_INTENT,
    IntentCatalogue,
    IntentCollisionError,
    IntentNameError,
    UnknownIntentError,
    check_intent_name,
    clean_notes,
    clean_prompt,
    clean_text,
    describe_char,
    find_intent_collision,
    intent_key,
    intent_name_problem,
    is_invisible,
    visible,
)
from tests import REPO, SHARED_DATASETS

# ----------------------------------------------------------------------------- free text

#: (case, raw, stored): what a prompt or a reviewer's note becomes.
FREE_TEXT = [
    # NUL and other controls
    ("NUL inside", "play\x00 music", "play music"),
    ("NUL only", "\x00", ""),
    ("NUL at the end", "weather\x00", "weather"),
    ("ESC sequence", "\x1b[31mred\x1b[0m", "[31mred[0m"),
    ("bell and backspace", "a\x07b\x08c", "abc"),
    ("DEL and C1", "a\x7fb\x85c\x9bd", "abcd"),
    ("tab, LF, CR inside kept", "one\ttwo\nthree\r\nfour", "one\ttwo\nthree\r\nfour"),
    # lone surrogates (half an emoji) and pairs held as two code points
    ("lone high surrogate at the end", "nice \ud83d", "nice \ufffd"),
    ("lone high surrogate inside", "a\ud83db", "a\ufffdb"),
    ("lone low surrogate", "\ude00 ok", "\ufffd ok"),
    ("surrogates in the wrong order", "x\ude00\ud83dy", "x\ufffd\ufffdy"),
    ("surrogate pair as two code points", "smile \ud83d\ude00", "smile \U0001f600"),
    ("surrogateescape byte", "caf\udce9", "caf\ufffd"),
    # BOM
    ("leading BOM", "\ufeffhello", "hello"),
    ("trailing BOM", "hello\ufeff", "hello"),
    ("BOM inside kept", "a\ufeffb", "a\ufeffb"),
    # zero-width and other invisible characters
    ("ZWSP around", "\u200bhello\u200b", "hello"),
    ("ZWSP inside kept", "hel\u200blo", "hel\u200blo"),
    ("WORD JOINER around", "\u2060hello\u2060", "hello"),
    ("ZWJ emoji sequence kept", "family \U0001f468\u200d\U0001f469\u200d\U0001f467", None),
    ("ZWNJ Persian kept", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", None),
    ("ZWNJ and ZWJ at the edges kept", "\u200cx\u200d", "\u200cx\u200d"),
    ("soft hyphen kept", "co\u00adoperate", "co\u00adoperate"),
    ("emoji with variation selector kept", "I \u2764\ufe0f it", None),
    # right-to-left
    ("RLM after Hebrew kept", "\u05e9\u05dc\u05d5\u05dd!\u200f", None),
    ("RLO kept (shown escaped in messages)", "\u202eevil", "\u202eevil"),
    ("LRM at the start kept", "\u200eabc", "\u200eabc"),
    (
        "Arabic kept",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
        None,
    ),
    ("CJK kept", "\u660e\u5929\u5929\u6c14\u600e\u4e48\u6837", None),
    ("flag emoji kept", "play \U0001f3b5 now \U0001f1ec\U0001f1e7", None),
    # NFC vs NFD
    ("NFD e + combining acute -> one code point", "cafe\u0301", "caf\u00e9"),
    ("NFC unchanged", "caf\u00e9", "caf\u00e9"),
    ("Hangul jamo composed", "\u1100\u1161", "\uac00"),
    ("NFC keeps NBSP inside (not NFKC)", "a\u00a0b", "a\u00a0b"),
    ("NFC keeps fullwidth letters (not NFKC)", "\uff41\uff42", "\uff41\uff42"),
    # surrounding whitespace
    ("spaces", "  hi there  ", "hi there"),
    ("newlines and tabs", "\n\thi\r\n", "hi"),
    ("NBSP around", "\u00a0hi\u00a0", "hi"),
    ("ideographic space around", "\u3000\u3053\u3093\u306b\u3061\u306f\u3000", None),
    ("line and paragraph separators", "\u2028x\u2029", "x"),
    ("mixed invisible edges", "\ufeff \u200b\u00a0 hi \u2060\n", "hi"),
    ("only invisible and controls", "\x00\u200b \n\ufeff", ""),
    ("empty", "", ""),
]


def _stored(raw: str, stored: str | None) -> str:
    return raw.strip() if stored is None else stored


@pytest.mark.parametrize(("case", "raw", "stored"), FREE_TEXT, ids=[c[0] for c in FREE_TEXT])
def test_prompt_is_stored_in_its_clean_form(case: str, raw: str, stored: str | None) -> None:
    expected = _stored(raw, stored)
    assert clean_prompt(raw) == expected
    assert clean_text(raw) == expected


@pytest.mark.parametrize(("case", "raw", "stored"), FREE_TEXT, ids=[c[0] for c in FREE_TEXT])
def test_notes_follow_the_same_rules_and_empty_is_none(
    case: str, raw: str, stored: str | None
) -> None:
    expected = _stored(raw, stored)
    assert clean_notes(raw) == (expected or None)


@pytest.mark.parametrize(("case", "raw", "stored"), FREE_TEXT, ids=[c[0] for c in FREE_TEXT])
def test_clean_text_is_idempotent_nfc_and_storable(case: str, raw: str, stored: str | None) -> None:
    once = clean_text(raw)
    assert clean_text(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert "\x00" not in once
    once.encode("utf-8")  # no lone surrogate left: PostgreSQL and SQLite store the same text
    assert once == once.strip()


def test_notes_none_stays_none() -> None:
    assert clean_notes(None) is None
    assert clean_notes("  user meant the alarm \x00") == "user meant the alarm"


def test_free_text_keeps_emoji_rtl_and_cjk_code_points_exactly() -> None:
    mixed = (
        "\u05e9\u05dc\u05d5\u05dd \U0001f44b\U0001f3fd \u4f60\u597d \u0645\u0631\u062d\u0628\u0627"
    )
    assert clean_prompt(mixed) == mixed
    assert [hex(ord(c)) for c in clean_prompt(mixed)] == [hex(ord(c)) for c in mixed]


def test_long_prompt_is_not_truncated_here() -> None:
    long = "word " * 10_000
    assert clean_prompt(long) == long.strip()


# ----------------------------------------------------------------------------- showing text

VISIBLE = [
    ("weather\u200b", "'weather\\u200b'"),
    ("a\x00b", "'a\\x00b'"),
    ("half \ud83d", "'half \\ud83d'"),
    ("\u202eevil", "'\\u202eevil'"),
    ("nb\u00a0sp", "'nb\\xa0sp'"),
    ("tab\there", "'tab\\x09here'"),
    ("it's", "'it\\'s'"),
    ("back\\slash", "'back\\\\slash'"),
    (
        "\U0001f600 \u4f60\u597d \u05e9\u05dc\u05d5\u05dd",
        "'\U0001f600 \u4f60\u597d \u05e9\u05dc\u05d5\u05dd'",
    ),
    ("\u2764\ufe0f", "'\u2764\\ufe0f'"),
]


@pytest.mark.parametrize(("value", "shown"), VISIBLE)
def test_visible_escapes_invisible_characters(value: str, shown: str) -> None:
    assert visible(value) == shown


def test_visible_cuts_long_values() -> None:
    assert visible("x" * 100, limit=10) == "'xxxxxxxxxx'…(+90 chars)"


def test_describe_char_names_the_code_point() -> None:
    assert describe_char("\u200b") == "'\\u200b' (U+200B ZERO WIDTH SPACE)"
    assert describe_char("<") == "'<' (U+003C LESS-THAN SIGN)"
    assert describe_char("\x00") == "'\\x00' (U+0000 control character, category Cc)"
    assert "U+D83D half of a UTF-16 surrogate pair" in describe_char("\ud83d")


@pytest.mark.parametrize(
    ("ch", "invisible"),
    [
        ("\u200b", True),
        ("\u200c", True),
        ("\u200d", True),
        ("\u2060", True),
        ("\u00ad", True),
        ("\u200f", True),
        ("\u202e", True),
        ("\ufeff", True),
        ("\ufe0f", True),
        ("\u034f", True),
        ("\u3164", True),
        ("\x00", True),
        ("\ud83d", True),
        ("a", False),
        (" ", False),
        ("\u00e9", False),
        ("\u05e9", False),
    ],
)
def test_is_invisible(ch: str, invisible: bool) -> None:
    assert is_invisible(ch) is invisible


# ----------------------------------------------------------------------------- intent names

VALID_NAMES = ["music_play", "alarm_set", "oos", "a", "a1", "24h_news", "x" * INTENT_NAME_MAX_CHARS]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass_unchanged_and_are_their_own_key(name: str) -> None:
    assert check_intent_name(name) == name
    assert intent_name_problem(name) is None
    assert intent_key(name) == name


@pytest.mark.parametrize(
    "raw", [" music_play", "music_play\n", "\tmusic_play\r\n", "\u00a0music_play\u3000"]
)
def test_surrounding_whitespace_is_removed_silently(raw: str) -> None:
    assert check_intent_name(raw, field="corrected_intent") == "music_play"


#: (case, name, parts of the message, the suggested name or None)
INVALID_NAMES = [
    ("uppercase", "Music_Play", ["'Music_Play'", "uppercase letters"], "music_play"),
    ("ZWSP", "weather\u200b", ["'weather\\u200b'", "U+200B ZERO WIDTH SPACE"], "weather"),
    ("ZWJ", "wea\u200dther", ["U+200D ZERO WIDTH JOINER"], "weather"),
    ("ZWNJ", "wea\u200cther", ["U+200C ZERO WIDTH NON-JOINER"], "weather"),
    ("WORD JOINER", "wea\u2060ther", ["U+2060 WORD JOINER"], "weather"),
    ("soft hyphen", "wea\u00adther", ["'wea\\xadther'", "U+00AD SOFT HYPHEN"], "weather"),
    ("RLM", "weather\u200f", ["U+200F RIGHT-TO-LEFT MARK"], "weather"),
    ("RLO", "\u202eweather", ["'\\u202eweather'", "U+202E RIGHT-TO-LEFT OVERRIDE"], "weather"),
    ("BOM", "\ufeffweather", ["U+FEFF ZERO WIDTH NO-BREAK SPACE"], "weather"),
    ("NUL", "weather\x00", ["'weather\\x00'", "U+0000 control character"], "weather"),
    ("lone surrogate", "weather\ud83d", ["'weather\\ud83d'", "surrogate pair"], "weather"),
    ("NFC accent", "caf\u00e9", ["U+00E9 LATIN SMALL LETTER E WITH ACUTE"], None),
    ("NFD accent", "cafe\u0301", ["U+0301 COMBINING ACUTE ACCENT"], None),
    ("space", "music play", ["'music play'", "(spaces)"], "music_play"),
    ("NBSP inside", "music\u00a0play", ["U+00A0 NO-BREAK SPACE"], "music_play"),
    ("hyphen", "music-play", ["U+002D HYPHEN-MINUS"], "music_play"),
    ("dot", "music.play", ["U+002E FULL STOP"], "music_play"),
    ("leading underscore", "_music", ["an underscore at the start or end"], "music"),
    ("double underscore", "music__play", ["two underscores in a row"], "music_play"),
    ("too long", "x" * 65, ["65 characters, more than 64"], None),
    (
        "HTML",
        "<img src=x onerror=alert(1)>",
        ["'<img src=x onerror=alert(1)>'", "'<' (U+003C LESS-THAN SIGN)", "and 2 more"],
        None,
    ),
    ("fullwidth", "\uff4d\uff55\uff53\uff49\uff43", ["FULLWIDTH LATIN SMALL LETTER M"], "music"),
    ("Cyrillic lookalike", "\u043cusic", ["U+043C CYRILLIC SMALL LETTER EM"], None),
    ("empty", "", ["found ''"], None),
    ("whitespace only", " \t", ["found ' \\x09'"], None),
]


@pytest.mark.parametrize(
    ("case", "name", "parts", "suggestion"), INVALID_NAMES, ids=[c[0] for c in INVALID_NAMES]
)
def test_invalid_names_are_refused_with_field_found_and_fix(
    case: str, name: str, parts: list[str], suggestion: str | None
) -> None:
    with pytest.raises(IntentNameError) as info:
        check_intent_name(name, field="corrected_intent")
    message = str(info.value)
    assert message.startswith("corrected_intent: expected an intent name in snake_case (a-z, 0-9")
    for part in parts:
        assert part in message
    if suggestion is None:
        assert "write '" not in message
        if name.strip():
            assert message.endswith(
                "use only lowercase letters a-z, digits 0-9 and single underscores"
            )
    else:
        assert message.endswith(f"; write {suggestion!r}")
    assert isinstance(info.value, UserError)
    assert isinstance(info.value, ValueError)
    assert (info.value.field, info.value.found) == ("corrected_intent", name)
    assert intent_name_problem(name) == info.value.detail


@pytest.mark.parametrize("value", [5, None, ["music_play"]])
def test_non_string_names_are_refused(value: object) -> None:
    with pytest.raises(
        IntentNameError, match=f"label: expected an intent name .*found {type(value).__name__}"
    ):
        check_intent_name(value, field="label")


def test_invisible_character_in_a_message_is_shown_not_printed_raw() -> None:
    problem = intent_name_problem("\u202eweather")
    assert problem is not None
    assert "\u202e" not in problem  # the override cannot reverse the rest of the line


KEYS = [
    ("Music_Play", "music_play"),
    ("MUSIC PLAY", "music_play"),
    ("music-play", "music_play"),
    ("music.play", "music_play"),
    ("  music   play ", "music_play"),
    ("music__play", "music_play"),
    ("_music_play_", "music_play"),
    ("music\u2013play", "music_play"),
    ("weather\u200b", "weather"),
    ("\ufeffwea\u00adther\u200d", "weather"),
    ("\u202eweather\u202c", "weather"),
    ("weather\x00", "weather"),
    ("\uff37\uff45\uff41\uff54\uff48\uff45\uff52", "weather"),
    ("caf\u00e9", "caf\u00e9"),
    ("cafe\u0301", "caf\u00e9"),
    ("Stra\u00dfe", "strasse"),
    ("weather\ud83d", "weather"),
    ("\ud83d\ude00x", "\U0001f600x"),
    ("\u200b", ""),
]


@pytest.mark.parametrize(("name", "key"), KEYS)
def test_intent_key(name: str, key: str) -> None:
    assert intent_key(name) == key
    assert intent_key(key) == key


# ----------------------------------------------------------------------------- catalogue

CATALOGUE = ["music_play", "weather", "alarm_set"]


@pytest.mark.parametrize(
    ("name", "existing"),
    [
        ("Music_Play", "music_play"),
        ("music play", "music_play"),
        ("music-play", "music_play"),
        ("MUSIC_PLAY", "music_play"),
        ("weather\u200b", "weather"),
        ("wea\u200dther", "weather"),
        ("weather\u200f", "weather"),
        ("Weather", "weather"),
        ("\uff57\uff45\uff41\uff54\uff48\uff45\uff52", "weather"),
        ("OOS", "oos"),
        ("o\u200bos", "oos"),
    ],
)
def test_a_name_differing_only_by_case_spacing_or_invisibles_is_refused_naming_the_existing(
    name: str, existing: str
) -> None:
    catalogue = IntentCatalogue(CATALOGUE)
    assert catalogue.collision(name) == existing
    assert find_intent_collision(name, CATALOGUE) == existing
    for allow_new in (False, True):
        with pytest.raises(IntentCollisionError) as info:
            catalogue.check(name, allow_new=allow_new)
        assert info.value.existing == existing
        assert str(info.value) == (
            f"corrected_intent: found {visible(name)}, which differs from the existing intent "
            f"{existing!r} only by case, spacing or invisible characters; write {existing!r} "
            "(a genuinely different intent needs a name that differs in its letters or digits)"
        )


def test_known_names_and_surrounding_whitespace_are_accepted() -> None:
    catalogue = IntentCatalogue(CATALOGUE)
    assert catalogue.check("music_play") == "music_play"
    assert catalogue.check(" weather\n") == "weather"
    assert catalogue.check(OOS_INTENT) == "oos"  # always known, even when not a model label
    assert "oos" in catalogue
    assert len(catalogue) == 4
    assert catalogue.collision("music_play") is None
    assert catalogue.collision(" music_play\n") is None
    assert find_intent_collision("music_play", CATALOGUE) is None


def test_a_new_valid_intent_needs_allow_new() -> None:
    catalogue = IntentCatalogue(CATALOGUE)
    with pytest.raises(UnknownIntentError) as info:
        catalogue.check("podcast_play")
    assert str(info.value) == (
        "corrected_intent: 'podcast_play' is not a known intent (known: alarm_set, music_play, "
        "oos, weather); fix the spelling, or pass --allow-new-intent to add a new intent"
    )
    assert catalogue.check("podcast_play", allow_new=True) == "podcast_play"


def test_the_hint_for_new_intents_is_the_callers() -> None:
    with pytest.raises(UnknownIntentError, match=r", or tick 'new intent' in the form$"):
        IntentCatalogue(CATALOGUE).check(
            "podcast_play", new_intent_hint="tick 'new intent' in the form"
        )


def test_a_big_catalogue_names_the_closest_intents() -> None:
    catalogue = IntentCatalogue(
        [f"intent_{i:02d}" for i in range(30)] + ["music_play", "music_pause"]
    )
    with pytest.raises(UnknownIntentError) as info:
        catalogue.check("music_plays")
    assert "(33 known, closest: music_play, music_pause)" in str(info.value)  # most alike first
    with pytest.raises(UnknownIntentError) as info:
        catalogue.check("zzz")  # nothing alike: no list of other names
    assert "'zzz' is not a known intent (33 known); fix the spelling" in str(info.value)


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("<img src=x onerror=alert(1)>", ["'<' (U+003C LESS-THAN SIGN)"]),
        ("caf\u00e9", ["U+00E9"]),
        ("Podcast_Play", ["uppercase letters", "write 'podcast_play'"]),
        ("podcast\u200bplay", ["U+200B ZERO WIDTH SPACE", "write 'podcastplay'"]),
    ],
)
def test_a_new_name_outside_the_allowed_form_is_refused_even_with_allow_new(
    name: str, parts: list[str]
) -> None:
    with pytest.raises(IntentNameError) as info:
        IntentCatalogue(CATALOGUE).check(name, allow_new=True, field="corrected_intent")
    assert not isinstance(info.value, IntentCollisionError | UnknownIntentError)
    for part in parts:
        assert part in str(info.value)


@pytest.mark.parametrize("alias", ["out_of_scope", "out_of_domain", "no_intent"])
def test_out_of_scope_aliases_are_refused_as_new_intents(alias: str) -> None:
    with pytest.raises(
        IntentNameError, match=f"found '{alias}', which means out of scope; write 'oos'"
    ):
        IntentCatalogue(CATALOGUE).check(alias, allow_new=True)


def test_legacy_names_in_the_catalogue_match_exactly_and_the_canonical_one_is_preferred() -> None:
    catalogue = IntentCatalogue(["Music_Play", "music_play", "Weather"])
    assert catalogue.check("Music_Play") == "Music_Play"
    assert catalogue.collision("MUSIC PLAY") == "music_play"
    assert catalogue.collision("weather") == "Weather"
    legacy = IntentCatalogue(["weather\u200b", "alarm_set"])
    with pytest.raises(UnknownIntentError, match=r"known: alarm_set, oos, 'weather\\u200b'\)"):
        legacy.check("podcast")
    with pytest.raises(IntentCollisionError, match="write 'Weather'"):
        catalogue.check("weather", allow_new=True)


def test_a_custom_oos_label_is_reserved_instead() -> None:
    catalogue = IntentCatalogue(CATALOGUE, oos_label="out_of_scope")
    assert catalogue.check("out_of_scope") == "out_of_scope"
    assert catalogue.collision("Out Of Scope") == "out_of_scope"


def test_non_string_in_the_catalogue_check() -> None:
    with pytest.raises(
        IntentNameError, match=r"^corrected_intent: expected an intent name .* found int 3$"
    ):
        IntentCatalogue(CATALOGUE).check(3)


# ----------------------------------------------------------------------------- real label sets


def _labels(path: Path) -> set[str]:
    labels: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            labels.add(json.loads(line)["label"])
    return labels


@pytest.mark.parametrize("name", ["demo", "clinc150", "hwu64"])
def test_every_label_of_the_real_datasets_is_already_canonical(name: str) -> None:
    if name == "demo":
        files = [REPO / "capture" / "data" / "demo_intents.jsonl"]
    else:
        files = sorted((SHARED_DATASETS / name).glob("*.jsonl"))
        assert files, (
            f"{SHARED_DATASETS / name} not found: the shared datasets lie beside the checkout"
        )
    labels = set().union(*(_labels(f) for f in files))
    assert len(labels) > 10
    for label in labels:
        assert check_intent_name(label, field="label") == label
        assert intent_key(label) == label
    catalogue = IntentCatalogue(labels)
    assert all(catalogue.check(label) == label for label in labels)
    assert all(catalogue.collision(label) is None for label in labels)
