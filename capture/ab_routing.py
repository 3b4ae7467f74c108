"""Serving a candidate beside the champion: sticky canary assignment and the candidate's model.

The registry's candidate pointer (``models_dir/candidate``, :func:`capture.pointers.
read_candidate`) names a challenger version, a mode and a share (docs/AB_TESTING.md):

- ``shadow``: the champion answers every prompt; the candidate predicts it afterwards, off the
  request path (:class:`capture.shadow.ShadowWorker`);
- ``canary``: a sticky ``share`` of users gets the candidate's answer. The arm is a hash of
  ``user_id`` (16 bytes), or of ``conversation_id`` when there is no user, salted with the
  candidate version: the same user always lands in the same arm for one candidate, and the next
  candidate draws a fresh split. A prompt with neither id is answered by the champion.

:class:`CandidateServing` watches the pointer and loads the candidate in the background with the
hot reload's rule: a candidate that fails to load or validate never serves (the champion keeps
all traffic), the failure is logged and counted, and it is not retried until the pointer changes.
Clearing the pointer drops the candidate with one reference assignment: a request in flight
finishes on the route it read, every later request gets the champion.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capture.classifier import ModelLoadError, OnnxClassifier
from capture.model_dir import ModelDirError
from capture.pointer_watch import PointerWatch
from capture.pointers import CANDIDATE_FILE, CandidatePointer, read_candidate
from capture.types import RUNNERS_UP, Classifier

logger = logging.getLogger(__name__)

_SCALE = 1 << 64
Loader = Callable[[Path], Classifier]


def arm_bucket(key: bytes, salt: bytes) -> int:
    """The key's bucket in [0, 2**64): BLAKE2b-64 of ``key`` keyed by ``salt`` (<= 64 bytes)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=salt).digest(), "big")


def sticky_key(user: bytes | None, conversation: bytes | None) -> bytes | None:
    """What the arm is drawn from: the user id's bytes, else the conversation id's, else None."""
    return user if user is not None else conversation


def in_canary(key: bytes | None, share: float, salt: bytes) -> bool:
    """True when ``key`` falls in the first ``share`` of buckets (False for no key)."""
    if key is None or share <= 0.0:
        return False
    return arm_bucket(key, salt) < int(share * _SCALE)


@dataclass(frozen=True, slots=True)
class CandidateRoute:
    """The loaded candidate and how it serves; replaced as a whole, never mutated."""

    pointer: CandidatePointer
    classifier: Classifier
    salt: bytes
    threshold: int  # share scaled to [0, 2**64]

    @property
    def version(self) -> str:
        return self.pointer.version

    def answers(self, user: bytes | None, conversation: bytes | None) -> bool:
        """True when this canary answers the prompt of ``user`` / ``conversation``."""
        key = user if user is not None else conversation
        if key is None or self.threshold <= 0:
            return False
        return arm_bucket(key, self.salt) < self.threshold


def make_route(pointer: CandidatePointer, classifier: Classifier) -> CandidateRoute:
    salt = hashlib.blake2b(pointer.version.encode("utf-8"), digest_size=16).digest()
    threshold = int(pointer.share * _SCALE) if pointer.mode == "canary" else 0
    return CandidateRoute(pointer, classifier, salt, threshold)


@dataclass(frozen=True, slots=True)
class OnnxLoader:
    """Loads a candidate directory as serving does (:class:`OnnxClassifier`, ``threads``
    intra-op threads). A plain picklable object, so a shadow worker process can rebuild it."""

    threads: int = 1

    def __call__(self, path: Path) -> Classifier:
        return OnnxClassifier(path, threads=self.threads, top_k=1 + RUNNERS_UP)


def onnx_loader(threads: int = 1) -> Loader:
    """Load a candidate directory as serving does (:class:`OnnxLoader`)."""
    return OnnxLoader(threads)


class CandidateServing(PointerWatch):
    """The candidate under test, as ``models_dir/candidate`` names it; reloaded in the background.

    ``route`` is None (champion only) or the current :class:`CandidateRoute`; the request path
    reads it once per request. ``loader`` builds a classifier from a version directory (default:
    :class:`OnnxClassifier`; tests and the A/B simulation pass synthetic ones) and must raise
    ``ModelLoadError`` (or ``ModelDirError``/``OSError``) for a directory that cannot serve.
    """

    def __init__(
        self,
        models_dir: Path | str,
        *,
        loader: Loader | None = None,
        interval_s: float = 2.0,
        watch: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(models_dir, interval_s=interval_s, clock=clock)
        self.loader: Loader = loader or onnx_loader()
        self._lock = threading.Lock()
        self.route: CandidateRoute | None = None
        self._seen: CandidatePointer | None = None
        self._failed: CandidatePointer | None = None
        self.loads = 0
        self.failed_loads = 0
        self.last_error: str | None = None
        self.reload_now()
        if watch:
            self._start_watch("candidate-hot-reload")

    @property
    def version(self) -> str | None:
        route = self.route
        return None if route is None else route.version

    def stats(self) -> dict[str, Any]:
        route = self.route
        return {
            "candidate_version": None if route is None else route.version,
            "mode": None if route is None else route.pointer.mode,
            "share": None if route is None else route.pointer.share,
            "loads": self.loads,
            "failed_loads": self.failed_loads,
            "last_error": self.last_error,
        }

    def reload_now(self) -> bool:
        """Check the pointer once, synchronously; True when the route changed."""
        with self._lock:
            try:
                pointer = read_candidate(self.models_dir)
            except (ModelDirError, OSError) as exc:
                # A malformed pointer: nothing may serve from it; the champion takes all.
                changed = self.route is not None
                self.route = None
                self._fail(None, f"{self.models_dir / CANDIDATE_FILE}: {exc}")
                return changed
            if pointer is None:
                changed = self.route is not None
                self.route, self._seen, self._failed = None, None, None
                if changed:
                    logger.info("candidate cleared: the champion answers all traffic")
                return changed
            if pointer in (self._seen, self._failed):
                return False
            current = self.route
            if current is not None and current.version == pointer.version:
                # Same model, new mode or share: no reload, a new route.
                self.route = make_route(pointer, current.classifier)
                self._seen = pointer
                return not current.pointer.same_route(pointer)
            self.route = None  # the old candidate stops serving before the new one loads
            try:
                classifier = self.loader(self.models_dir / pointer.version)
            except (ModelLoadError, ModelDirError, OSError) as exc:
                self._fail(pointer, str(exc))
                return current is not None
            version = getattr(classifier, "version", pointer.version)
            if version != pointer.version:
                logger.warning(
                    "candidate %s: model.onnx says version %s; serving it as %s",
                    pointer.version,
                    version,
                    pointer.version,
                )
            self.route = make_route(pointer, classifier)
            self._seen, self._failed, self.last_error = pointer, None, None
            self.loads += 1
            logger.info(
                "candidate %s loaded (%s, share %.3f)", pointer.version, pointer.mode, pointer.share
            )
            return True

    def _fail(self, pointer: CandidatePointer | None, message: str) -> None:
        self._failed = pointer
        self._seen = None
        if message != self.last_error:
            self.failed_loads += 1
            self.last_error = message
            logger.error("candidate refused, the champion keeps all traffic: %s", message)

    def _check_failed(self) -> None:
        self.failed_loads += 1
        logger.exception("candidate check failed; route unchanged")
