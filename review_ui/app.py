"""The review workbench app: ``create_app(settings)`` → a FastAPI app.

Pages (server-rendered Jinja2; JS/CSS shipped in ``review_ui/static``, no CDN, no build step):

- ``GET/POST /login`` — the only thing an unauthenticated request gets; ``POST /logout``
- ``GET /review?round=ID`` — one prompt at a time, keyboard first (``static/workbench.js``)
- ``GET /progress?round=ID`` — done / left, per reviewer, agreement; for admins also the
  disagreements to settle, the proposals, and a form to open a round
- admin only (403 for reviewers): ``POST /admin/rounds``, ``POST /admin/rounds/{id}/close``,
  ``POST /admin/settle``, ``POST /admin/proposals/{accept|reject}``

The JSON API is in :mod:`review_ui.api`; sessions, CSRF and headers in :mod:`review_ui.security`.
"""

from __future__ import annotations

import logging
import uuid
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from capture.errors import UserError
from review_ui import api
from review_ui.security import (
    SESSION_COOKIE,
    AdminRequired,
    CsrfRejected,
    CurrentAdmin,
    CurrentUser,
    LoginRequired,
    SecurityHeaders,
    check_csrf,
    csrf_token,
    require_user,
    session_user,
    start_session,
    workbench,
)
from review_ui.settings import WorkbenchSettings
from review_ui.state import Clock, Workbench, utc_now
from tasks.review_decide import settle
from tasks.review_export import ReviewSelection
from tasks.review_progress import disagreements, round_agreement, round_progress
from tasks.review_proposals import accept_proposal, list_proposals, reject_proposal
from tasks.review_rounds import close_round, list_rounds, open_round
from tasks.review_select import DEFAULT_STRATEGY, STRATEGIES
from tasks.review_users import LoginRateLimited, ReviewUser, login

logger = logging.getLogger(__name__)

STATIC_FILES = {"workbench.css": "text/css", "workbench.js": "text/javascript"}
PUBLIC_STATIC = frozenset({"workbench.css"})


def _page(wb: Workbench, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
    user = getattr(request.state, "user", None)
    html = wb.render(name, request=request, user=user, csrf=csrf_token(request), **ctx)
    return HTMLResponse(html, status_code=status)


def _safe_next(target: str | None) -> str:
    """Only same-site paths are followed after login (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/review"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


public = APIRouter()
pages = APIRouter(dependencies=[Depends(require_user), Depends(check_csrf)])


@public.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    wb = workbench(request)
    if session_user(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(wb, request, "login.html", next=_safe_next(next), error=None)


@public.post("/login", dependencies=[Depends(check_csrf)])
def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=200)],
    password: Annotated[str, Form(max_length=1000)],
    next: Annotated[str, Form()] = "/review",
) -> Response:
    wb = workbench(request)
    s = wb.settings
    error, status = None, 200
    user: ReviewUser | None = None
    with wb.connect() as conn:
        try:
            user = login(
                conn,
                username,
                password,
                client=_client(request),
                now=wb.clock,
                max_failures=s.max_failed_logins,
                window=s.login_window,
            )
        except LoginRateLimited as exc:
            error, status = str(exc), 429
        conn.commit()
    if user is not None:
        start_session(request, user)
        return RedirectResponse(_safe_next(next), status_code=303)
    if error is None:
        error, status = "wrong user name or password", 401
    return _page(wb, request, "login.html", status=status, next=_safe_next(next), error=error)


@public.get("/static/{name}")
def static_file(request: Request, name: str) -> Response:
    if name not in STATIC_FILES:
        return Response(status_code=404)
    if name not in PUBLIC_STATIC:
        require_user(request)
    body = resources.files("review_ui").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC_FILES[name])


@pages.post("/logout")
def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@pages.get("/")
def home() -> Response:
    return RedirectResponse("/review", status_code=303)


def _pick_round(wb: Workbench, round: uuid.UUID | None) -> tuple[Any, list[Any]]:
    with wb.connect() as conn:
        rounds = list_rounds(conn)
    chosen = next((r for r in rounds if r.id == round), None) if round else None
    if chosen is None:
        chosen = next((r for r in rounds if r.status == "open"), None)
    return chosen, rounds


@pages.get("/review", response_class=HTMLResponse)
def review_page(request: Request, user: CurrentUser, round: uuid.UUID | None = None) -> Response:
    wb = workbench(request)
    chosen, rounds = _pick_round(wb, round)
    catalog = wb.catalog()
    return _page(
        wb,
        request,
        "review.html",
        round=chosen,
        rounds=[r for r in rounds if r.status == "open"],
        catalog=catalog.sorted(),
        oos_label=catalog.oos_label,
    )


@pages.get("/progress", response_class=HTMLResponse)
def progress_page(request: Request, user: CurrentUser, round: uuid.UUID | None = None) -> Response:
    wb = workbench(request)
    chosen, rounds = _pick_round(wb, round)
    ctx: dict[str, Any] = {"round": chosen, "rounds": rounds, "strategies": STRATEGIES}
    with wb.connect() as conn:
        if chosen is not None:
            ctx["progress"] = round_progress(conn, chosen.id, now=wb.clock())
            ctx["agreement"] = round_agreement(conn, chosen.id)
            if user.is_admin:
                ctx["disputes"] = disagreements(conn, chosen.id)
        if user.is_admin:
            ctx["proposals"] = list_proposals(conn)
            ctx["catalog"] = wb.catalog(conn).sorted()
    return _page(
        wb,
        request,
        "progress.html",
        default_strategy=DEFAULT_STRATEGY,
        double_share=wb.settings.double_review_share,
        **ctx,
    )


admin = APIRouter(prefix="/admin", dependencies=[Depends(require_user), Depends(check_csrf)])


@admin.post("/rounds")
def admin_open_round(
    request: Request,
    *,
    user: CurrentAdmin,
    name: Annotated[str, Form(max_length=200)] = "",
    limit: Annotated[int, Form(ge=0, le=1_000_000)] = 200,
    days: Annotated[int, Form(ge=1, le=3650)] = 7,
    strategy: Annotated[str, Form()] = DEFAULT_STRATEGY,
    double_review_share: Annotated[float | None, Form(ge=0, le=1)] = None,
) -> Response:
    wb = workbench(request)
    share = wb.settings.double_review_share if double_review_share is None else double_review_share
    with wb.connect() as conn:
        summary = open_round(
            conn,
            name=name.strip() or None,
            created_by=user.id,
            selection=ReviewSelection(days=days, limit=limit, strategy=strategy),
            double_review_share=share,
            now=wb.clock(),
        )
        conn.commit()
    return RedirectResponse(f"/progress?round={summary.id}", status_code=303)


@admin.post("/rounds/{round_id}/close")
def admin_close_round(request: Request, round_id: uuid.UUID, user: CurrentAdmin) -> Response:
    wb = workbench(request)
    with wb.connect() as conn:
        close_round(conn, round_id, now=wb.clock())
        conn.commit()
    return RedirectResponse("/progress", status_code=303)


@admin.post("/settle")
def admin_settle(
    request: Request,
    *,
    user: CurrentAdmin,
    item_id: Annotated[uuid.UUID, Form()],
    intent: Annotated[str, Form(max_length=200)],
    round: Annotated[str, Form()] = "",
    notes: Annotated[str, Form(max_length=10_000)] = "",
) -> Response:
    wb = workbench(request)
    with wb.connect() as conn:
        settle(
            conn,
            item_id,
            user,
            intent,
            catalog=wb.catalog(conn),
            now=wb.clock(),
            notes=notes or None,
        )
        conn.commit()
    return RedirectResponse(f"/progress?round={quote(round)}", status_code=303)


@admin.post("/proposals/{verdict}")
def admin_proposal(
    request: Request,
    verdict: str,
    user: CurrentAdmin,
    intent: Annotated[str, Form(max_length=200)],
    round: Annotated[str, Form()] = "",
) -> Response:
    wb = workbench(request)
    if verdict not in ("accept", "reject"):
        return Response(status_code=404)
    with wb.connect() as conn:
        if verdict == "accept":
            accept_proposal(conn, intent, user, now=wb.clock())
        else:
            reject_proposal(conn, intent, user, now=wb.clock())
        conn.commit()
    wb.catalog(fresh=True)
    return RedirectResponse(f"/progress?round={quote(round)}", status_code=303)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.method not in ("GET", "HEAD")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    def _login_required(request: Request, exc: LoginRequired) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": "login required", "login": "/login"}, status_code=401)
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"/login?next={target}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # An unauthenticated request learns nothing, not even which paths exist.
        if session_user(request) is None:
            return _login_required(request, LoginRequired())
        return await http_exception_handler(request, exc)

    @app.exception_handler(AdminRequired)
    def _admin_required(request: Request, exc: AdminRequired) -> Response:
        return JSONResponse({"error": "only an admin can do this"}, status_code=403)

    @app.exception_handler(CsrfRejected)
    def _csrf(request: Request, exc: CsrfRejected) -> Response:
        return JSONResponse(
            {"error": "CSRF token missing or wrong; reload the page and try again"},
            status_code=403,
        )

    @app.exception_handler(UserError)
    def _user_error(request: Request, exc: UserError) -> Response:
        if _wants_json(request) and request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=400)
        wb = workbench(request)
        return _page(wb, request, "error.html", status=400, message=str(exc))


def create_app(settings: WorkbenchSettings, *, clock: Clock = utc_now) -> FastAPI:
    """The workbench for ``settings`` (``clock``: the time source, for tests)."""
    app = FastAPI(
        title="Prompt Capture review workbench",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.workbench = Workbench(settings, clock=clock)
    app.include_router(public)
    app.include_router(pages)
    app.include_router(api.router)
    app.include_router(admin)
    _install_handlers(app)
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.session_secret(),
        session_cookie=SESSION_COOKIE,
        max_age=int(settings.session_hours * 3600),
        same_site="lax",
        https_only=settings.https_only,
    )
    app.add_middleware(SecurityHeaders)
    return app
