"""The HTML report: every section present, plots are real PNGs, numbers match the database."""

from __future__ import annotations

import base64
import io
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from capture.settings import get_settings
from capture.values import as_real
from tasks.ab_readout import wilson_interval
from tasks.report import (
    ARTIFACT_KEY,
    ARTIFACT_TABLE_KEY,
    publish_monitoring_artifact,
    render_markdown,
    write_report,
)
from tests.report_data import NOW, insert_logs, synthetic_logs, write_registry

SECTIONS = ("confidence", "intents", "success", "corrections", "low-confidence", "models")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _ReportParser(HTMLParser):
    """Collects section ids, <img> sources, table cells by table id, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self.external: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td":
            self._cell = []
        if tag in {"script", "link", "iframe"} or any(
            (v or "").startswith(("http:", "https:", "//"))
            for k, v in attrs
            if k in {"src", "href"}
        ):
            self.external.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        self.text.append(data)


def _parse(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _rows(parser: _ReportParser, table: str) -> list[list[str]]:
    return [row for row in parser.tables[table] if row]  # the header row has no <td>


def _pct(hits: int, total: int) -> str:
    # The design note's ROUND(100.0 * hits / total, 1): exact, half up.
    tenths = (2000 * hits + total) // (2 * total)
    return f"{tenths / 10:.1f}%"


def _bucket(confidence: float) -> str:
    # PostgreSQL's ROUND(real::numeric, 1): 6 significant digits, then half up.
    return str(Decimal(f"{confidence:.6g}").quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


@pytest.fixture
def seeded(db_url: str, tmp_path: Path) -> dict[str, Any]:
    rows = synthetic_logs(400, days=6, seed=1)
    old = synthetic_logs(50, now=NOW - timedelta(days=8), days=1, seed=2)  # outside a 7-day window
    insert_logs(db_url, rows + old)
    models_dir = tmp_path / "models"
    write_registry(models_dir)
    return {"url": db_url, "rows": rows, "models_dir": models_dir}


def test_report_sections_images_and_numbers_match_the_database(
    seeded: dict[str, Any], tmp_path: Path
) -> None:
    output = tmp_path / "out" / "report.html"
    data = write_report(output, seeded["url"], days=7, models_dir=seeded["models_dir"], now=NOW)
    rows: list[dict[str, Any]] = seeded["rows"]
    parser = _parse(output)

    assert parser.sections == list(SECTIONS)
    assert parser.external == []  # self-contained: no scripts, stylesheets or remote images
    assert len(parser.images) == 6
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == "PNG"
            assert image.width > 300 and image.height > 100

    # Summary and intent distribution.
    assert data.total == len(rows) == 400
    per_intent = Counter(r["predicted_intent"] for r in rows)
    corrections = Counter(r["predicted_intent"] for r in rows if r["corrected_intent"])
    intent_rows = _rows(parser, "intent-table")
    assert [r[0] for r in intent_rows] == [
        k for k, _ in sorted(per_intent.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    for name, count, share, avg, corrected in intent_rows:
        conf = [r["confidence"] for r in rows if r["predicted_intent"] == name]
        assert int(count) == per_intent[name]
        assert share == _pct(per_intent[name], 400)
        assert avg == f"{sum(conf) / len(conf):.3f}"
        assert int(corrected) == corrections[name]

    # Confidence histogram.
    buckets = Counter(_bucket(r["confidence"]) for r in rows)
    assert {r[0]: int(r[1]) for r in _rows(parser, "confidence-table")} == dict(buckets)

    # Success rate by intent (the design note's rounding: one decimal, half up).
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        if r["was_successful"] is not None:
            outcomes[r["predicted_intent"]].append(r["was_successful"])
    table = {r[0]: r[1:] for r in _rows(parser, "success-table")}
    assert set(table) == set(outcomes)
    for name, values in outcomes.items():
        total, successes = len(values), sum(values)
        tenths = (2000 * successes + total) // (2 * total)
        assert table[name] == [str(total), str(successes), f"{tenths / 10:.1f}%"]

    # Per-day correction and low-confidence rates (UTC days).
    days: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        days[r["created_at"].date().isoformat()].append(r)
    low = {d: sum(r["confidence"] < as_real(0.7) for r in rs) for d, rs in days.items()}
    fixed = {d: sum(r["corrected_intent"] is not None for r in rs) for d, rs in days.items()}
    assert _rows(parser, "low-confidence-table") == [
        [d, str(len(days[d])), str(low[d]), _pct(low[d], len(days[d]))] for d in sorted(days)
    ]
    assert _rows(parser, "correction-daily-table") == [
        [d, str(len(days[d])), str(fixed[d]), _pct(fixed[d], len(days[d]))] for d in sorted(days)
    ]
    text = " ".join(parser.text)
    assert f"{sum(fixed.values())} of 400 prompts corrected" in text

    # Model versions from the registry.
    assert _rows(parser, "models-table") == [
        ["1", "2026-11-05 12:00", "84.2%", "0.810", "–", ""],
        ["2", "2026-11-12 12:00", "83.5%", "0.800", "rejected", ""],
        ["3", "2026-11-19 12:00", "88.7%", "0.860", "promoted", "yes"],
    ]


def test_empty_state(db_url: str, tmp_path: Path) -> None:
    output = tmp_path / "report.html"
    data = write_report(output, db_url, days=7, models_dir=tmp_path / "no-models", now=NOW)
    assert data.total == 0
    parser = _parse(output)
    assert parser.sections == list(SECTIONS)
    assert parser.images == []
    text = " ".join(parser.text)
    assert text.count("No prompts were logged in the last 7 days.") == 4
    assert "No workflow outcomes were reported in this window." in text
    assert "The model registry is empty" in text


def test_intent_names_are_escaped(db_url: str, tmp_path: Path) -> None:
    rows = synthetic_logs(5, days=1, seed=3)
    for r in rows:
        r["predicted_intent"] = "<script>alert(1)</script>"
    insert_logs(db_url, rows)
    output = tmp_path / "report.html"
    write_report(output, db_url, days=7, models_dir=tmp_path / "none", now=NOW)
    html = output.read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_cli(
    sqlite_url: str, home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sqlalchemy import text

    from capture.db import get_sync_engine
    from deployments.cli import app

    with get_sync_engine(sqlite_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    insert_logs(sqlite_url, synthetic_logs(60, days=3, seed=4))
    write_registry(home / "models")
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    output = tmp_path / "cli-report.html"
    result = CliRunner().invoke(
        app, ["report", "--days", "7", "--output", str(output), "--now", NOW.isoformat()]
    )
    assert result.exit_code == 0, result.output
    assert "60" in result.output
    parser = _parse(output)
    assert parser.sections == list(SECTIONS)
    assert len(parser.images) == 6
    assert [r[0] for r in _rows(parser, "models-table")] == ["1", "2", "3"]

    bad = CliRunner().invoke(app, ["report", "--now", "yesterday"])
    assert bad.exit_code == 2
    assert "--now" in bad.output


def test_markdown_has_the_same_figures(seeded: dict[str, Any], tmp_path: Path) -> None:
    data = write_report(
        tmp_path / "r.html", seeded["url"], days=7, models_dir=seeded["models_dir"], now=NOW
    )
    markdown = render_markdown(data)
    for title in (
        "Confidence histogram",
        "Intent distribution",
        "Workflow success rate by intent",
        "Per day",
        "Model versions",
    ):
        assert f"## {title}" in markdown
    for intent in data.intents:
        assert f"| {intent.predicted_intent} | {intent.count} |" in markdown


def test_publish_monitoring_artifact(prefect_harness: None, seeded: dict[str, Any]) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    @flow
    def publish() -> dict[str, Any]:
        return publish_monitoring_artifact(
            seeded["url"], 7, models_dir=seeded["models_dir"], now=NOW
        )

    summary = publish()
    assert summary["prompts"] == 400
    markdown = Artifact.get(ARTIFACT_KEY)
    table = Artifact.get(ARTIFACT_TABLE_KEY)
    assert markdown is not None and table is not None
    assert "## Intent distribution" in str(markdown.data)
    assert "book_meeting" in str(table.data)


# --------------------------------------------------------------------------- A/B tests


def _history(models_dir: Path, rows: list[dict[str, Any]]) -> None:
    import json

    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (models_dir / "history.jsonl").write_text(lines, encoding="utf-8")


def _ab_traffic(url: str) -> dict[str, Any]:
    """A shadow phase of candidate 4 beside champion 3 (6 to 4 days ago), then a canary of 4
    at 50 % (4 days ago to now): log rows, outcomes, corrections and shadow predictions."""
    import uuid

    from sqlalchemy import insert, text

    from capture.db import get_sync_engine
    from capture.ids import uuid7
    from capture.shadow import SHADOW_TABLE, shadow_predictions

    shadow_rows: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []

    def log(i: int, created: Any, version: str, intent: str, **extra: Any) -> dict[str, Any]:
        row = {
            "id": uuid7(),
            "user_id": uuid.UUID(int=i + 1),
            "prompt": f"ab prompt {i}",
            "predicted_intent": intent,
            "confidence": 0.9,
            "corrected_intent": None,
            "was_successful": None,
            "workflow_type": intent,
            "model_version": version,
            "created_at": created,
            "updated_at": created,
            **extra,
        }
        logs.append(row)
        return row

    # Shadow: 200 prompts answered by 3; the candidate agrees on 150. Of the 50 disagreements,
    # 20 are corrected to the candidate's intent, 10 to the champion's, 5 to a third one, 8
    # failed uncorrected and 7 have no evidence.
    for i in range(200):
        created = NOW - timedelta(days=6) + timedelta(minutes=10 * i)
        shadow_intent = "book_meeting" if i < 150 else "cancel_meeting"
        extra: dict[str, Any] = {"was_successful": True}
        if 150 <= i < 170:
            extra = {"corrected_intent": "cancel_meeting"}
        elif 170 <= i < 180:
            extra = {"corrected_intent": "book_meeting"}
        elif 180 <= i < 185:
            extra = {"corrected_intent": "set_reminder"}
        elif 185 <= i < 193:
            extra = {"was_successful": False}
        elif i >= 193:
            extra = {}
        row = log(i, created, "3", "book_meeting", **extra)
        shadow_rows.append(
            {
                "log_id": row["id"],
                "log_created_at": created,
                "candidate_version": "4",
                "champion_version": "3",
                "predicted_intent": shadow_intent,
                "confidence": 0.8,
                "predicted_at": created,
            }
        )
    # Canary: 1,000 prompts, every other one answered by the candidate; the champion's
    # workflows succeed 9 in 10, the candidate's 7 in 10; every 25th prompt is corrected.
    for i in range(1000):
        created = NOW - timedelta(days=4) + timedelta(minutes=5 * i + 1)
        version = "4" if i % 2 else "3"
        k = i // 2
        ok = (k % 10) != 0 if version == "3" else (k % 10) < 7
        intent = "check_weather" if k % 3 == 0 else "book_meeting"
        corrected = "set_reminder" if i % 25 == 0 else None
        log(1000 + i, created, version, intent, was_successful=ok, corrected_intent=corrected)
    with get_sync_engine(url).begin() as conn:
        conn.execute(text(f"DELETE FROM {SHADOW_TABLE}"))
    insert_logs(url, logs)
    with get_sync_engine(url).begin() as conn:
        conn.execute(insert(shadow_predictions), shadow_rows)
    return {"logs": logs}


def test_ab_tests_in_the_window_get_a_section_each(db_url: str, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    write_registry(models_dir)
    at = {k: (NOW - timedelta(days=d)).isoformat() for k, d in (("old", 30), ("gone", 25))}
    _history(
        models_dir,
        [
            # Before the 7-day window: not shown.
            {"at": at["old"], "action": "candidate-set", "version": "2", "mode": "shadow",
             "share": 0.0, "champion": "1"},
            {"at": at["gone"], "action": "candidate-clear", "version": "2", "reason": "old"},
            {"at": (NOW - timedelta(days=6)).isoformat(), "action": "candidate-set",
             "version": "4", "mode": "shadow", "share": 0.0, "champion": "3"},
            {"at": (NOW - timedelta(days=4)).isoformat(), "action": "candidate-set",
             "version": "4", "mode": "canary", "share": 0.5, "champion": "3",
             "reason": "agrees with the champion on 75.0% of prompts"},
        ],
    )  # fmt: skip
    logs = _ab_traffic(db_url)["logs"]
    output = tmp_path / "ab.html"
    data = write_report(output, db_url, days=7, models_dir=models_dir, now=NOW)
    parser = _parse(output)
    assert parser.sections == [*SECTIONS, "ab-1", "ab-2"]
    text = " ".join(" ".join(parser.text).split())

    # ab-1: the canary, still under test. Per arm: prompts, users, outcomes, success rate with
    # its Wilson interval, correction rate, all from the rows.
    canary = [r for r in logs if r["created_at"] >= NOW - timedelta(days=4)]
    expected = []
    for arm, version in (("champion", "3"), ("candidate", "4")):
        rows = [r for r in canary if r["model_version"] == version]
        wins = sum(bool(r["was_successful"]) for r in rows)
        fixed = sum(r["corrected_intent"] is not None for r in rows)
        low, high = wilson_interval(wins, len(rows))
        expected.append(
            [arm, version, str(len(rows)), str(len(rows)), str(len(rows)),
             _pct(wins, len(rows)), f"[{100 * low:.1f}%, {100 * high:.1f}%]",
             _pct(fixed, len(rows))]
        )  # fmt: skip
    assert _rows(parser, "ab-arms-1") == expected
    assert expected[0][5] == "90.0%" and expected[1][5] == "70.0%"
    # The decision the hourly ab-check takes now: 20 points worse is significantly worse.
    assert "candidate v4 vs champion v3" in text
    assert "Mode canary (50% of users)" in text
    assert "Decision the ab-check takes now: rollback — significantly worse" in text
    assert "Success rate, candidate − champion: -20.00 points" in text
    # Per answered intent, both arms with their support.
    per_intent = {r[0]: r[1:] for r in _rows(parser, "ab-intent-1")}
    for intent in ("book_meeting", "check_weather"):
        cells = []
        for version in ("3", "4"):
            rows = [r for r in canary if r["model_version"] == version]
            rows = [r for r in rows if r["predicted_intent"] == intent]
            cells += [str(len(rows)), _pct(sum(bool(r["was_successful"]) for r in rows), len(rows))]
        assert per_intent[intent] == cells
    assert "ab-shadow-1" not in parser.tables  # a canary has no shadow predictions

    # ab-2: the shadow phase, ended when it moved on to the canary.
    assert "Ended: go-canary — agrees with the champion on 75.0% of prompts." in text
    low, high = wilson_interval(150, 158)  # 150 successes, 8 failures; 35 corrected
    assert _rows(parser, "ab-arms-2") == [
        [
            "champion",
            "3",
            "200",
            "200",
            "158",
            "94.9%",
            f"[{100 * low:.1f}%, {100 * high:.1f}%]",
            "17.5%",
        ],
        ["candidate", "4", "0", "0", "0", "–", "–", "–"],
    ]
    assert _rows(parser, "ab-shadow-2") == [
        ["compared (candidate predicted after the champion answered)", "200", "100.0%"],
        ["agreed with the champion", "150", "75.0%"],
        ["disagreed", "50", "25.0%"],
        ["disagreements later corrected", "35", "70.0%"],
        ["… corrected to the candidate's intent (candidate right)", "20", "57.1%"],
        ["… corrected to the champion's intent (champion right)", "10", "28.6%"],
        ["… corrected to another intent (neither right)", "5", "14.3%"],
        ["disagreements whose workflow failed, uncorrected (champion wrong)", "8", "16.0%"],
    ]
    # The same readouts in the markdown artifact.
    markdown = render_markdown(data)
    assert "## A/B readout: candidate 4 vs champion 3" in markdown
    assert "**Decision: rollback**" in markdown and "**Ended: go-canary**" in markdown
