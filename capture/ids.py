"""Client-made, time-ordered UUIDs (UUIDv7, RFC 9562): a row has its id before it is written.

:data:`uuid7` is on the request path of every logged prompt, so it avoids the per-call costs of
the obvious implementation (measured in ``bench/capture.py``): random bits come from a pool
refilled with one ``os.urandom`` call per 512 ids, and the ``uuid.UUID`` is built without
re-validating an integer that is valid by construction (:func:`uuid_from_int`).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
import weakref

_POOL_WORDS = 512
_UNPACK_POOL = struct.Struct(f">{_POOL_WORDS}Q").unpack
_MS_MASK = (1 << 48) - 1
_RAND_MASK = (1 << 62) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_COUNTER_MAX = 0xFFF
_COUNTER_START_MASK = 0x3FF  # random start, leaving headroom for increments within one ms
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_new_object = object.__new__
_set_attribute = object.__setattr__


def uuid_from_int(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` without its range check, for a value known to be a valid
    128-bit integer (what ``UUID.__init__`` itself stores: the ``int`` and ``is_safe`` slots)."""
    result = _new_object(uuid.UUID)
    _set_attribute(result, "int", value)
    _set_attribute(result, "is_safe", _SAFE_UNKNOWN)
    return result


class Uuid7Generator:
    """UUIDv7 ids: 48-bit Unix milliseconds, a 12-bit counter (RFC 9562 §6.2, method 1), then
    62 random bits. Ids from one generator are strictly increasing, also within one millisecond
    (when 4096 ids exhaust a millisecond's counter, the generator borrows the next millisecond).

    Thread-safe. Random bits come from ``os.urandom`` in pools of 512 words; a forked child
    drops the pool it inherited, so parent and child never hand out the same random bits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._pool: tuple[int, ...] = ()
        self._next = _POOL_WORDS  # the pool is empty: the first call fills it
        forget = weakref.WeakMethod(self._forget_pool)

        def after_fork_in_child() -> None:
            method = forget()
            if method is not None:
                method()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def _forget_pool(self) -> None:
        self._pool, self._next = (), _POOL_WORDS

    def next_int(self, now_ns: int | None = None) -> int:
        """The next id as a 128-bit integer (``now_ns``: Unix time in ns, default now)."""
        ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
        with self._lock:
            index = self._next
            if index > _POOL_WORDS - 2:  # an id takes up to two words
                self._pool = _UNPACK_POOL(os.urandom(8 * _POOL_WORDS))
                index = 0
            pool = self._pool
            if ms > self._last_ms:
                self._last_ms = ms
                counter = pool[index] & _COUNTER_START_MASK
                index += 1
            else:
                ms = self._last_ms
                counter = self._counter + 1
                if counter > _COUNTER_MAX:  # counter exhausted: borrow the next millisecond
                    ms = self._last_ms = ms + 1
                    counter = 0
            self._counter = counter
            self._next = index + 1
            rand = pool[index] & _RAND_MASK
        return (ms & _MS_MASK) << 80 | _VERSION_AND_VARIANT | counter << 64 | rand

    def __call__(self, now_ns: int | None = None) -> uuid.UUID:
        return uuid_from_int(self.next_int(now_ns))


uuid7 = Uuid7Generator()


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The Unix milliseconds stored in a UUIDv7."""
    return value.int >> 80
