"""The NLU service: classify a message, log it without waiting on the database, track outcomes.

Usage (the spec's contract)::

    service = create_nlu_service(classifier)
    result = await service.process_message(message, user_id=..., conversation_id=...,
                                           message_index=0)
    await service.update_workflow_outcome(result.log_id, was_successful=True,
                                          workflow_type="scheduling")
    await service.aclose()   # at shutdown: writes (or spools) everything still queued

``process_message`` validates, classifies and hands the row to :class:`capture.logger.
CaptureLogger`; it never awaits I/O, so logging adds microseconds, and a database outage does not
fail requests (rows are spooled and replayed). See ``docs/CAPTURE.md``.

Text hygiene is :mod:`capture.text`'s (the one owner): the prompt is stored as
``clean_prompt`` makes it (NUL and other controls removed, lone surrogates -> U+FFFD, NFC,
surrounding whitespace and zero-width spaces trimmed) and cut safely to ``max_prompt_chars``
(:func:`capture.values.truncate_text`); intent names (the classifier's and a correction's) must
be in the allowed form (``check_intent_name``); notes and other optional text as
``clean_notes``. The prediction is logged with at most :data:`capture.types.RUNNERS_UP` (3)
runners-up in ``secondary_intents``.

The row is built once, here, in the form binary ``COPY`` sends (a tuple of atomic values, see
:func:`capture.spool.wire_row`): the writer passes it on untouched, and the queue holds no
objects the garbage collector has to traverse.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from time import time_ns

import sqlalchemy.exc

from capture import db, statements
from capture.ab_routing import CandidateServing
from capture.ids import uuid7, uuid_from_int
from capture.logger import CaptureLogger, CaptureStats, Sleep
from capture.repository import UnknownLogIdError
from capture.settings import Settings, get_settings
from capture.shadow import ShadowWorker
from capture.spool import EMPTY_SECONDARY, new_row, secondary_document, uuid_bytes
from capture.text import check_intent_name, clean_prompt, visible
from capture.types import RUNNERS_UP, Classifier, NLUResult, Prediction
from capture.values import as_uuid, optional_text, truncate_text, utc_now

logger = logging.getLogger(__name__)

__all__ = ["NLUService", "UnknownLogIdError", "create_nlu_service"]

Clock = Callable[[], datetime]
_INT32_MAX = 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class NLUService:
    """Classifier + capture logger. Create it with :func:`create_nlu_service`."""

    def __init__(
        self,
        classifier: Classifier,
        *,
        capture: CaptureLogger,
        settings: Settings,
        model_version: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.classifier = classifier
        self.capture = capture
        self._max_chars = settings.max_prompt_chars
        self._model_version = model_version
        # Without an injected clock, created_at comes from the same time_ns() reading as the
        # id's UUIDv7 timestamp, truncated to the millisecond (the id's precision); one datetime
        # is made per millisecond and shared by the rows of that millisecond.
        self._injected_clock = clock
        self._clock: Clock = clock or utc_now
        self._now_ms = -1
        self._now_dt = _EPOCH
        # Ids (16 bytes) issued recently: outcomes for them need no database check. Two
        # generations of at most ``_issued_cap`` each: O(1) per call, bounded memory.
        self._issued: set[bytes] = set()
        self._issued_before: set[bytes] = set()
        self._issued_cap = max(settings.buffer_size, 10_000)
        self._clean_names: set[str] = set()
        # Production A/B (docs/AB_TESTING.md): the candidate under test and its shadow worker.
        self.ab: CandidateServing | None = None
        self.shadow: ShadowWorker | None = None

    @property
    def url(self) -> str:
        return self.capture.url

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is UTC:
            return now
        return now.astimezone(UTC) if now.tzinfo is not None else now.replace(tzinfo=UTC)

    def _model(self) -> str | None:
        if self._model_version is not None:
            return self._model_version
        version = getattr(self.classifier, "version", None)
        return None if version is None else str(version)

    async def process_message(
        self,
        message: str,
        user_id: uuid.UUID | str | None = None,
        conversation_id: uuid.UUID | str | None = None,
        message_index: int | None = None,
    ) -> NLUResult:
        """Classify ``message`` and log it; returns the prediction with its ``log_id``.

        Raises ``ValueError`` (naming the field) for a prompt with nothing left after
        ``capture.text.clean_prompt``, a malformed id or index, or a classifier output that
        cannot be logged (an intent name not in the allowed form, a confidence outside [0, 1]
        or NaN). The classifier sees ``message`` as given; the stored prompt is the cleaned one,
        cut to ``max_prompt_chars`` without splitting a character. ``secondary_intents`` keeps
        the best :data:`capture.types.RUNNERS_UP` runners-up.
        """
        if not isinstance(message, str):
            raise ValueError(f"message: expected a string, found {type(message).__name__}")
        prompt = clean_prompt(message)
        if not prompt:
            raise ValueError(
                f"message: expected a non-empty prompt, found {visible(message, 40)}; "
                "send the user's text"
            )
        # (uuid.UUID arguments inlined: this is the request path)
        if user_id is None:
            user = None
        elif type(user_id) is uuid.UUID:
            user = user_id.int.to_bytes(16, "big")
        else:
            user = uuid_bytes(user_id, "user_id")
        conversation = uuid_bytes(conversation_id, "conversation_id")
        if message_index is not None and (
            type(message_index) is not int or not 0 <= message_index <= _INT32_MAX
        ):
            raise ValueError(
                f"message_index: expected an integer in [0, {_INT32_MAX}] or None, "
                f"found {message_index!r}"
            )
        ab = self.ab
        route = None if ab is None else ab.route
        if route is not None and route.threshold and route.answers(user, conversation):
            prediction: Prediction = route.classifier.predict(message)  # canary arm
        else:
            route = None
            prediction = self.classifier.predict(message)
        intent = prediction.intent
        confidence = prediction.confidence
        secondary = prediction.secondary_intents
        if len(secondary) > RUNNERS_UP:
            secondary = secondary[:RUNNERS_UP]
        # Fast path: intent names seen before (already validated) and float confidences in
        # [0, 1] (NaN fails the comparison). Anything else: full validation.
        names = self._clean_names
        valid = intent in names and type(confidence) is float and 0.0 <= confidence <= 1.0
        if valid:
            for name, conf in secondary:
                if name not in names or type(conf) is not float or not 0.0 <= conf <= 1.0:
                    valid = False
                    break
        if not valid:
            intent, confidence, secondary = self._normalised(
                Prediction(intent, confidence, secondary)
            )
        if len(prompt) > self._max_chars:
            prompt = truncate_text(prompt, self._max_chars)
            self.capture.truncated += 1
        ns = time_ns()
        id_int = uuid7.next_int(ns)
        if self._injected_clock is None:
            ms = ns // 1_000_000
            if ms != self._now_ms:
                self._now_ms = ms
                self._now_dt = _EPOCH + timedelta(milliseconds=ms)
            now = self._now_dt
        else:
            now = self._now()
        version = self._model_version if route is None else route.pointer.version
        if version is None:
            version = self._model()
        id_bytes = id_int.to_bytes(16, "big")
        # The wire row, exactly as binary COPY sends it.
        self.capture.submit_wire_row(
            new_row(
                log_id=id_bytes,
                user_id=user,
                prompt=prompt,
                predicted_intent=intent,
                confidence=confidence,
                secondary_intents=secondary_document(secondary) if secondary else EMPTY_SECONDARY,
                conversation_id=conversation,
                message_index=message_index,
                model_version=version,
                created_at=now,
            )
        )
        shadow = self.shadow
        if shadow is not None and shadow.active():  # after answering and logging; never waits
            shadow.submit(id_bytes, now, message)
        issued = self._issued
        issued.add(id_bytes)
        if len(issued) >= self._issued_cap:
            self._issued_before, self._issued = issued, set()
        return NLUResult(intent, confidence, secondary, uuid_from_int(id_int), version)

    def _normalised(
        self, prediction: Prediction
    ) -> tuple[str, float, tuple[tuple[str, float], ...]]:
        """The prediction validated (:meth:`capture.types.Prediction.normalised`: names in the
        allowed form, float confidences); its names are remembered so the next prediction
        naming them takes the fast path."""
        normal = prediction.normalised()
        names = self._clean_names
        if len(names) < 10_000:  # intent names are a small, fixed set
            names.add(normal.intent)
            names.update(name for name, _ in normal.secondary_intents)
        return normal.intent, normal.confidence, normal.secondary_intents

    async def _check_known(self, log_id: uuid.UUID) -> None:
        key = log_id.bytes
        if key in self._issued or key in self._issued_before or self.capture.is_queued(log_id):
            return
        if self.capture.spooling:
            return  # the row may be waiting in the spool: the writer checks the id at replay
        exists = await self._row_exists(log_id)
        if exists is False and not self.capture.orphans_replayed:
            # The row may be in a spool segment that a stopped process left: wait for the
            # start-up replay (fast while the database is up), then look again.
            if not await self.capture.wait_orphans_replayed(timeout=5.0):
                return  # still replaying: the writer checks the id when it writes
            exists = await self._row_exists(log_id)
        if exists is False:
            raise UnknownLogIdError(log_id)

    async def _row_exists(self, log_id: uuid.UUID) -> bool | None:
        """True/False, or None when the database cannot be reached (checked again at write)."""
        try:
            async with db.get_engine(self.url).connect() as conn:
                # Near the id's time first: one partition on PostgreSQL (migration 0007).
                near = await conn.execute(statements.select_log_id(log_id, near_id_time=True))
                if near.first() is not None:
                    return True
                result = await conn.execute(statements.select_log_id(log_id))
                return result.first() is not None
        except (sqlalchemy.exc.DBAPIError, OSError, TimeoutError) as exc:
            logger.warning(
                "cannot check log_id %s now (%s); the writer checks it when it writes",
                log_id,
                exc,
            )
            return None

    async def update_workflow_outcome(
        self,
        log_id: uuid.UUID | str,
        was_successful: bool,
        workflow_type: str | None,
        execution_error: str | None = None,
    ) -> None:
        """Record the outcome of the workflow run for a logged prompt.

        Raises :class:`UnknownLogIdError` (a ``ValueError``) when no row has ``log_id``.
        """
        lid = as_uuid(log_id, "log_id")
        if not isinstance(was_successful, bool):
            raise ValueError(f"was_successful: expected True or False, found {was_successful!r}")
        workflow = optional_text(workflow_type, "workflow_type")
        error = optional_text(execution_error, "execution_error")
        await self._check_known(lid)
        self.capture.submit_outcome(lid, was_successful, workflow, error, self._now())

    async def add_correction(
        self, log_id: uuid.UUID | str, corrected_intent: str, correction_notes: str | None = None
    ) -> None:
        """Record a human correction of the predicted intent.

        ``corrected_intent`` must be in the allowed form (``capture.text.check_intent_name``;
        surrounding whitespace is removed, anything else raises ``IntentNameError``, a
        ``ValueError`` naming the field and the fix); ``correction_notes`` are stored as
        ``capture.text.clean_notes`` makes them (``None`` when nothing is left). Raises
        :class:`UnknownLogIdError` when no row has ``log_id``.
        """
        lid = as_uuid(log_id, "log_id")
        intent = check_intent_name(corrected_intent, field="corrected_intent")
        notes = optional_text(correction_notes, "correction_notes")
        await self._check_known(lid)
        self.capture.submit_correction(lid, intent, notes, self._now())

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything logged so far is committed to the database."""
        await self.capture.flush(timeout=timeout)

    async def aclose(self, timeout: float = 30.0) -> None:
        """Write everything still queued (or spool it if the database stays down)."""
        await self.capture.aclose(timeout=timeout)
        if self.shadow is not None:  # best effort: shadow rows are dropped-and-counted data
            await asyncio.to_thread(self.shadow.close, timeout)

    def stats(self) -> CaptureStats:
        return self.capture.stats()

    async def __aenter__(self) -> NLUService:
        self.capture.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def create_nlu_service(
    classifier: Classifier,
    *,
    url: str | None = None,
    settings: Settings | None = None,
    model_version: str | None = None,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    application_name: str | None = None,
    candidate: CandidateServing | None = None,
) -> NLUService:
    """Build the service for ``url`` (default: the settings' database).

    Refuses to start (``capture.db.DatabaseNotMigratedError``, naming ``prompt-capture db
    upgrade``) unless the schema is migrated. ``model_version`` defaults to the classifier's
    ``version`` attribute (read per call, so a hot-reloading classifier is followed).
    ``clock`` (created_at) and ``sleep`` (reconnect backoff) are injectable for tests.
    ``candidate``: the A/B candidate under test (canary answers a sticky share; shadow is
    predicted after answering by a :class:`capture.shadow.ShadowWorker`, in a worker process of
    its own; docs/AB_TESTING.md). A program that serves a shadow candidate must guard its entry
    point with ``if __name__ == "__main__":`` (the worker process is started by *spawn*).
    """
    settings = settings or get_settings()
    resolved = db.database_url(url) if url else settings.resolved_database_url
    db.require_migrated(resolved)
    capture = CaptureLogger(
        resolved, settings=settings, application_name=application_name, sleep=sleep
    )
    service = NLUService(
        classifier, capture=capture, settings=settings, model_version=model_version, clock=clock
    )
    if candidate is not None:
        service.ab = candidate
        service.shadow = ShadowWorker(resolved, candidate, champion_version=service._model)
    return service
