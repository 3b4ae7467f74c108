"""The shadow worker: the candidate's predictions, made after the champion answered.

``NLUService.process_message`` answers with the champion, logs the row, and then hands
``(log_id, created_at, message)`` to :meth:`ShadowWorker.submit`: a bounded in-memory queue
(a ``deque`` and a length check; no lock, no I/O, no waiting). A background thread takes batches,
predicts them with the shadow candidate (:class:`capture.ab_routing.CandidateServing`) and
appends them to ``nlu_shadow_predictions`` (migration 0008; append-only, keyed by the log id, no
UPDATE of the logged row). When the queue is full the prompt is dropped and counted
(``dropped_full``); prompts whose candidate was cleared or left shadow mode before the worker
reached them are counted as ``skipped``; a failed write drops its batch and counts it
(``failed``). ``coverage`` = written / offered: dropping is allowed only because it is counted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from capture import db
from capture.ab_routing import CandidateServing
from capture.types import Prediction

logger = logging.getLogger(__name__)

SHADOW_TABLE = "nlu_shadow_predictions"
_metadata = sa.MetaData()
shadow_predictions = sa.Table(
    SHADOW_TABLE,
    _metadata,
    sa.Column("log_id", sa.Uuid(), primary_key=True),
    sa.Column("log_created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("candidate_version", sa.Text(), primary_key=True),
    sa.Column("champion_version", sa.Text()),
    sa.Column("predicted_intent", sa.Text(), nullable=False),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
)

DEFAULT_QUEUE = 10_000
DEFAULT_BATCH = 64
#: The share of wall time the worker may spend predicting: after a batch that took ``t`` seconds
#: it rests ``t * (1 - budget) / budget``, so the candidate's inference leaves CPU to the
#: request path; prompts that queue up meanwhile are dropped and counted (coverage falls).
DEFAULT_CPU_BUDGET = 0.5


@dataclass(frozen=True, slots=True)
class ShadowStats:
    """Counters since start: ``offered`` = submitted + dropped_full; ``coverage`` = written /
    offered (1.0 when nothing was offered)."""

    submitted: int
    dropped_full: int
    skipped: int
    predicted: int
    written: int
    failed: int
    queued: int

    @property
    def offered(self) -> int:
        return self.submitted + self.dropped_full

    @property
    def coverage(self) -> float:
        return self.written / self.offered if self.offered else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "offered": self.offered,
            "submitted": self.submitted,
            "dropped_full": self.dropped_full,
            "skipped": self.skipped,
            "predicted": self.predicted,
            "written": self.written,
            "failed": self.failed,
            "queued": self.queued,
            "coverage": round(self.coverage, 6),
        }


def _predict_batch(classifier: Any, texts: Sequence[str]) -> list[Prediction]:
    batch = getattr(classifier, "predict_batch", None)
    if batch is not None:
        return list(batch(texts))
    return [classifier.predict(text) for text in texts]


class ShadowWorker:
    """Predicts queued prompts with the shadow candidate and appends them to the shadow table.

    ``url``: the database (migrated to 0008). ``queue_size``: the bound (prompts); ``batch``:
    prompts per prediction and insert. Thread-safe ``submit``; :meth:`flush` waits until
    everything queued so far is written or counted; :meth:`close` flushes and stops.
    """

    def __init__(
        self,
        url: str,
        candidate: CandidateServing,
        *,
        queue_size: int = DEFAULT_QUEUE,
        batch: int = DEFAULT_BATCH,
        champion_version: Any = None,
        cpu_budget: float = DEFAULT_CPU_BUDGET,
    ) -> None:
        if queue_size < 1 or batch < 1:
            raise ValueError(f"queue_size and batch: expected >= 1, found {queue_size}, {batch}")
        if not 0.0 < cpu_budget <= 1.0:
            raise ValueError(f"cpu_budget: expected a share in (0, 1], found {cpu_budget}")
        self.cpu_budget = cpu_budget
        self.url = url
        self.candidate = candidate
        self.queue_size = queue_size
        self.batch = batch
        self._champion = champion_version  # a callable returning the champion's version, or None
        self._queue: deque[tuple[bytes, datetime, str]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self.submitted = 0
        self.dropped_full = 0
        self.skipped = 0
        self.predicted = 0
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="shadow-worker", daemon=True)
        self._thread.start()

    # The request path: no lock, no I/O.

    def active(self) -> bool:
        """True when a candidate is in shadow mode (the service submits only then)."""
        route = self.candidate.route
        return route is not None and route.pointer.mode == "shadow"

    def submit(self, log_id: bytes, created_at: datetime, message: str) -> bool:
        """Queue one answered prompt (``log_id``: its 16 id bytes); False when dropped."""
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.dropped_full += 1
            return False
        queue.append((log_id, created_at, message))
        self.submitted += 1
        wake = self._wake
        if not wake.is_set():
            wake.set()
        return True

    # The worker.

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._queue:
                self._set_busy(True)
                items: list[tuple[bytes, datetime, str]] = []
                queue = self._queue
                while queue and len(items) < self.batch:
                    items.append(queue.popleft())
                started = time.perf_counter()
                try:
                    self._process(items)
                except Exception:  # never let the worker die; the batch is counted as failed
                    self.failed += len(items)
                    logger.exception("shadow batch of %d failed; dropped", len(items))
                if self.cpu_budget < 1.0 and not self._stop.is_set():
                    spent = time.perf_counter() - started
                    self._stop.wait(spent * (1.0 - self.cpu_budget) / self.cpu_budget)
            self._set_busy(False)
            if self._stop.is_set() and not self._queue:
                return

    def _set_busy(self, busy: bool) -> None:
        with self._idle:
            self._busy = busy
            if not busy:
                self._idle.notify_all()

    def _process(self, items: list[tuple[bytes, datetime, str]]) -> None:
        route = self.candidate.route
        if route is None or route.pointer.mode != "shadow":
            self.skipped += len(items)
            return
        predictions = _predict_batch(route.classifier, [text for _, _, text in items])
        self.predicted += len(items)
        champion = self._champion() if callable(self._champion) else self._champion
        now = datetime.now(UTC)
        rows = [
            {
                "log_id": uuid.UUID(bytes=log_id),
                "log_created_at": created_at,
                "candidate_version": route.version,
                "champion_version": champion,
                "predicted_intent": prediction.intent,
                "confidence": min(1.0, max(0.0, float(prediction.confidence))),
                "predicted_at": now,
            }
            for (log_id, created_at, _), prediction in zip(items, predictions, strict=True)
        ]
        try:
            with db.get_sync_engine(self.url).begin() as conn:
                conn.execute(shadow_predictions.insert(), rows)
        except sa.exc.SQLAlchemyError as exc:
            self.failed += len(rows)
            logger.warning("shadow predictions not written (%d dropped): %s", len(rows), exc)
            return
        self.written += len(rows)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the queue is empty and the worker idle; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._idle:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
                self._wake.set()
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the worker."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def stats(self) -> ShadowStats:
        return ShadowStats(
            submitted=self.submitted,
            dropped_full=self.dropped_full,
            skipped=self.skipped,
            predicted=self.predicted,
            written=self.written,
            failed=self.failed,
            queued=len(self._queue),
        )
