"""Client-made, time-ordered UUIDs (UUIDv7, RFC 9562): a row has its id before it is written."""

from __future__ import annotations

import os
import threading
import time
import uuid


class Uuid7Generator:
    """UUIDv7 ids: 48-bit Unix milliseconds, a 12-bit counter (RFC 9562 §6.2, method 1), then
    62 random bits. Ids from one generator are strictly increasing, also within one millisecond.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self, now_ns: int | None = None) -> uuid.UUID:
        ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
        with self._lock:
            if ms > self._last_ms:
                self._last_ms = ms
                # Random start, with headroom left for increments within the millisecond.
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            else:
                self._counter += 1
                if self._counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                    self._last_ms += 1
                    self._counter = 0
            ms, counter = self._last_ms, self._counter
        rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
        return uuid.UUID(int=value)


uuid7 = Uuid7Generator()


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The Unix milliseconds stored in a UUIDv7."""
    return value.int >> 80
