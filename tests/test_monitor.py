"""Alerts: window statistics, breach rules, the stale-cycle check, and real webhook delivery to a
local HTTP receiver (each alert once, bounded retries, unreachable endpoints reported and retried
by a later run). The hour loop (DST, late, missed and overlapping runs) is
tests/test_monitor_hours.py's."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from capture.db import get_sync_engine
from capture.ids import uuid7
from capture.monitor_statements import ALERTS
from capture.values import as_real
from flows.monitor import monitor_flow
from tasks.alert_delivery import send_webhook, slack_payload
from tasks.monitor import (
    AlertThresholds,
    ScopeStats,
    check_cycle,
    collect_window_stats,
    find_breaches,
    last_cycle_success,
    record_cycle_success,
    window_id,
)
from tests.conftest import TABLES_TO_CLEAN
from tests.report_data import insert_logs, write_registry

NOW = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)


class Receiver:
    """A real HTTP endpoint on 127.0.0.1 (random port) that records JSON bodies it is POSTed.

    ``statuses`` are answered first, one per request, then 200.
    """

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.requests = 0
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.requests += 1
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"try later")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/alerts"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"  # nothing listens there any more


def _row(intent: str, at: datetime, **values: Any) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "prompt": f"prompt for {intent}",
        "predicted_intent": intent,
        "confidence": as_real(values.pop("confidence", 0.95)),
        "was_successful": values.pop("was_successful", True),
        "corrected_intent": values.pop("corrected_intent", None),
        "created_at": at,
        "updated_at": at,
    }


def _seed_incident(url: str) -> None:
    """transfer_money fails 12 of 30 times in the window; check_weather fell from 40 to 5
    prompts; book_meeting is healthy; set_reminder has 3 bad prompts (too few to alert)."""
    current = NOW - timedelta(minutes=45)  # 11:45 .. inside (11:30, 12:30] and (11:40, 12:40]
    previous = NOW - timedelta(minutes=105)  # 10:45 .. inside the window before
    rows = []
    for i in range(30):
        rows.append(_row("transfer_money", current + timedelta(seconds=i), was_successful=i >= 12))
    for i in range(5):
        rows.append(_row("check_weather", current + timedelta(seconds=i)))
    for i in range(40):
        rows.append(_row("check_weather", previous + timedelta(seconds=i)))
    for i in range(50):
        rows.append(_row("book_meeting", current + timedelta(seconds=i)))
        rows.append(_row("book_meeting", previous + timedelta(seconds=i)))
    for i in range(3):
        rows.append(
            _row(
                "set_reminder", current + timedelta(seconds=i), confidence=0.2, was_successful=False
            )
        )
    rows.append(_row("book_meeting", NOW - timedelta(hours=5)))  # outside both windows
    insert_logs(url, rows)


# --------------------------------------------------------------------------- statistics


def test_window_stats(db_url: str) -> None:
    _seed_incident(db_url)
    stats = collect_window_stats(db_url, now=NOW, window=HOUR, low_confidence_threshold=0.7)
    by_scope = {s.scope: s for s in stats}
    assert stats[0].scope == "overall"
    assert by_scope["transfer_money"] == ScopeStats(
        "transfer_money", total=30, outcomes=30, failures=12, previous_total=0
    )
    assert by_scope["check_weather"] == ScopeStats(
        "check_weather", total=5, outcomes=5, previous_total=40
    )
    assert by_scope["set_reminder"] == ScopeStats(
        "set_reminder", total=3, low_confidence=3, outcomes=3, failures=3
    )
    assert by_scope["overall"] == ScopeStats(
        "overall", total=88, low_confidence=3, outcomes=88, failures=15, previous_total=90
    )


def test_breach_rules_and_minimum_counts() -> None:
    stats = [
        ScopeStats("overall", total=200, low_confidence=90, corrections=10, outcomes=100,
                   failures=15, previous_total=210),
        ScopeStats("a", total=25, corrections=5, outcomes=20, failures=5, previous_total=30),
        ScopeStats("tiny", total=5, low_confidence=5, corrections=5, outcomes=5, failures=5),
        ScopeStats("gone", total=0, previous_total=20),
        ScopeStats("few_before", total=0, previous_total=19),
    ]  # fmt: skip
    breaches = find_breaches(stats, AlertThresholds(min_count=20))
    assert sorted(b.key for b in breaches) == [
        "correction_rate:a",  # 5/25 = 20% > 15%
        "failure_rate:a",  # 5/20 = 25% > 20%
        "low_confidence_rate:overall",  # 90/200 = 45% > 40%
        "traffic_drop:gone",  # 20 -> 0
    ]
    failure = next(b for b in breaches if b.key == "failure_rate:a")
    assert failure.value == pytest.approx(0.25)
    assert failure.sample == 20
    assert "25.0% (5 of 20 failed workflows; limit 20%)" in failure.message
    # Raising the limits silences them; a lower minimum lets the tiny sample alert.
    assert find_breaches(stats, AlertThresholds(max_failure_rate=0.5, max_correction_rate=0.5,
                         max_low_confidence_rate=0.5, max_traffic_drop=1.0)) == []  # fmt: skip
    assert "failure_rate:tiny" in {
        b.key for b in find_breaches(stats, AlertThresholds(min_count=5))
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_failure_rate": 1.5}, "max_failure_rate"),
        ({"min_count": 0}, "min_count: expected a positive integer"),
        ({"max_cycle_age_days": 0}, "max_cycle_age_days"),
    ],
)
def test_bad_thresholds(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlertThresholds(**kwargs)


def test_window_id_is_aligned() -> None:
    assert window_id(NOW, HOUR) == "2026-11-26T12:00:00+00:00"
    assert window_id(NOW + timedelta(minutes=29), HOUR) == window_id(NOW, HOUR)
    assert window_id(NOW + timedelta(minutes=30), HOUR) == "2026-11-26T13:00:00+00:00"


# --------------------------------------------------------------------------- weekly cycle


def test_cycle_marker_and_registry_fallback(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert last_cycle_success(db_url, home) is None
    never = check_cycle(db_url, home, now=NOW, max_age_days=8)
    assert never is not None and "never succeeded" in never.message
    assert never.hour == datetime(2026, 11, 26, 11, tzinfo=UTC)  # the last completed hour

    write_registry(home / "models", now=NOW - timedelta(days=3))  # newest version: 10 days old
    assert last_cycle_success(db_url, home) == NOW - timedelta(days=10)
    stale = check_cycle(db_url, home, now=NOW, max_age_days=8)
    assert stale is not None
    assert stale.key == "stale_cycle:weekly_cycle"
    assert stale.value == pytest.approx(10.0)
    assert "10.0 days ago" in stale.message

    # The success time is kept in the database (migration 0006), not in a file under HOME.
    assert record_cycle_success(db_url, NOW - timedelta(days=2)) == NOW - timedelta(days=2)
    record_cycle_success(db_url, NOW - timedelta(days=5))  # an older time never moves it back
    assert last_cycle_success(db_url, home) == NOW - timedelta(days=2)
    assert not (home / "monitor").exists()
    assert check_cycle(db_url, home, now=NOW, max_age_days=8) is None
    later = NOW + timedelta(days=6, hours=1)
    assert check_cycle(db_url, home, now=later, max_age_days=8) is not None


def test_the_old_marker_file_is_still_read_and_a_broken_one_names_the_file(
    db_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "monitor" / "weekly_cycle.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"last_success": (NOW - timedelta(days=1)).isoformat()}))
    assert last_cycle_success(db_url, tmp_path) == NOW - timedelta(days=1)
    marker.write_text('{"last_success": "last tuesday"}')
    with pytest.raises(ValueError, match=r"weekly_cycle\.json: expected an ISO 8601 time"):
        last_cycle_success(db_url, tmp_path)


# --------------------------------------------------------------------------- delivery


def test_webhook_retries_with_backoff_then_succeeds() -> None:
    calls: list[int] = []
    statuses = [503, 429, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        assert json.loads(request.content) == {"text": "hi"}
        return httpx.Response(statuses[len(calls) - 1])

    sleeps: list[float] = []
    delivery = send_webhook(
        "http://alerts.invalid/hook",
        {"text": "hi"},
        attempts=4,
        backoff_s=0.5,
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
    )
    assert delivery.ok and delivery.attempts == 3
    assert sleeps == [0.5, 1.0]


def test_webhook_client_error_is_not_retried() -> None:
    sleeps: list[float] = []
    delivery = send_webhook(
        "http://alerts.invalid/hook",
        {"text": "hi"},
        transport=httpx.MockTransport(lambda request: httpx.Response(404, text="no such hook")),
        sleep=sleeps.append,
    )
    assert not delivery.ok and delivery.attempts == 1
    assert delivery.error == "HTTP 404: no such hook"
    assert sleeps == []


def test_unreachable_webhook_is_retried_and_reported() -> None:
    sleeps: list[float] = []
    delivery = send_webhook(_closed_port_url(), {"text": "hi"}, attempts=3, sleep=sleeps.append)
    assert not delivery.ok
    assert delivery.attempts == 3
    assert "ConnectError" in (delivery.error or "")
    assert sleeps == [1.0, 2.0]


def test_slack_payload_shape() -> None:
    breaches = find_breaches(
        [ScopeStats("overall", total=50, outcomes=50, failures=25)], AlertThresholds()
    )
    payload = slack_payload(breaches, window_start=NOW - HOUR, window_end=NOW)
    assert set(payload) == {"text", "blocks"}
    assert payload["text"].startswith("Prompt Capture: 1 alert (window 2026-11-26 11:30")
    assert payload["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Prompt Capture: 1 alert"},
    }
    section = payload["blocks"][2]
    assert section["type"] == "section" and section["block_id"] == "failure_rate:overall"
    assert "50.0% (25 of 50 failed workflows" in section["text"]["text"]
    json.dumps(payload)  # serialisable as is


# --------------------------------------------------------------------------- the flow


def _run(home: Path, url: str, **kwargs: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "database_url": url,
        "home": str(home),
        "now": NOW,
        "retry_backoff_s": 0.01,
    }
    params.update(kwargs)
    return monitor_flow(**params)


def _alert_rows(url: str) -> list[tuple[str, str, str, str]]:
    """(check:scope, channel, hour, status) of every alert row."""
    with get_sync_engine(url).connect() as conn:
        rows = conn.execute(select(ALERTS)).all()
    hours = {r.id: r.hour.replace(tzinfo=None).isoformat() for r in rows}
    return sorted((f"{r.check_name}:{r.scope}", r.channel, hours[r.id], r.status) for r in rows)


def test_monitor_flow_notifies_each_alert_once(
    prefect_harness: None, db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    _seed_incident(db_url)
    home = tmp_path / "home"
    write_registry(home / "models", now=NOW - timedelta(days=3))  # cycle 10 days old: stale

    first = _run(home, db_url, webhook_url=receiver.url)
    expected = {
        "failure_rate:transfer_money",
        "traffic_drop:check_weather",
        "stale_cycle:weekly_cycle",
    }
    # The first run checks the last completed hour: 11:00-12:00 UTC.
    assert first["hours_checked"] == ["2026-11-26T11:00:00+00:00"]
    assert first["window_start"] == "2026-11-26T11:00:00+00:00"
    assert first["window_end"] == "2026-11-26T12:00:00+00:00"
    assert {b["key"] for b in first["breaches"]} == expected
    assert {b["hour"] for b in first["breaches"]} == {"2026-11-26T11:00:00+00:00"}
    assert set(first["new"]) == expected
    assert first["delivery_errors"] == []
    assert first["prompts"] == 88 and first["previous_prompts"] == 90
    assert len(receiver.bodies) == 1
    payload = receiver.bodies[0]
    assert payload["text"].startswith("Prompt Capture: 3 alerts")
    assert "11:00–12:00 UTC: workflow failure rate" in payload["text"]
    assert "40.0% (12 of 30 failed workflows; limit 20%)" in payload["text"]
    assert "traffic of intent `check_weather` dropped 88%: 5 prompts" in payload["text"]
    assert "weekly cycle last succeeded 10.0 days ago" in payload["text"]
    assert {b.get("block_id") for b in payload["blocks"][2:]} == {
        f"{key}@2026-11-26T11:00Z" for key in expected
    }

    # Ten minutes later: no new completed hour; the stale-cycle alert of this hour is held.
    second = _run(home, db_url, webhook_url=receiver.url, now=NOW + timedelta(minutes=10))
    assert second["hours_checked"] == []
    assert [b["key"] for b in second["breaches"]] == ["stale_cycle:weekly_cycle"]
    assert second["new"] == []
    assert second["suppressed"] == ["stale_cycle:weekly_cycle"]
    assert second["deliveries"] == []
    assert len(receiver.bodies) == 1 and receiver.requests == 1

    # What was sent is in the database, not in HOME/monitor/alerts_sent.json.
    assert not (home / "monitor").exists()
    assert _alert_rows(db_url) == sorted(
        (key, "webhook", "2026-11-26T11:00:00", "sent") for key in expected
    )


def test_unreachable_webhook_never_crashes_the_flow_and_is_retried_later(
    prefect_harness: None, db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    _seed_incident(db_url)
    home = tmp_path / "home"
    record_cycle_success(db_url, NOW - timedelta(days=1))

    failed = _run(home, db_url, webhook_url=_closed_port_url(), delivery_attempts=3)
    assert len(failed["breaches"]) == 2
    assert failed["deliveries"][0]["ok"] is False
    assert failed["deliveries"][0]["attempts"] == 3
    assert len(failed["delivery_errors"]) == 1
    assert "ConnectError" in failed["delivery_errors"][0]
    assert {row[3] for row in _alert_rows(db_url)} == {"failed"}

    # A later run (no new hour to check), the endpoint reachable: the failed alerts go out.
    retried = _run(home, db_url, webhook_url=receiver.url, now=NOW + timedelta(minutes=5))
    assert retried["hours_checked"] == [] and retried["new"] == []
    assert sorted(retried["retried"]) == [
        "failure_rate:transfer_money",
        "traffic_drop:check_weather",
    ]
    assert retried["delivery_errors"] == []
    assert len(receiver.bodies) == 1
    assert "Prompt Capture: 2 alerts" in receiver.bodies[0]["text"]
    assert {row[3] for row in _alert_rows(db_url)} == {"sent"}
    # ... and never again.
    again = _run(home, db_url, webhook_url=receiver.url, now=NOW + timedelta(minutes=15))
    assert again["retried"] == [] and again["deliveries"] == []
    assert len(receiver.bodies) == 1


@pytest.fixture
def clean_sqlite(sqlite_url: str) -> str:
    """The session's SQLite database with empty tables (as ``db_url`` leaves them)."""
    with get_sync_engine(sqlite_url).begin() as conn:
        for table in TABLES_TO_CLEAN:
            conn.execute(text(f"DELETE FROM {table}"))
    return sqlite_url


def test_server_errors_are_retried_against_a_real_endpoint(
    prefect_harness: None, clean_sqlite: str, tmp_path: Path
) -> None:
    sqlite_url = clean_sqlite
    _seed_incident(sqlite_url)
    home = tmp_path / "home"
    record_cycle_success(sqlite_url, NOW)
    with Receiver(statuses=[503, 500]) as flaky:
        result = _run(home, sqlite_url, webhook_url=flaky.url, delivery_attempts=3)
        assert flaky.requests == 3
        assert len(flaky.bodies) == 1
    assert result["deliveries"] == [
        {"channel": "webhook", "ok": True, "attempts": 3, "error": None}
    ]


def test_no_breach_sends_nothing(
    prefect_harness: None, db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    insert_logs(db_url, [_row("book_meeting", NOW - timedelta(minutes=m)) for m in range(31, 70)])
    home = tmp_path / "home"
    record_cycle_success(db_url, NOW - timedelta(days=7))
    result = _run(home, db_url, webhook_url=receiver.url)
    assert result["breaches"] == [] and result["new"] == []
    assert receiver.requests == 0


def test_prefect_notification_block(
    prefect_harness: None, clean_sqlite: str, tmp_path: Path, receiver: Receiver
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    sqlite_url = clean_sqlite
    CustomWebhookNotificationBlock(
        name="prompt-capture-test",
        url=receiver.url,
        method="POST",
        json_data={"text": "{{subject}}\n{{body}}"},
        headers=None,
        cookies=None,
        allow_private_urls=True,
    ).save("alerts-test", overwrite=True)
    home = tmp_path / "home"  # empty: the cycle has never succeeded
    result = _run(
        home,
        sqlite_url,
        notification_block="custom-webhook/alerts-test",
        now=datetime(2030, 1, 1, tzinfo=UTC),
    )
    assert [b["key"] for b in result["breaches"]] == ["stale_cycle:weekly_cycle"]
    assert result["deliveries"] == [
        {"channel": "block:custom-webhook/alerts-test", "ok": True, "attempts": 1, "error": None}
    ]
    assert len(receiver.bodies) == 1
    assert receiver.bodies[0]["text"].startswith("Prompt Capture: 1 alert\n")
    assert "the weekly cycle has never succeeded" in receiver.bodies[0]["text"]

    missing = _run(
        tmp_path / "other", sqlite_url, notification_block="custom-webhook/no-such-block",
        now=datetime(2030, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    assert missing["deliveries"][0]["ok"] is False
    assert "cannot load block" in missing["delivery_errors"][0]
