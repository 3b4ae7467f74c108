"""The monitor's hour loop (issue 13, case 7 and the overlapping runs of case 10): every aligned
UTC hour is checked exactly once whatever the time zone of the schedule, DST, a late, a missed or
a doubled run; two monitor processes released together never send one alert twice."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from capture.db import get_sync_engine
from capture.monitor_statements import ALERTS, HOURS
from capture.offline_statements import ParameterError
from capture.values import from_db_datetime
from tasks.alert_delivery import deliver_alerts
from tasks.monitor import AlertThresholds
from tasks.monitor_hours import MonitorCheck, check_hours, due_hours, hour_start
from tests.barrier import Children
from tests.report_data import insert_logs
from tests.test_monitor import Receiver, _row

H = timedelta(hours=1)
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --------------------------------------------------------------------------- due hours


@pytest.mark.parametrize(
    ("last", "now", "due", "skipped"),
    [
        # The first run ever checks the last completed hour.
        (None, T0 + timedelta(minutes=5), [T0 - H], None),
        # On time, hourly: the hour that just completed.
        (T0 - 2 * H, T0 + timedelta(minutes=5), [T0 - H], None),
        # Late (55 minutes past): still only what completed; the next hour is not complete.
        (T0 - 2 * H, T0 + timedelta(minutes=55), [T0 - H], None),
        # Exactly on the hour: the hour that ends now is complete.
        (T0 - 2 * H, T0, [T0 - H], None),
        # Already checked: nothing is due (a second run in the same hour).
        (T0 - H, T0 + timedelta(minutes=59), [], None),
        # Two runs missed: the next one catches up on all three hours.
        (T0 - 4 * H, T0 + timedelta(minutes=5), [T0 - 3 * H, T0 - 2 * H, T0 - H], None),
        # Down for longer than the catch-up limit (4 here): the rest is reported as skipped.
        (T0 - 10 * H, T0 + timedelta(minutes=5), [T0 - 4 * H + k * H for k in range(4)],
         (T0 - 9 * H, T0 - 4 * H)),
    ],
)  # fmt: skip
def test_due_hours(
    last: datetime | None,
    now: datetime,
    due: list[datetime],
    skipped: tuple[datetime, datetime] | None,
) -> None:
    assert due_hours(last, now, 4) == (due, skipped)


def test_hour_start_is_utc_whatever_the_zone() -> None:
    from zoneinfo import ZoneInfo

    london = datetime(2026, 10, 25, 1, 30, tzinfo=ZoneInfo("Europe/London"), fold=1)  # GMT
    assert hour_start(london) == _utc(2026, 10, 25, 1)
    bst = london.replace(fold=0)  # the first 01:30, BST = 00:30 UTC
    assert hour_start(bst) == _utc(2026, 10, 25, 0)


def test_a_bad_catch_up_limit_is_a_user_error_before_any_io(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="max_catch_up_hours: expected a positive integer"):
        check_hours(
            "postgresql://nobody@127.0.0.1:1/none",
            tmp_path,
            now=T0,
            thresholds=AlertThresholds(),
            max_catch_up_hours=0,
        )


# --------------------------------------------------------------------------- DST


def _prefect_run_times(timezone: str, start: datetime, end: datetime) -> list[datetime]:
    """When Prefect's scheduler runs a ``5 * * * *`` deployment in ``timezone`` (the server's
    own CronSchedule, which the scheduler service uses to create the runs)."""
    from prefect.server.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron="5 * * * *", timezone=timezone)
    dates = asyncio.run(schedule.get_dates(start=start, end=end))
    return [datetime.fromtimestamp(d.timestamp(), UTC) for d in dates]


TRANSITIONS = [
    # zone, the UTC instant the clocks change, a 100%-failure burst in the hour at risk
    ("Europe/London", _utc(2026, 3, 29, 1), _utc(2026, 3, 29, 0, 30)),
    ("Europe/London", _utc(2026, 10, 25, 1), _utc(2026, 10, 25, 0, 30)),  # the night
    ("America/New_York", _utc(2026, 3, 8, 7), _utc(2026, 3, 8, 6, 30)),
    ("America/New_York", _utc(2026, 11, 1, 6), _utc(2026, 11, 1, 5, 30)),
]


def _variant(runs: list[datetime], variant: str) -> list[datetime]:
    if variant == "as scheduled":
        return runs
    if variant == "a run missed, one late":
        return [t + timedelta(minutes=50) if k == 3 else t for k, t in enumerate(runs) if k != 6]
    assert variant == "every run twice"
    return [t for t in runs for _ in range(2)]


@pytest.mark.parametrize("variant", ["as scheduled", "a run missed, one late", "every run twice"])
@pytest.mark.parametrize("case", TRANSITIONS, ids=[f"{z}-{t:%b%d}" for z, t, _ in TRANSITIONS])
def test_every_utc_hour_is_checked_exactly_once_across_dst(
    db_url: str, tmp_path: Path, case: tuple[str, datetime, datetime], variant: str
) -> None:
    zone, transition, burst = case
    insert_logs(db_url, [_row("transfer_money", burst + timedelta(seconds=i),
                              was_successful=False) for i in range(30)])  # fmt: skip
    scheduled = _prefect_run_times(zone, transition - 6 * H, transition + 6 * H)
    if zone == "Europe/London" and transition.month == 10:
        # What the issue saw: 00:05 UTC, then 02:05 UTC; the hour 00:05-01:05 had no run.
        assert _utc(2026, 10, 25, 0, 5) in scheduled and _utc(2026, 10, 25, 2, 5) in scheduled
        assert _utc(2026, 10, 25, 1, 5) not in scheduled
    runs = _variant(scheduled, variant)
    checked: list[datetime] = []
    with Receiver() as receiver:
        for now in runs:
            check = check_hours(
                db_url,
                tmp_path,
                now=now,
                thresholds=AlertThresholds(),
                channels=["webhook"],
                check_weekly_cycle=False,
            )
            checked.extend(h.hour for h in check.hours)
            result = deliver_alerts(db_url, check, webhook_url=receiver.url, backoff_s=0.01)
            assert result.errors == []
    # Every UTC hour from the first run's to the last run's, once, and nothing else.
    span = hour_start(runs[0]) - H, hour_start(runs[-1]) - H
    expected = [span[0] + k * H for k in range(int((span[1] - span[0]) / H) + 1)]
    assert sorted(checked) == expected
    assert len(checked) == len(set(checked))
    with get_sync_engine(db_url).connect() as conn:
        stored = [from_db_datetime(h) for h in conn.execute(select(HOURS.c.hour)).scalars()]
    assert sorted(h for h in stored if h is not None) == expected
    # The burst is alerted, once, as the failure rate of its own hour (not diluted).
    blocks = [b["block_id"] for body in receiver.bodies for b in body["blocks"][2:]]
    assert len(blocks) == len(set(blocks))  # no alert twice
    burst_hour = hour_start(burst)
    assert Counter(blocks)[f"failure_rate:overall@{burst_hour:%Y-%m-%dT%H:%MZ}"] == 1
    assert Counter(blocks)[f"failure_rate:transfer_money@{burst_hour:%Y-%m-%dT%H:%MZ}"] == 1
    text = "\n".join(body["text"] for body in receiver.bodies)
    assert f"{burst_hour:%H:%M}–{burst_hour + H:%H:%M} UTC: workflow failure rate" in text
    assert "100.0% (30 of 30 failed workflows" in text


def test_the_monitor_logs_what_it_checked(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    insert_logs(db_url, [_row("transfer_money", T0 - H + timedelta(minutes=m),
                              was_successful=False) for m in range(25)])  # fmt: skip
    check_hours(db_url, tmp_path, now=T0 - 3 * H, thresholds=AlertThresholds())
    caplog.set_level(logging.INFO, logger="tasks.monitor_hours")
    caplog.clear()
    check = check_hours(
        db_url, tmp_path, now=T0 + timedelta(minutes=5), thresholds=AlertThresholds()
    )
    assert [h.hour for h in check.hours] == [T0 - 3 * H, T0 - 2 * H, T0 - H]
    summary = next(r.getMessage() for r in caplog.records if "checked" in r.getMessage())
    assert "checked 3 hour(s) 2026-11-26 09:00 – 2026-11-26 12:00 UTC" in summary
    assert "4 checks over" in summary and "breach(es)" in summary
    assert "channels none" in summary
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("failure_rate:overall (hour 2026-11-26 11:00:00+00:00)" in w for w in warnings)


# --------------------------------------------------------------------------- overlapping runs


def test_two_monitor_processes_released_together_never_send_an_alert_twice(
    db_url: str, tmp_path: Path
) -> None:
    # Six hours of incidents; the monitor last checked the hour before them.
    rows = []
    for k in range(6):
        hour = T0 - (6 - k) * H
        rows += [_row("transfer_money", hour + timedelta(minutes=10, seconds=i),
                      was_successful=i % 2 == 0) for i in range(40)]  # fmt: skip
    insert_logs(db_url, rows)
    check_hours(db_url, tmp_path, now=T0 - 6 * H, thresholds=AlertThresholds())  # state: T0-7h
    home = tmp_path / "home"  # empty registry: the stale-cycle alert is due too, once
    with Receiver() as receiver:
        for round_ in range(2):  # the second round: no new hour, only the stale-cycle alert
            children = Children("tests.monitor_child", tmp_path / f"round-{round_}")
            now = (T0 + timedelta(minutes=5 + round_)).isoformat()
            for name in (f"a{round_}", f"b{round_}"):
                children.start(name, db_url, home, now, receiver.url)
            results = children.run()
            assert all(r["errors"] == [] for r in results.values()), results
            claimed = [h for r in results.values() for h in r["hours"]]
            assert len(claimed) == len(set(claimed))  # no hour checked by both
            if round_ == 0:
                assert sorted(claimed) == [(T0 - k * H).isoformat() for k in range(6, 0, -1)]
            else:
                assert claimed == []
    blocks = [b["block_id"] for body in receiver.bodies for b in body["blocks"][2:]]
    assert len(blocks) == len(set(blocks)), Counter(blocks).most_common(3)
    with get_sync_engine(db_url).connect() as conn:
        alerts = conn.execute(select(ALERTS.c.status, ALERTS.c.run_id)).all()
        owners = {
            from_db_datetime(hour): run
            for hour, run in conn.execute(select(HOURS.c.hour, HOURS.c.run_id))
        }
    # Every alert row sent once, by the run whose insert won; 6 hours x 2 scopes + stale cycle.
    assert len(blocks) == len(alerts) == 6 * 2 + 1
    assert {status for status, _ in alerts} == {"sent"}
    assert sorted(b for b in blocks if b.startswith("stale_cycle")) == [
        f"stale_cycle:weekly_cycle@{T0 - H:%Y-%m-%dT%H:%MZ}"
    ]
    # The seed run's hour, then six hours each checked by one of the two children.
    assert sorted(h for h in owners if h is not None) == [T0 - k * H for k in range(7, 0, -1)]
    assert all(owners[T0 - k * H] in {"a0", "b0"} for k in range(1, 7))


def test_a_second_run_at_the_same_time_finds_everything_taken(db_url: str, tmp_path: Path) -> None:
    insert_logs(db_url, [_row("transfer_money", T0 - H + timedelta(seconds=i),
                              was_successful=False) for i in range(30)])  # fmt: skip
    kwargs: dict[str, Any] = {"now": T0 + timedelta(minutes=5), "thresholds": AlertThresholds()}
    first = check_hours(db_url, tmp_path, channels=["webhook"], **kwargs)
    second = check_hours(db_url, tmp_path, channels=["webhook"], **kwargs)
    assert isinstance(first, MonitorCheck) and [h.hour for h in first.hours] == [T0 - H]
    assert {p.breach.key for p in first.pending} == {
        "failure_rate:overall",
        "failure_rate:transfer_money",
        "stale_cycle:weekly_cycle",
    }
    assert second.hours == [] and second.pending == []
    assert [b.key for b in second.suppressed] == ["stale_cycle:weekly_cycle"]


def test_rows_dated_in_the_future_are_counted_by_no_completed_hour(
    db_url: str, tmp_path: Path
) -> None:
    tomorrow = T0 + timedelta(days=1, minutes=10)
    insert_logs(db_url, [_row("transfer_money", tomorrow + timedelta(seconds=i),
                              was_successful=False) for i in range(30)])  # fmt: skip
    insert_logs(db_url, [_row("book_meeting", T0 - H + timedelta(minutes=m)) for m in range(25)])
    check = check_hours(
        db_url,
        tmp_path,
        now=T0 + timedelta(minutes=5),
        thresholds=AlertThresholds(),
        check_weekly_cycle=False,
    )
    (hour,) = check.hours
    assert hour.hour == T0 - H and hour.prompts == 25 and hour.breaches == []
    assert "transfer_money" not in {s.scope for s in hour.stats}
