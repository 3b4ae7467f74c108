"""The workbench in real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium; never a downloaded browser build). A reviewer logs in, confirms, adds a note, picks an
alternative by key, types an intent, undoes, and applies a group decision: the database then
holds exactly those corrections and audit rows. Two reviewers in two browsers never see the same
leased item. A screenshot is written under the test's temp dir and its size checked.

Without Chromium the test is skipped locally and FAILS when ``CI`` is set (``.ci/run`` installs
the packages).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from capture import db
from review_ui.server import running_server
from tasks.review_export import ReviewSelection
from tasks.review_rounds import open_round
from tasks.review_tables import items
from tests.test_review_ui_support import (
    LOGS,
    NOW,
    PASSWORD,
    audit,
    clean_workbench_tables,
    corrections,
    log_row,
    make_user,
    settings_for,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ALTS = (("calendar", 0.3), ("weather", 0.2), ("banking", 0.1))


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        message = (
            f"{', '.join(missing)} missing: install Debian's packages "
            "(apt-get install -y chromium chromium-driver)"
        )
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message + "; CI requires them", pytrace=False)
        pytest.skip(message)


@pytest.fixture
def browser_factory(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Start headless Chromium sessions (each its own profile: a separate browser context)."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def start() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tmp_path / f"profile-{len(drivers)}"
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1200,900",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(30)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()
    shutil.rmtree(tmp_path / "profile-0", ignore_errors=True)


def _seed(url: str) -> dict[str, uuid.UUID]:
    """Five prompts in review order A < B < C (+2 duplicates of C) < E < F by confidence."""
    at = NOW - timedelta(hours=1)
    rows = {
        key: log_row(prompt, predicted, confidence, secondary=secondary, created_at=at)
        for key, prompt, predicted, confidence, secondary in [
            ("A", "what is my balance", "banking", 0.20, (("calendar", 0.3), ("music", 0.2))),
            ("B", "wake me at seven", "calendar", 0.25, (("weather", 0.3), ("music", 0.2))),
            ("C", "play some jazz", "music", 0.28, ALTS),
            ("C2", "Play some jazz!", "music", 0.29, ALTS),
            ("C3", "PLAY some jazz.", "music", 0.30, ALTS),
            ("E", "send 20 euro to sam", "banking", 0.40, ALTS),
            ("F", "will it snow", "weather", 0.45, ALTS),
        ]
    }
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(insert(LOGS), list(rows.values()))
    return {k: v["id"] for k, v in rows.items()}


def _shown(driver: Any) -> str:
    return str(driver.find_element("id", "item").get_attribute("data-item-id"))


def _press(driver: Any, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def _wait(driver: Any, condition: Callable[[Any], object], what: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15, poll_frequency=0.05).until(condition, message=what)


def _login(driver: Any, base: str, name: str) -> None:
    driver.get(base + "/review")
    assert "/login" in driver.current_url
    driver.find_element("id", "username").send_keys(name)
    driver.find_element("id", "password").send_keys(PASSWORD)
    driver.find_element("id", "login-button").click()
    _wait(driver, lambda d: _shown(d) not in ("", "None"), "the first item")


def _item_of(url: str, log_id: uuid.UUID) -> str:
    with db.get_sync_engine(url).connect() as conn:
        return str(conn.execute(select(items.c.id).where(items.c.log_id == log_id)).scalar_one())


def test_reviewer_session_in_chromium(
    sqlite_url: str, wb_home: Path, tmp_path: Path, browser_factory: Callable[[], Any]
) -> None:

    url = sqlite_url
    clean_workbench_tables(url)
    with db.get_sync_engine(url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM nlu_prompt_logs")
    logs = _seed(url)
    with db.get_sync_engine(url).begin() as conn:
        open_round(conn, now=NOW, selection=ReviewSelection(limit=10), double_review_share=0.0)
    make_user(url, "alice")
    make_user(url, "bob")
    item = {key: _item_of(url, logs[key]) for key in ("A", "B", "C", "E", "F")}

    with running_server(settings_for(url, wb_home)) as base:
        alice = browser_factory()
        _login(alice, base, "alice")
        assert _shown(alice) == item["A"]
        shot = tmp_path / "review.png"
        alice.save_screenshot(str(shot))
        assert shot.stat().st_size > 15_000  # a rendered page, not a blank one
        assert "what is my balance" in alice.page_source

        _press(alice, "a")  # confirm A
        _wait(alice, lambda d: _shown(d) == item["B"], "B after confirming A")
        _press(alice, "n")
        alice.find_element("id", "note-input").send_keys("asked twice\n")
        _wait(alice, lambda d: d.find_element("id", "note-shown").is_displayed(), "the note")
        _press(alice, "1")  # B -> its first alternative, weather
        _wait(alice, lambda d: _shown(d) == item["C"], "C after B")
        _press(alice, "i")
        alice.find_element("id", "intent-input").send_keys("wea\n")  # type-ahead: weather
        _wait(alice, lambda d: _shown(d) == item["E"], "E after typing an intent for C")
        _press(alice, "u")  # undo C
        _wait(alice, lambda d: _shown(d) == item["C"], "C again after undo")
        assert "group of" in alice.find_element("id", "group").text
        _press(alice, "g")
        _press(alice, "2")  # the whole group -> C's second alternative, weather
        _wait(alice, lambda d: _shown(d) not in (item["C"], ""), "the item after the group")
        alice_now = _shown(alice)

        bob = browser_factory()  # a second browser context
        _login(bob, base, "bob")
        assert _shown(bob) != alice_now
        assert {_shown(bob), alice_now} == {item["E"], item["F"]}

    assert corrections(url) == {
        logs["A"]: ("banking", None),
        logs["B"]: ("weather", "asked twice"),
        logs["C"]: ("weather", None),
        logs["C2"]: ("weather", None),
        logs["C3"]: ("weather", None),
    }
    rows = [(r.action, r.after_intent, r.reviewer, r.source) for r in audit(url)]
    assert rows[:4] == [
        ("confirm", "banking", "alice", "ui"),
        ("note", None, "alice", "ui"),
        ("correct", "weather", "alice", "ui"),
        ("correct", "weather", "alice", "ui"),
    ]
    undo = audit(url)[4]
    assert (undo.action, undo.undoes, undo.log_id) == ("undo", audit(url)[3].id, logs["C"])
    group = audit(url)[5:]
    assert len(group) == 3 and {r.action for r in group} == {"correct"}
    assert {r.log_id for r in group} == {logs["C"], logs["C2"], logs["C3"]}
    assert len({r.group_id for r in group}) == 1 and group[0].group_id is not None
