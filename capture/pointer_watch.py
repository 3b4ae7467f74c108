"""The background watch of a pointer file under a models directory: the serving pointer
``current`` (``capture.classifier.HotReloadingClassifier``) and the A/B candidate pointer
``candidate`` (``capture.ab_routing.CandidateServing``) are checked the same way."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Self


class PointerWatch(ABC):
    """Calls :meth:`reload_now` every ``interval_s`` seconds on a daemon thread (started by
    :meth:`_start_watch`) until :meth:`close`; ``sleep`` waits between checks (default: the
    interval, cut short by :meth:`close`). A check that raises goes to :meth:`_check_failed` and
    the watch goes on. ``clock`` is the subclass's time source."""

    def __init__(
        self,
        models_dir: Path | str,
        *,
        interval_s: float,
        clock: Callable[[], float],
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: expected > 0, found {interval_s}")
        self.models_dir = Path(models_dir)
        self.interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._stop.wait
        self._thread: threading.Thread | None = None

    @abstractmethod
    def reload_now(self) -> bool:
        """Check the pointer once, synchronously; True when what serves changed."""

    @abstractmethod
    def _check_failed(self) -> None:
        """Count and log a check that raised (called while its exception is handled)."""

    def _start_watch(self, thread_name: str) -> None:
        self._thread = threading.Thread(target=self._watch, name=thread_name, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._sleep(self.interval_s)
            if self._stop.is_set():
                break
            try:
                self.reload_now()
            except Exception:  # keep watching; _check_failed logs it with its traceback
                self._check_failed()

    def close(self, timeout: float = 5.0) -> None:
        """Stop watching the pointer (what is loaded keeps serving)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
