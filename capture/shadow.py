"""The shadow worker: the candidate's predictions, made after the champion answered, in a
separate process.

``NLUService.process_message`` answers with the champion, logs the row, and then hands
``(log_id, created_at, message)`` to :meth:`ShadowWorker.submit`: a bounded in-memory queue (a
``deque`` and a length check; no lock, no I/O, no waiting). Everything else happens elsewhere:

- a **sender thread** in the service's process wakes every ``linger_s`` (200 ms: few wake-ups,
  so it rarely contends with the request path for the GIL), takes up to ``batch`` prompts at a
  time and sends each batch, tagged with the champion's and the candidate's versions, through a
  pipe to the worker process. At most ``in_flight`` batches are handed over and not yet
  finished (a semaphore the sender waits on without the GIL); while the worker is behind,
  prompts wait in the queue and, once it is full, new ones are dropped and counted
  (``dropped_full``);
- the **worker process** (``multiprocessing`` *spawn*: no inherited threads or locks), started
  on the first prompt, at ``os.nice(nice)`` (19) and, on Linux, the ``SCHED_IDLE`` policy in a
  scheduling group of its own (``idle_priority``, :func:`_idle_priority`: it runs only on CPU
  the request path leaves), with
  ONNX Runtime at one intra-op thread and ``tokenizers`` at one thread, loads the candidate
  itself with the same loader the service uses (:class:`capture.ab_routing.OnnxLoader`:
  ``OnnxClassifier`` over the version directory) and the same hot-reload rule (a
  :class:`capture.ab_routing.CandidateServing` of its own: a candidate that fails to load or
  validate never predicts and is not retried until the pointer changes), predicts each batch
  and appends it to ``nlu_shadow_predictions`` (migration 0008; append-only, keyed by the log
  id, no UPDATE of the logged row) with its own database engine. A batch whose candidate version
  the worker does not have loaded is ``skipped`` and counted; a failed prediction or insert is
  counted as ``failed``; prompts held by a worker that died or was stopped are ``lost`` (a dead
  worker is restarted after ``RESTART_BACKOFF_S``).

``coverage`` = written / offered: dropping shadow work is allowed only because it is counted.
The worker's counters live in shared memory, so :meth:`ShadowWorker.stats` costs no message.

A candidate whose loader cannot be pickled (a synthetic classifier built in a test or a
simulation) cannot be rebuilt in another process: the worker then predicts in the sender
thread instead (``isolation == "thread"``, logged), which shares the CPU and the GIL with the
request path. The ONNX loader always runs in a process.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from capture import db
from capture.ab_routing import CandidateRoute, CandidateServing, Loader, OnnxLoader
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
#: Batches handed to the worker and not yet finished (the pipe never holds more).
DEFAULT_IN_FLIGHT = 2
#: How long the sender thread lets prompts gather before it sends a partial batch.
DEFAULT_LINGER_S = 0.2
#: How long the sender sleeps while the queue is empty.
IDLE_WAIT_S = 0.2
#: The worker process's niceness increment: it runs only on CPU the request path leaves.
DEFAULT_NICE = 19
#: A worker process that died is started again after this many seconds.
RESTART_BACKOFF_S = 5.0
ISOLATIONS = ("process", "thread")

# The worker's counters (shared memory in process isolation). DONE is written last per batch:
# once the sender sees it advance, the other counters for that batch are final.
_SKIPPED, _PREDICTED, _WRITTEN, _FAILED, _LOADS, _FAILED_LOADS, _DONE = range(7)
_N_COUNTERS = 7

Item = tuple[bytes, datetime, str]
Batch = tuple[str | None, str | None, list[Item]]  # (champion version, candidate version, items)


@dataclass(frozen=True, slots=True)
class ShadowStats:
    """Counters since start: ``offered`` = submitted + dropped_full; ``coverage`` = written /
    offered (1.0 when nothing was offered). ``loads`` / ``failed_loads``: the worker's own
    candidate loads."""

    submitted: int
    dropped_full: int
    skipped: int
    predicted: int
    written: int
    failed: int
    lost: int
    queued: int
    in_flight: int
    loads: int = 0
    failed_loads: int = 0
    isolation: str = "process"
    pid: int | None = None

    @property
    def offered(self) -> int:
        return self.submitted + self.dropped_full

    @property
    def coverage(self) -> float:
        return self.written / self.offered if self.offered else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["offered"] = self.offered
        data["coverage"] = round(self.coverage, 6)
        return data


def _predict_batch(classifier: Any, texts: Sequence[str]) -> list[Prediction]:
    batch = getattr(classifier, "predict_batch", None)
    if batch is not None:
        return list(batch(texts))
    return [classifier.predict(text) for text in texts]


def _process_batch(
    url: str, route: CandidateRoute | None, batch: Batch, counters: MutableSequence[int]
) -> None:
    """Predict one batch with ``route`` and append it to the shadow table; count the outcome."""
    champion, wanted, items = batch
    n = len(items)
    if not n:
        return
    try:
        if route is None or route.pointer.mode != "shadow" or route.version != wanted:
            counters[_SKIPPED] += n
            return
        try:
            predictions = _predict_batch(route.classifier, [text for _, _, text in items])
        except Exception:  # a candidate that fails at prediction time: counted, logged
            counters[_FAILED] += n
            logger.exception("shadow candidate %s failed on a batch of %d", route.version, n)
            return
        counters[_PREDICTED] += n
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
            with db.get_sync_engine(url).begin() as conn:
                conn.execute(shadow_predictions.insert(), rows)
        except sa.exc.SQLAlchemyError as exc:
            counters[_FAILED] += n
            logger.warning("shadow predictions not written (%d dropped): %s", n, exc)
            return
        counters[_WRITTEN] += n
    finally:
        counters[_DONE] += n


@dataclass(frozen=True, slots=True)
class _WorkerConfig:
    url: str
    models_dir: Path
    loader: Loader
    interval_s: float
    nice: int
    idle_priority: bool


def _idle_priority() -> None:
    """Linux: make this process yield the CPU to the service and everything else.

    ``SCHED_IDLE`` (it runs only when its CPU has nothing else to do). With the kernel's
    autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``), niceness and policy act
    only inside a session's group, and the worker's CPU time would be charged to the group the
    request path is in; so the worker also starts a session of its own (``os.setsid``) and sets
    that group's niceness to 19 (``/proc/self/autogroup``)."""
    autogroup = Path("/proc/self/autogroup")
    if autogroup.exists():
        try:
            os.setsid()
            autogroup.write_text("19", encoding="ascii")
        except OSError as exc:
            logger.warning("shadow worker: cannot lower its scheduling group (%s)", exc)
    if hasattr(os, "SCHED_IDLE"):  # last: from here on the worker may wait for the CPU
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            logger.warning("shadow worker: cannot use SCHED_IDLE (%s)", exc)


def _worker_main(
    conn: Any, config: _WorkerConfig, counters: MutableSequence[int], slots: Any
) -> None:
    """The worker process: receive batches until the pipe closes or a ``None`` arrives; each
    finished batch frees one of the sender's ``slots`` (a semaphore)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops it (Ctrl-C is the parent's)
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' batch encoding: one thread
    if config.nice:
        try:
            os.nice(config.nice)
        except OSError as exc:
            logger.warning("shadow worker: cannot lower its priority (%s)", exc)
    if config.idle_priority:
        _idle_priority()
    interval_s, url = config.interval_s, config.url
    candidate = CandidateServing(
        config.models_dir, loader=config.loader, interval_s=interval_s, watch=False
    )

    def check() -> None:
        candidate.reload_now()
        counters[_LOADS], counters[_FAILED_LOADS] = candidate.loads, candidate.failed_loads

    counters[_LOADS], counters[_FAILED_LOADS] = candidate.loads, candidate.failed_loads
    checked = time.monotonic()
    try:
        while True:
            try:
                if not conn.poll(interval_s):
                    check()
                    checked = time.monotonic()
                    continue
                batch = conn.recv()
            except (EOFError, OSError):
                return  # the service closed the pipe or is gone
            if batch is None:
                return
            route = candidate.route
            stale = route is None or route.version != batch[1]
            if stale or time.monotonic() - checked >= interval_s:
                check()  # the service saw a new pointer: follow it now (not retried if refused)
                checked = time.monotonic()
            try:
                _process_batch(url, candidate.route, batch, counters)
            finally:
                slots.release()
    finally:
        db.clear_engine_cache()


def _can_pickle(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # any object pickle refuses (locks, lambdas, local classes)
        return False
    return True


class ShadowWorker:
    """Predicts queued prompts with the shadow candidate, off the request path, and appends them
    to the shadow table (see the module docstring).

    ``url``: the database (migrated to 0008). ``candidate``: the service's
    :class:`CandidateServing` (its route says whether shadow mode is on, and which version).
    ``loader``: how the worker builds the candidate (default: ``candidate.loader``; an
    :class:`OnnxLoader` is used with one intra-op thread). ``isolation``: ``"process"`` or
    ``"thread"``; default: a process when the loader can be pickled. ``queue_size``: prompts
    waiting in this process; ``batch``: prompts per message, prediction and insert;
    ``in_flight``: batches handed over and not finished; ``nice`` and ``idle_priority``: the
    worker process's priority (see the module docstring). :meth:`flush` waits until everything
    queued so far is written or counted; :meth:`close` flushes and stops the worker process.
    """

    def __init__(
        self,
        url: str,
        candidate: CandidateServing,
        *,
        queue_size: int = DEFAULT_QUEUE,
        batch: int = DEFAULT_BATCH,
        champion_version: Callable[[], str | None] | str | None = None,
        loader: Loader | None = None,
        isolation: str | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
        linger_s: float = DEFAULT_LINGER_S,
        nice: int = DEFAULT_NICE,
        idle_priority: bool = True,
    ) -> None:
        if queue_size < 1 or batch < 1 or in_flight < 1:
            raise ValueError(
                f"queue_size, batch and in_flight: expected >= 1, found {queue_size}, {batch}, "
                f"{in_flight}"
            )
        if linger_s <= 0:
            raise ValueError(f"linger_s: expected > 0 seconds, found {linger_s}")
        loader = loader or candidate.loader
        if isinstance(loader, OnnxLoader) and loader.threads != 1:
            loader = OnnxLoader(1)  # the worker must not take more than one core
        if isolation is None:
            isolation = "process" if _can_pickle(loader) else "thread"
            if isolation == "thread":
                logger.warning(
                    "shadow candidate loader %r cannot be sent to a worker process: the shadow "
                    "candidate predicts in a thread of this process (it shares the CPU with the "
                    "request path); pass a picklable loader such as capture.ab_routing.OnnxLoader",
                    loader,
                )
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation: expected one of {ISOLATIONS}, found {isolation!r}")
        self.url = url
        self.candidate = candidate
        self.loader = loader
        self.isolation = isolation
        self.queue_size = queue_size
        self.batch = batch
        self.in_flight = in_flight
        self.linger_s = linger_s
        self.nice = nice
        self.idle_priority = idle_priority
        self._champion = champion_version  # a callable returning the champion's version, or one
        self._queue: deque[Item] = deque()
        self.submitted = 0
        self.dropped_full = 0
        self.lost = 0
        self._sent = 0  # items handed to the worker (or processed, in thread isolation)
        self._busy = False  # the sender holds items taken from the queue and not yet sent
        self._counters: MutableSequence[int]
        self._ctx = multiprocessing.get_context("spawn")
        if isolation == "process":
            self._counters = self._ctx.RawArray("q", _N_COUNTERS)
        else:
            self._counters = [0] * _N_COUNTERS
        self._process: Any = None  # multiprocessing.process.BaseProcess
        self._conn: Any = None  # the pipe's sending end
        self._slots: Any = None  # batches the worker may still take (a semaphore)
        self._restart_at = 0.0
        self.exitcode: int | None = None  # the last worker process's, once stopped
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-sender", daemon=True)
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
        return True

    # The sender thread.

    @property
    def pid(self) -> int | None:
        """The worker process's id while one runs (None in thread isolation)."""
        process = self._process
        return None if process is None else process.pid

    def _done(self) -> int:
        return int(self._counters[_DONE])

    def _run(self) -> None:
        queue = self._queue
        while True:
            if self._abort.is_set():
                return
            if not queue:
                if self._stop.is_set():
                    return
                self._kick.wait(IDLE_WAIT_S)
                self._kick.clear()
                self._check_process()
                continue
            if len(queue) < self.batch and not self._kick.is_set() and not self._stop.is_set():
                self._kick.wait(self.linger_s)  # let a batch gather
            self._kick.clear()
            try:
                sent = self._pump()
            except Exception:  # never let the sender die; what it held is counted as lost
                logger.exception("shadow sender failed; its batch is counted as lost")
                self._busy = False
                sent = False
            if not sent:  # no worker to send to yet (starting, or restarting after a crash)
                self._kick.wait(self.linger_s)

    def _pump(self) -> bool:
        """Send (or, in thread isolation, process) batches while the worker has room; False
        when nothing could be sent."""
        queue = self._queue
        sent = False
        while queue and not self._abort.is_set():
            if self.isolation == "process" and not self._room():
                return sent
            champion, candidate = self._champion_version(), self.candidate.version
            self._busy = True
            items: list[Item] = []
            while len(items) < self.batch:
                try:
                    items.append(queue.popleft())
                except IndexError:
                    break
            if not items:  # emptied meanwhile (another thread cleared the queue)
                self._busy = False
                break
            batch: Batch = (champion, candidate, items)
            self._sent += len(items)
            if self.isolation == "thread":
                _process_batch(self.url, self.candidate.route, batch, self._counters)
            else:
                try:
                    self._conn.send(batch)
                except (OSError, ValueError, AttributeError) as exc:  # the worker is gone
                    logger.warning("shadow worker unreachable (%s)", exc)
                    self._reap()
            self._busy = False
            sent = True
        return sent

    def _champion_version(self) -> str | None:
        champion = self._champion
        value = champion() if callable(champion) else champion
        return None if value is None else str(value)

    def _room(self) -> bool:
        """True when a batch may be sent now; starts (or restarts) the worker process."""
        if not self._check_process():
            return False
        # Blocks without the GIL until the worker finishes a batch; meanwhile the queue
        # absorbs prompts, then drops them (counted).
        while not self._slots.acquire(timeout=0.5):
            if self._abort.is_set() or not self._check_process():
                return False
        return True

    def _check_process(self) -> bool:
        """True when a live worker process is ready for batches (starting one if due)."""
        if self.isolation != "process":
            return True
        process = self._process
        if process is not None:
            if process.is_alive():
                return True
            logger.error(
                "shadow worker process %s exited (code %s); restarting in %.0f s",
                process.pid,
                process.exitcode,
                RESTART_BACKOFF_S,
            )
            self._reap()
            self._restart_at = time.monotonic() + RESTART_BACKOFF_S
            return False
        if not self._queue or self._stop.is_set() or time.monotonic() < self._restart_at:
            return False
        return self._start_process()

    def _start_process(self) -> bool:
        receiver, sender = self._ctx.Pipe(duplex=False)
        slots = self._ctx.Semaphore(self.in_flight)
        process = self._ctx.Process(
            target=_worker_main,
            args=(
                receiver,
                _WorkerConfig(
                    self.url,
                    self.candidate.models_dir,
                    self.loader,
                    self.candidate.interval_s,
                    self.nice,
                    self.idle_priority,
                ),
                self._counters,
                slots,
            ),
            name="shadow-worker",
            daemon=True,  # never outlives the service, even without close()
        )
        try:
            process.start()
        except Exception:
            logger.exception("shadow worker process cannot start; retrying later")
            sender.close()
            self._restart_at = time.monotonic() + RESTART_BACKOFF_S
            return False
        finally:
            receiver.close()  # the child has its copy
        self._process, self._conn, self._slots = process, sender, slots
        logger.info("shadow worker process %s started", process.pid)
        return True

    def _reap(self) -> None:
        """Forget a dead (or stopped) worker: what it held is lost."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(0.1)
        done = self._done()
        if self._sent > done:
            self.lost += self._sent - done
            self._sent = done

    # Waiting and stopping.

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the queue is empty and the worker has finished every batch; False on
        timeout (or when the worker stopped before)."""
        deadline = time.monotonic() + timeout
        while self._queue or self._busy or self._sent != self._done():
            if self._abort.is_set() or not self._thread.is_alive():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._kick.set()
            time.sleep(min(remaining, 0.01))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the sender thread and the
        worker process (terminated when it does not finish in time). Idempotent."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        self._abort.set()
        self._kick.set()
        self._thread.join(max(0.1, min(1.0, deadline - time.monotonic())))
        process, conn = self._process, self._conn
        self._process = self._conn = None  # the sender (stopped) never starts another
        if conn is not None:
            conn.close()  # the worker reads to the end of the pipe, then exits
        if process is not None:
            process.join(max(2.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("shadow worker %s did not stop in time: terminated", process.pid)
                process.terminate()
                process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
            self.exitcode = process.exitcode
        self._thread.join(5.0)
        abandoned = len(self._queue) + max(0, self._sent - self._done())
        self._queue.clear()
        self._sent = self._done()
        self.lost += abandoned

    def stats(self) -> ShadowStats:
        counters = list(self._counters)
        return ShadowStats(
            submitted=self.submitted,
            dropped_full=self.dropped_full,
            skipped=counters[_SKIPPED],
            predicted=counters[_PREDICTED],
            written=counters[_WRITTEN],
            failed=counters[_FAILED],
            lost=self.lost,
            queued=len(self._queue),
            in_flight=max(0, self._sent - counters[_DONE]),
            loads=counters[_LOADS] if self.isolation == "process" else self.candidate.loads,
            failed_loads=(
                counters[_FAILED_LOADS]
                if self.isolation == "process"
                else self.candidate.failed_loads
            ),
            isolation=self.isolation,
            pid=self.pid,
        )
