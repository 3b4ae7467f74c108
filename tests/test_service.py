"""The NLU service's contract: bad input gets a clear ValueError or a documented outcome."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capture import db
from capture.service import NLUService, UnknownLogIdError, create_nlu_service
from capture.types import Prediction
from tests.capture_helpers import FixedClassifier, capture_settings, fetch_rows


@pytest.fixture
async def service(db_url: str, tmp_path: Path) -> AsyncIterator[NLUService]:
    svc = create_nlu_service(
        FixedClassifier(),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home", max_prompt_chars=1000),
    )
    yield svc
    await svc.aclose()


@pytest.mark.parametrize("message", ["", "   \n\t ", "\x00\x00"])
async def test_empty_prompt_is_refused(service: NLUService, message: str) -> None:
    with pytest.raises(ValueError, match="message: expected a non-empty prompt"):
        await service.process_message(message)
    assert service.stats().queued == 0
    assert service.classifier.seen == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prediction", "field"),
    [
        (Prediction("weather", 1.5), "Prediction.confidence"),
        (Prediction("weather", -0.01), "Prediction.confidence"),
        (Prediction("weather", math.nan), "Prediction.confidence"),
        (Prediction("weather", 0.5, (("news", math.inf),)), r"Prediction.secondary_intents\[0\]"),
        (Prediction("", 0.5), "Prediction.intent"),
        # Intent names must be in the allowed form (capture.text); never silently rewritten.
        (Prediction("weather\x00", 0.5), r"Prediction.intent: .*'weather\\x00'.*write 'weather'"),
        (Prediction("Weather", 0.5), "Prediction.intent: .*uppercase"),
        (Prediction("weather", 0.5, (("news\u200b", 0.1),)), r"secondary_intents\[0\]: .*200B"),
    ],
)
async def test_bad_classifier_output_is_refused(
    db_url: str, tmp_path: Path, prediction: Prediction, field: str
) -> None:
    service = create_nlu_service(
        FixedClassifier(prediction=prediction),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home"),
    )
    with pytest.raises(ValueError, match=field):
        await service.process_message("what's the weather")
    assert service.stats().queued == 0
    await service.aclose()
    assert fetch_rows(db_url) == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"conversation_id": 12}, "conversation_id"),
        ({"message_index": -1}, "message_index"),
        ({"message_index": 2**40}, "message_index"),
        ({"message_index": True}, "message_index"),
    ],
)
async def test_bad_ids_are_refused(
    service: NLUService, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        await service.process_message("hello", **kwargs)  # type: ignore[arg-type]


async def test_unknown_log_id_is_refused(db_url: str, service: NLUService) -> None:
    with pytest.raises(UnknownLogIdError, match="no prompt log with id"):
        await service.update_workflow_outcome(uuid.uuid4(), True, "scheduling")
    with pytest.raises(UnknownLogIdError):
        await service.add_correction(str(uuid.uuid4()), "weather")
    with pytest.raises(ValueError, match="log_id: expected a UUID"):
        await service.update_workflow_outcome("row-17", True, "scheduling")
    result = await service.process_message("hello")
    with pytest.raises(ValueError, match="was_successful"):
        await service.update_workflow_outcome(result.log_id, "yes", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="corrected_intent"):
        await service.add_correction(result.log_id, "  ")
    await service.flush()
    assert service.stats().rejected == 0


async def test_a_row_written_by_another_process_accepts_outcomes(
    db_url: str, tmp_path: Path, service: NLUService
) -> None:
    """An id this service did not issue is checked in the database, then accepted."""
    other = create_nlu_service(
        FixedClassifier(), url=db_url, settings=capture_settings(db_url, tmp_path / "other")
    )
    result = await other.process_message("book a table for two")
    await other.aclose()
    await service.update_workflow_outcome(result.log_id, True, "restaurant")
    await service.flush()
    assert fetch_rows(db_url)[result.log_id]["workflow_type"] == "restaurant"


async def test_huge_nul_and_surrogate_prompts_are_stored_cleaned(
    db_url: str, service: NLUService
) -> None:
    megabyte = "plan my week " * 80_000  # ~1 MB
    big = await service.process_message(megabyte)
    nul = await service.process_message("call\x00 mom\x00")
    lone = await service.process_message("caf\udce9 at noon \ud83d")
    await service.update_workflow_outcome(nul.log_id, False, "calls", "bad\x00 number")
    await service.flush()

    assert service.classifier.seen[0] == megabyte  # type: ignore[attr-defined]
    rows = fetch_rows(db_url)
    assert rows[big.log_id]["prompt"] == megabyte[:1000]
    assert rows[nul.log_id]["prompt"] == "call mom"
    assert rows[nul.log_id]["execution_error"] == "bad number"
    # capture.text: a lone surrogate becomes U+FFFD (a visible trace; it used to be dropped).
    assert rows[lone.log_id]["prompt"] == "caf\ufffd at noon \ufffd"
    stats = service.stats()
    assert (stats.truncated, stats.rejected, stats.written) == (1, 0, 3)
    # The writer keeps going after all of that.
    again = await service.process_message("still here")
    await service.flush()
    assert again.log_id in fetch_rows(db_url)


async def test_unmigrated_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(db.DatabaseNotMigratedError, match="prompt-capture db upgrade"):
        create_nlu_service(FixedClassifier(), url=url, settings=capture_settings(url, tmp_path))


async def test_unusual_but_valid_classifier_output_is_normalised(
    db_url: str, tmp_path: Path
) -> None:
    """Integer confidences and names with surrounding blanks take the validating slow path."""
    classifier = FixedClassifier(prediction=Prediction(" weather\n", 1, (("news ", 0),)))
    service = create_nlu_service(
        classifier, url=db_url, settings=capture_settings(db_url, tmp_path / "home")
    )
    result = await service.process_message("will it rain")
    await service.aclose()
    assert (result.intent, result.confidence, result.secondary_intents) == (
        "weather",
        1.0,
        (("news", 0.0),),
    )
    row = fetch_rows(db_url)[result.log_id]
    assert (row["predicted_intent"], row["confidence"]) == ("weather", 1.0)
    assert row["secondary_intents"] == [{"intent": "news", "confidence": 0.0}]


def test_demo_traffic_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from capture.settings import get_settings
    from deployments.cli import app

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        refused = runner.invoke(app, ["demo-traffic", "--count", "20"])
        assert refused.exit_code == 2
        assert "prompt-capture db upgrade" in " ".join(refused.output.split())
        db.upgrade(url)
        result = runner.invoke(app, ["demo-traffic", "--count", "300", "--seed", "1"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    # No model deployed in the home: the stand-in answers, and a warning says so first.
    assert result.stderr.startswith(
        f"warning: no model is deployed in {tmp_path / 'home' / 'models'}, so the stand-in "
        "keyword classifier keyword-v1 answers the demo traffic; to send it through a trained "
        "model, deploy one (`prompt-capture demo` trains and deploys one"
    )
    output = " ".join(result.output.split())
    assert "sent 300 prompts" in output
    for title in ("Confidence distribution", "Intent distribution", "success rate by intent"):
        assert title in output
    rows = fetch_rows(url)
    assert len(rows) == 300
    with_outcome = [r for r in rows.values() if r["was_successful"] is not None]
    assert with_outcome and any(r["was_successful"] is False for r in with_outcome)
    assert all(r["predicted_intent"] != "oos" for r in with_outcome)


async def test_created_at_without_a_clock_is_the_ids_millisecond(
    db_url: str, tmp_path: Path
) -> None:
    """Without an injected clock, created_at is read with the id: the UUIDv7's millisecond."""
    from datetime import UTC, datetime, timedelta

    from capture.ids import uuid7_time_ms
    from tests.capture_helpers import aware

    service = create_nlu_service(
        FixedClassifier(), url=db_url, settings=capture_settings(db_url, tmp_path / "home")
    )
    before = datetime.now(UTC)
    results = [await service.process_message(f"what time is it {i}") for i in range(50)]
    after = datetime.now(UTC)
    await service.aclose()
    rows = fetch_rows(db_url)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for result in results:
        created = aware(rows[result.log_id]["created_at"])
        assert created is not None
        assert created == epoch + timedelta(milliseconds=uuid7_time_ms(result.log_id))
        assert before - timedelta(milliseconds=1) < created <= after
        assert aware(rows[result.log_id]["updated_at"]) == created
