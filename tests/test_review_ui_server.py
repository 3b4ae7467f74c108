"""The workbench over HTTP (uvicorn in a thread, 127.0.0.1, a free port) on SQLite and
PostgreSQL: only the login page without a session, CSRF on every state change, admin-only
actions, the login limit across a restart, the API flow, and the pipeline role on PostgreSQL."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import func, make_url, select

from capture import db
from review_ui.server import running_server
from tasks.review_export import ReviewSelection
from tasks.review_rounds import open_round
from tasks.review_tables import rounds
from tests.test_review_ui_support import (
    NOW,
    PASSWORD,
    audit,
    clean_workbench_tables,
    corrections,
    make_user,
    seed_logs,
    settings_for,
)

CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')


def _open_round(url: str, share: float = 0.0) -> uuid.UUID:
    with db.get_sync_engine(url).begin() as conn:
        return open_round(
            conn, now=NOW, selection=ReviewSelection(limit=100), double_review_share=share
        ).id


def _csrf(client: httpx.Client, path: str = "/login") -> str:
    page = client.get(path)
    found = CSRF.search(page.text)
    assert found, page.text[:500]
    return found.group(1)


def login(base: str, name: str, password: str = PASSWORD) -> tuple[httpx.Client, str]:
    """A client logged in as ``name`` and its CSRF token."""
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    token = _csrf(client)
    answer = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token, "next": "/review"},
    )
    assert answer.status_code == 303, answer.text[:500]
    return client, _csrf(client, "/review")


@pytest.fixture
def server(workbench_db: str, wb_home: Path) -> Iterator[str]:
    with running_server(settings_for(workbench_db, wb_home)) as base:
        yield base


def test_unauthenticated_requests_get_only_the_login_page(workbench_db: str, server: str) -> None:
    seed_logs(workbench_db, 3)
    round_id = _open_round(workbench_db)
    client = httpx.Client(base_url=server, follow_redirects=False)
    for path in ("/", "/review", f"/progress?round={round_id}", "/static/workbench.js", "/nope"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
    page = client.get("/review", follow_redirects=True)
    assert page.status_code == 200 and 'action="/login"' in page.text
    assert "prompt number" not in page.text
    for method, path in (
        ("GET", f"/api/next?round={round_id}"),
        ("GET", f"/api/progress?round={round_id}"),
        ("POST", "/api/decide"),
        ("POST", "/api/undo"),
        ("POST", "/admin/rounds"),
        ("POST", "/logout"),
    ):
        answer = client.request(method, path, json={})
        assert answer.status_code == 401, (method, path, answer.status_code)
        assert answer.json() == {"error": "login required", "login": "/login"}
    # The login page's stylesheet is the one public file; headers are set on everything.
    css = client.get("/static/workbench.css")
    assert css.status_code == 200 and "font-family" in css.text
    assert "frame-ancestors 'none'" in css.headers["content-security-policy"]


def test_csrf_is_required_on_every_state_change(workbench_db: str, server: str) -> None:
    seed_logs(workbench_db, 3)
    round_id = _open_round(workbench_db)
    make_user(workbench_db, "alice")
    anonymous = httpx.Client(base_url=server)
    _csrf(anonymous)
    refused = anonymous.post("/login", data={"username": "alice", "password": PASSWORD})
    assert refused.status_code == 403  # the login form needs the token too
    client, token = login(server, "alice")
    item = client.get(f"/api/next?round={round_id}").json()["item"]
    body = {"item_id": item["item_id"], "action": "confirm"}
    assert client.post("/api/decide", json=body).status_code == 403
    wrong = client.post("/api/decide", json=body, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    assert client.post("/logout").status_code == 403
    assert corrections(workbench_db) == {}
    ok = client.post("/api/decide", json=body, headers={"X-CSRF-Token": token})
    assert ok.status_code == 200, ok.text
    assert ok.json()["result"]["final"] is True
    assert len(corrections(workbench_db)) == 1
    # The cookie is signed, HttpOnly and SameSite.
    cookie = client.post(
        "/login", data={"username": "x", "password": "y", "csrf_token": token}
    ).headers.get("set-cookie", "")
    if cookie:
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()


def test_a_reviewer_cannot_reach_admin_actions(workbench_db: str, server: str) -> None:
    seed_logs(workbench_db, 3)
    round_id = _open_round(workbench_db)
    make_user(workbench_db, "alice")
    make_user(workbench_db, "root", "admin")
    client, token = login(server, "alice")
    for path, data in (
        ("/admin/rounds", {"limit": "5"}),
        (f"/admin/rounds/{round_id}/close", {}),
        ("/admin/settle", {"item_id": str(uuid.uuid4()), "intent": "music"}),
        ("/admin/proposals/accept", {"intent": "x"}),
        ("/admin/proposals/reject", {"intent": "x"}),
    ):
        answer = client.post(path, data=data | {"csrf_token": token})
        assert answer.status_code == 403, (path, answer.status_code, answer.text)
    with db.get_sync_engine(workbench_db).connect() as conn:
        assert conn.execute(select(func.count()).select_from(rounds)).scalar_one() == 1
    # Raw text is for admins: a reviewer asking for it still gets the scrubbed prompt.
    item = client.get(f"/api/next?round={round_id}&raw=true").json()["item"]
    assert item["raw"] is False and "7946" not in item["text"]
    progress = client.get(f"/progress?round={round_id}")
    assert progress.status_code == 200 and "Open a round" not in progress.text
    admin, admin_token = login(server, "root")
    page = admin.get(f"/progress?round={round_id}")
    assert "Open a round" in page.text
    opened = admin.post("/admin/rounds", data={"limit": "5", "csrf_token": admin_token})
    assert opened.status_code == 303 and opened.headers["location"].startswith("/progress?round=")


def test_login_limit_survives_a_restart(workbench_db: str, wb_home: Path) -> None:
    make_user(workbench_db, "alice")
    settings = settings_for(workbench_db, wb_home)
    with running_server(settings) as base:
        client = httpx.Client(base_url=base)
        token = _csrf(client)
        for _ in range(10):
            answer = client.post(
                "/login", data={"username": "alice", "password": "nope", "csrf_token": token}
            )
            assert answer.status_code == 401
    with running_server(settings) as base:  # a new app and process state
        client = httpx.Client(base_url=base)
        token = _csrf(client)
        answer = client.post(
            "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token}
        )
        assert answer.status_code == 429 and "too many failed logins" in answer.text


def test_review_api_flow_and_handler_timing(workbench_db: str, server: str) -> None:
    seeded = seed_logs(workbench_db, 4)
    round_id = _open_round(workbench_db)
    make_user(workbench_db, "alice")
    client, token = login(server, "alice")
    headers = {"X-CSRF-Token": token}
    page = client.get(f"/review?round={round_id}")
    assert page.status_code == 200 and '"banking"' in page.text  # the catalogue for type-ahead
    first = client.get(f"/api/next?round={round_id}")
    assert "handler;dur=" in first.headers["server-timing"]
    item = first.json()["item"]
    assert client.get(f"/api/next?round={round_id}").json()["item"] == item  # the held lease
    note = client.post(
        "/api/note", json={"item_id": item["item_id"], "text": "hmm"}, headers=headers
    )
    assert note.status_code == 200
    alt = item["alternatives"][0]["intent"] if item["alternatives"] else "weather"
    decided = client.post(
        "/api/decide",
        json={"item_id": item["item_id"], "action": "correct", "intent": alt, "notes": "hmm"},
        headers=headers,
    ).json()
    assert decided["result"]["final"] and decided["item"]["item_id"] != item["item_id"]
    unknown = client.post(
        "/api/decide",
        json={"item_id": decided["item"]["item_id"], "action": "correct", "intent": "crypto"},
        headers=headers,
    )
    assert unknown.status_code == 422 and unknown.json()["propose"] is True
    skipped = client.post(
        "/api/skip", json={"item_id": decided["item"]["item_id"]}, headers=headers
    )
    assert skipped.status_code == 200
    undone = client.post("/api/undo", json={"round_id": str(round_id)}, headers=headers).json()
    assert undone["item"]["item_id"] == item["item_id"] and undone["reverted_logs"] == 1
    assert corrections(workbench_db) == {}
    progress = client.get(f"/api/progress?round={round_id}").json()
    assert progress["progress"]["reviewers"][0]["skips"] == 1
    actions = [r.action for r in audit(workbench_db)]
    assert actions == ["note", "correct", "skip", "undo"]
    assert seeded.ids


@pytest.fixture
def pipeline_login(postgres_url: str) -> Iterator[str]:
    """A URL of a fresh LOGIN role that is only a member of prompt_capture_pipeline."""
    name = f"pc_wb_{uuid.uuid4().hex[:8]}"
    server = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE prompt_capture_pipeline")
    try:
        yield make_url(postgres_url).set(username=name).render_as_string(hide_password=False)
    finally:
        db.clear_engine_cache()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def test_the_workbench_runs_as_the_pipeline_role_on_postgres(
    postgres_url: str, pipeline_login: str, wb_home: Path
) -> None:
    clean_workbench_tables(postgres_url)
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM nlu_prompt_logs")
    seed_logs(postgres_url, 3)
    make_user(postgres_url, "alice")
    make_user(postgres_url, "root", "admin")
    with running_server(settings_for(pipeline_login, wb_home)) as base:
        admin, admin_token = login(base, "root")
        opened = admin.post("/admin/rounds", data={"limit": "10", "csrf_token": admin_token})
        assert opened.status_code == 303
        round_id = opened.headers["location"].split("round=")[1]
        client, token = login(base, "alice")
        item = client.get(f"/api/next?round={round_id}").json()["item"]
        decided = client.post(
            "/api/decide",
            json={"item_id": item["item_id"], "action": "out_of_scope"},
            headers={"X-CSRF-Token": token},
        )
        assert decided.status_code == 200, decided.text
    assert list(corrections(postgres_url).values()) == [("oos", None)]
    with psycopg.connect(
        pipeline_login.replace("postgresql+psycopg://", "postgresql://", 1)
    ) as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
