"""Run the workbench with uvicorn: in the foreground (the CLI) or in a thread (tests, bench)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from capture.db import ensure_migrated
from review_ui.app import create_app
from review_ui.settings import WorkbenchSettings

logger = logging.getLogger(__name__)


def serve(settings: WorkbenchSettings, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the workbench until interrupted. Refuses an unmigrated database
    (``DatabaseNotMigratedError`` names the fix)."""
    ensure_migrated(settings.database_url)
    app = create_app(settings)
    logger.info("review workbench on http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)


def serve_in_background(
    settings: WorkbenchSettings, *, host: str = "127.0.0.1", port: int = 8765
) -> uvicorn.Server:
    """Serve the workbench from a daemon thread beside other work (``prompt-capture serve
    --review-ui``: beside the schedules); returns the server (``should_exit = True`` stops it;
    otherwise it ends with the process). Refuses an unmigrated database
    (``DatabaseNotMigratedError``) before starting."""
    ensure_migrated(settings.database_url)
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="review-ui", daemon=True)
    thread.start()
    logger.info("review workbench on http://%s:%d/ (beside the schedules)", host, port)
    return server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    settings: WorkbenchSettings, *, host: str = "127.0.0.1", port: int | None = None, **app_kw: Any
) -> Iterator[str]:
    """Serve the workbench from a thread on ``host`` (a free port by default); yields the base
    URL and stops the server on exit."""
    port = port or free_port(host)
    app = create_app(settings, **app_kw)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="review-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the review workbench did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
