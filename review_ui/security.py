"""Sessions, login checks, CSRF, and the response headers of every page.

- Sessions: Starlette's ``SessionMiddleware`` (an itsdangerous-signed cookie, ``HttpOnly``,
  ``SameSite=Lax``, ``Secure`` with ``https_only``) holding the user id and the CSRF token.
  The user is looked up on every request (cached 5 s), so disabling a user ends their sessions
  within seconds.
- CSRF: every state-changing request (anything but GET/HEAD/OPTIONS) must carry the session's
  token in the ``X-CSRF-Token`` header or a ``csrf_token`` form field, else 403.
- Unauthenticated requests get nothing but the login page: pages redirect to ``/login``, API
  calls get 401 with no data.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
import uuid
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from review_ui.state import Workbench
from tasks.review_users import ReviewUser

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_COOKIE = "pc_review_session"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class LoginRequired(Exception):
    """No valid session: pages redirect to the login page, the API answers 401."""


class AdminRequired(Exception):
    """A reviewer asked for an admin action: 403."""


class CsrfRejected(Exception):
    """A state-changing request without the session's CSRF token: 403."""


def workbench(request: Request) -> Workbench:
    wb: Workbench = request.app.state.workbench
    return wb


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use)."""
    token = request.session.get("csrf")
    if not isinstance(token, str) or len(token) < 20:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def check_csrf(request: Request) -> None:
    """Dependency: refuse a state-changing request whose CSRF token is missing or wrong."""
    if request.method in SAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent: Any = request.headers.get(CSRF_HEADER)
    if not sent and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get(CSRF_FIELD)
    if (
        not isinstance(expected, str)
        or not isinstance(sent, str)
        or not hmac.compare_digest(expected.encode(), sent.encode())
    ):
        logger.warning("CSRF token missing or wrong: %s %s", request.method, request.url.path)
        raise CsrfRejected


def session_user(request: Request) -> ReviewUser | None:
    """The logged-in, active user of this request's session, or None."""
    raw = request.session.get("uid")
    if not isinstance(raw, str):
        return None
    try:
        user_id = uuid.UUID(raw)
    except ValueError:
        return None
    return workbench(request).user(user_id)


def require_user(request: Request) -> ReviewUser:
    """Dependency: the logged-in user, else :class:`LoginRequired`."""
    user = session_user(request)
    if user is None:
        request.session.pop("uid", None)
        raise LoginRequired
    request.state.user = user
    return user


def require_admin(request: Request) -> ReviewUser:
    """Dependency: the logged-in admin, else :class:`LoginRequired` / :class:`AdminRequired`."""
    user = require_user(request)
    if not user.is_admin:
        raise AdminRequired
    return user


CurrentUser = Annotated[ReviewUser, Depends(require_user)]
CurrentAdmin = Annotated[ReviewUser, Depends(require_admin)]


def start_session(request: Request, user: ReviewUser) -> None:
    """A fresh session for ``user`` (new CSRF token: no fixation of a pre-login session)."""
    request.session.clear()
    request.session["uid"] = str(user.id)
    request.session["csrf"] = secrets.token_urlsafe(32)


class SecurityHeaders:
    """Pure ASGI middleware: security headers on every response, and ``Server-Timing:
    handler;dur=<ms>`` (the time from the request's arrival to the response's start — what the
    benchmark reads)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = (time.perf_counter() - started) * 1000.0
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                    (b"server-timing", f"handler;dur={elapsed:.3f}".encode()),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
