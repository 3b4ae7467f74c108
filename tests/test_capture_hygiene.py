"""The capture boundary on real databases: text hygiene (capture/text.py's rules) gives the same
stored strings on SQLite and PostgreSQL through every writer; prompts are cut without splitting a
character; the service logs three runners-up; ``require_migrated`` names the fix.

The tables of cases are capture/text.py's own (tests/test_text.py): each case goes through the
prompt, the notes, the execution error and the intent name, and the exact string read back from
each database is compared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import text

from capture import db
from capture import repository as repo
from capture.errors import UserError
from capture.service import NLUService, create_nlu_service
from capture.text import IntentNameError, clean_text
from capture.types import RUNNERS_UP, Prediction
from capture.values import truncate_text
from tests.capture_helpers import FixedClassifier, capture_settings, fetch_rows, scratch_database
from tests.test_text import FREE_TEXT, INVALID_NAMES


def _expected(raw: str, stored: str | None) -> str:
    return raw.strip() if stored is None else stored


STORABLE = [(case, raw, _expected(raw, stored)) for case, raw, stored in FREE_TEXT]


@pytest.fixture
async def service(db_url: str, tmp_path: Path) -> AsyncIterator[NLUService]:
    svc = create_nlu_service(
        FixedClassifier(), url=db_url, settings=capture_settings(db_url, tmp_path / "home")
    )
    yield svc
    await svc.aclose()


def _mismatches(found: Mapping[str, object], wanted: Mapping[str, object]) -> list[str]:
    return [
        f"{case}: stored {found[case]!r}, expected {wanted[case]!r}"
        for case in wanted
        if found[case] != wanted[case]
    ]


# --------------------------------------------------------------------------- free text


async def test_service_stores_the_clean_form_of_prompts_notes_and_errors(
    db_url: str, service: NLUService
) -> None:
    """process_message / add_correction / update_workflow_outcome: binary COPY and the batch
    UPDATE on PostgreSQL, executemany on SQLite; the same strings come back from both."""
    ids: dict[str, uuid.UUID] = {}
    for case, raw, expected in STORABLE:
        if not expected:
            with pytest.raises(ValueError, match="message: expected a non-empty prompt"):
                await service.process_message(raw)
            continue
        ids[case] = (await service.process_message(raw)).log_id
    await service.flush()  # the updates below reach written rows (the UPDATE path)
    raws = {case: raw for case, raw, _ in STORABLE}
    for case, log_id in ids.items():
        await service.add_correction(log_id, "weather", raws[case])
        await service.update_workflow_outcome(log_id, False, "wf", raws[case])
    await service.flush()
    assert service.stats().rejected == 0
    rows = fetch_rows(db_url, list(ids.values()))
    found = {case: rows[log_id] for case, log_id in ids.items()}
    wanted = {case: expected for case, _, expected in STORABLE if case in ids}
    assert _mismatches({c: r["prompt"] for c, r in found.items()}, wanted) == []
    assert _mismatches({c: r["correction_notes"] for c, r in found.items()}, wanted) == []
    assert _mismatches({c: r["execution_error"] for c, r in found.items()}, wanted) == []


async def test_empty_notes_and_errors_are_stored_as_null(db_url: str, service: NLUService) -> None:
    result = await service.process_message("wake me up")
    await service.flush()
    await service.add_correction(result.log_id, "alarm_set", "\x00 \u200b\ufeff")
    await service.update_workflow_outcome(result.log_id, True, " \n", "")
    await service.flush()
    row = fetch_rows(db_url)[result.log_id]
    assert (row["corrected_intent"], row["correction_notes"]) == ("alarm_set", None)
    assert (row["workflow_type"], row["execution_error"]) == (None, None)


async def test_repository_stores_the_same_clean_forms(db_url: str) -> None:
    """log_prompt / add_prompt_correction / update_prompt_log_outcome (SQLAlchemy) store what
    the service stores."""
    repository = repo.NLURepository(db.get_engine(db_url))
    ids: dict[str, uuid.UUID] = {}
    for case, raw, expected in STORABLE:
        if not expected:
            with pytest.raises(ValueError, match=r"^prompt: expected a non-empty string"):
                await repository.log_prompt(raw, "weather", 0.5)
            continue
        log_id = await repository.log_prompt(raw, "weather", 0.5)
        await repository.add_prompt_correction(log_id, "weather", raw)
        await repository.update_prompt_log_outcome(log_id, False, "wf", raw)
        ids[case] = log_id
    rows = fetch_rows(db_url, list(ids.values()))
    wanted = {case: expected for case, _, expected in STORABLE if case in ids}
    for column in ("prompt", "correction_notes", "execution_error"):
        found = {case: rows[log_id][column] for case, log_id in ids.items()}
        assert _mismatches(found, wanted) == [], column
    # And what the repository reads back is the same string.
    row = await repository.get_prompt_log(ids["NFD e + combining acute -> one code point"])
    assert row is not None and row.prompt == row.correction_notes == "caf\u00e9"


# --------------------------------------------------------------------------- intent names


@pytest.mark.parametrize(
    ("case", "name"), [(c[0], c[1]) for c in INVALID_NAMES], ids=[c[0] for c in INVALID_NAMES]
)
async def test_intent_names_not_in_the_allowed_form_are_refused_everywhere(
    db_url: str, service: NLUService, case: str, name: str
) -> None:
    logged = await service.process_message("play something")
    await service.flush()
    with pytest.raises(IntentNameError, match=r"^corrected_intent: expected an intent name"):
        await service.add_correction(logged.log_id, name)
    repository = repo.NLURepository(db.get_engine(db_url))
    with pytest.raises(IntentNameError, match=r"^corrected_intent: expected an intent name"):
        await repository.add_prompt_correction(logged.log_id, name, "notes")
    with pytest.raises(IntentNameError, match=r"^predicted_intent: expected an intent name"):
        await repository.log_prompt("play something", name, 0.5)
    with pytest.raises(IntentNameError, match=r"^secondary_intents\[0\]\.intent: expected"):
        await repository.log_prompt("play something", "music_play", 0.5, [(name, 0.1)])
    refusing = create_nlu_service(
        FixedClassifier(prediction=Prediction(name, 0.5)),
        url=db_url,
        settings=capture_settings(db_url, service.capture.settings.home),
    )
    with pytest.raises(IntentNameError, match=r"^Prediction.intent: expected an intent name"):
        await refusing.process_message("play something")
    await refusing.aclose()
    await service.flush()
    rows = fetch_rows(db_url)
    assert list(rows) == [logged.log_id]  # nothing else was written
    assert rows[logged.log_id]["corrected_intent"] is None


@pytest.mark.parametrize("raw", [" music_play", "music_play\n", "\u00a0music_play\u3000"])
async def test_surrounding_whitespace_of_an_intent_is_removed(
    db_url: str, service: NLUService, raw: str
) -> None:
    logged = await service.process_message("play something")
    await service.add_correction(logged.log_id, raw)
    repository = repo.NLURepository(db.get_engine(db_url))
    other = await repository.log_prompt("play more", raw, 0.5, [(raw, 0.25)])
    await repository.add_prompt_correction(other, raw)
    await service.flush()
    rows = fetch_rows(db_url)
    assert rows[logged.log_id]["corrected_intent"] == "music_play"
    assert (rows[other]["predicted_intent"], rows[other]["corrected_intent"]) == (
        "music_play",
        "music_play",
    )
    assert rows[other]["secondary_intents"] == [{"intent": "music_play", "confidence": 0.25}]


# --------------------------------------------------------------------------- truncation

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one grapheme, 5 code points
FLAG_GB = "\U0001f1ec\U0001f1e7"
TRUNCATION = [
    # (case, text, max_chars, stored)
    ("short: unchanged", "hello", 16, "hello"),
    ("plain cut", "abcdefghij", 4, "abcd"),
    ("cut then trimmed", "abc   defg", 5, "abc"),
    ("combining accents kept with their letter", "xxx" + "q\u0301\u0301", 5, "xxx"),
    ("ZWJ family not split", "ab " + FAMILY + "cd", 6, "ab"),
    ("ZWJ family whole when it fits", "ab " + FAMILY + "cd", 8, "ab " + FAMILY),
    ("skin tone kept with its hand", "hi \U0001f44b\U0001f3fd!", 4, "hi"),
    ("variation selector kept", "I \u2764\ufe0f it", 3, "I"),
    ("flag pair not split", "go " + FLAG_GB + FLAG_GB, 6, "go " + FLAG_GB),
    ("third flag not split", "go " + FLAG_GB * 3, 8, "go " + FLAG_GB * 2),
    ("CR LF not split", "line\r\nnext", 5, "line"),
    ("keycap kept", "press 1\ufe0f\u20e3 now", 8, "press"),
    ("Devanagari vowel sign kept", "\u0928\u092e\u0938\u094d\u0924\u0947", 4, "\u0928\u092e"),
    ("one cluster longer than the limit", "x" + "\u0301" * 20, 5, "x\u0301\u0301\u0301\u0301"),
]


@pytest.mark.parametrize(
    ("case", "value", "limit", "stored"), TRUNCATION, ids=[c[0] for c in TRUNCATION]
)
def test_truncation_never_splits_a_character(
    case: str, value: str, limit: int, stored: str
) -> None:
    assert clean_text(value) == value  # truncate_text takes cleaned text
    cut = truncate_text(value, limit)
    assert cut == stored
    assert len(cut) <= limit
    cut.encode("utf-8")


def test_truncation_agrees_with_unicode_grapheme_clusters() -> None:
    """Against the ``regex`` module's ``\\X`` (extended grapheme clusters; a test dependency): every
    cut of these strings ends on a cluster boundary (apart from a single over-long cluster)."""
    import regex

    samples = [
        "ab " + FAMILY + "cd " + FLAG_GB * 3 + " q\u0301 \U0001f44b\U0001f3fd ok",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0dc1\u0dca\u200d\u0dbb\u0dd3 \u05e9\u05b8\u05c1",
        "keycaps 1\ufe0f\u20e3 #\ufe0f\u20e3 tags \U0001f3f4\U000e0067\U000e0062\U000e007f end",
    ]
    for sample in samples:
        assert clean_text(sample) == sample
        starts = {m.start() for m in regex.finditer(r"\X", sample)} | {len(sample)}
        for limit in range(1, len(sample) + 1):
            cut = truncate_text(sample, limit)
            assert sample.startswith(cut)
            end = len(cut)
            # the cut (before trimming whitespace, which only removes whole clusters) ends on a
            # boundary: find the raw end, which may have trailing spaces removed
            raw_end = end
            while raw_end < limit and sample[raw_end].isspace():
                raw_end += 1
            assert raw_end in starts or cut == "", (sample, limit, cut)


async def test_the_service_stores_long_prompts_cut_at_a_character_boundary(
    db_url: str, tmp_path: Path
) -> None:
    service = create_nlu_service(
        FixedClassifier(),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home", max_prompt_chars=16),
    )
    prompt = "family photo: " + FAMILY + " and more"  # the cut at 16 falls inside the family
    result = await service.process_message(prompt)
    await service.aclose()
    assert service.classifier.seen == [prompt]  # type: ignore[attr-defined]
    assert fetch_rows(db_url)[result.log_id]["prompt"] == "family photo:"
    assert service.stats().truncated == 1


# --------------------------------------------------------------------------- runners-up


@pytest.mark.parametrize("offered", [0, 2, 3, 5])
async def test_the_service_logs_up_to_three_runners_up(
    db_url: str, tmp_path: Path, offered: int
) -> None:
    names = ["calendar_event", "reminder", "alarm_set", "weather", "news"]
    secondary = tuple((names[i], 0.1 / (i + 1)) for i in range(offered))
    service = create_nlu_service(
        FixedClassifier(prediction=Prediction("scheduling", 0.5, secondary)),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home"),
    )
    first = await service.process_message("book a slot")
    second = await service.process_message("book another slot")  # the fast path
    await service.aclose()
    kept = min(offered, RUNNERS_UP)
    assert first.secondary_intents == second.secondary_intents == secondary[:kept]
    rows = fetch_rows(db_url)
    for result in (first, second):
        # The spec's shape: a JSON list of {"intent", "confidence"}, best first.
        assert rows[result.log_id]["secondary_intents"] == [
            {"intent": name, "confidence": pytest.approx(conf)} for name, conf in secondary[:kept]
        ]


# --------------------------------------------------------------------------- require_migrated


def test_require_migrated_names_the_fix_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "capture.db"
    url = f"sqlite:///{missing}"
    with pytest.raises(db.DatabaseNotMigratedError) as info:
        db.require_migrated(url)
    message = str(info.value)
    assert "\n" not in message and "`prompt-capture db upgrade`" in message
    assert "does not exist" in message and str(missing) in message
    assert not missing.exists() and not missing.parent.exists()

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    (tmp_path / "empty.db").touch()
    with pytest.raises(db.DatabaseNotMigratedError, match=r"has no schema .*db upgrade"):
        db.require_migrated(empty)
    db.upgrade(empty, "0001")
    with pytest.raises(db.DatabaseNotMigratedError, match=r"at schema revision 0001.*db upgrade"):
        db.require_migrated(empty)
    db.upgrade(empty)
    assert db.require_migrated(empty) == empty
    with db.get_sync_engine(empty).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(db.DatabaseNotMigratedError, match="which this code does not know"):
        db.require_migrated(empty)
    assert isinstance(info.value, UserError)


def test_require_migrated_on_a_fresh_postgres_database(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url, "pc_unmigrated") as url:
        with pytest.raises(db.DatabaseNotMigratedError) as info:
            db.require_migrated(url)
        message = str(info.value)
        assert "has no schema" in message and "`prompt-capture db upgrade`" in message
        assert url.rpartition("/")[2] in message
