"""UUIDv7 ids: layout (RFC 9562), ordering, the time field, and fork safety of the random pool."""

from __future__ import annotations

import itertools
import os
import pickle
import uuid

import pytest

from capture.ids import Uuid7Generator, uuid7, uuid7_time_ms, uuid_from_int

NOW_NS = 1_764_000_000_123_456_789  # 2025-11-24, a fixed instant
NOW_MS = NOW_NS // 1_000_000


def test_version_variant_and_time_field() -> None:
    generate = Uuid7Generator()
    value = generate(NOW_NS)
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert uuid7_time_ms(value) == NOW_MS
    # The integer form carries the same bits.
    raw = generate.next_int(NOW_NS + 1_000_000)
    assert raw >> 80 == NOW_MS + 1
    assert (raw >> 76) & 0xF == 7 and (raw >> 62) & 0b11 == 0b10


def test_the_fast_uuid_behaves_like_a_parsed_one() -> None:
    value = uuid7()
    parsed = uuid.UUID(str(value))
    assert value == parsed and hash(value) == hash(parsed)
    assert value.bytes == parsed.bytes and value.hex == parsed.hex
    assert pickle.loads(pickle.dumps(value)) == value
    assert uuid_from_int(parsed.int) == parsed
    with pytest.raises(TypeError):
        value.int = 5  # type: ignore[misc]  # still immutable


def test_strictly_increasing_within_one_millisecond_and_across_counter_overflow() -> None:
    generate = Uuid7Generator()
    ids = [generate.next_int(NOW_NS) for _ in range(10_000)]  # > 4096: counter overflows
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == len(ids)
    assert ids[0] >> 80 == NOW_MS
    # Overflow borrows the following milliseconds instead of repeating or going back.
    assert NOW_MS < ids[-1] >> 80 <= NOW_MS + 3


def test_clock_going_back_keeps_ids_increasing() -> None:
    generate = Uuid7Generator()
    first = generate.next_int(NOW_NS)
    earlier = generate.next_int(NOW_NS - 5_000_000_000)
    later = generate.next_int(NOW_NS + 1_000_000)
    assert first < earlier < later
    assert earlier >> 80 == NOW_MS
    assert later >> 80 == NOW_MS + 1


def test_random_bits_differ_and_span_the_pool_refill() -> None:
    generate = Uuid7Generator()
    randoms = [generate.next_int(NOW_NS + i * 1_000_000) & ((1 << 62) - 1) for i in range(1_500)]
    assert len(set(randoms)) == len(randoms)  # 62 random bits: collisions are negligible


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    generate = Uuid7Generator()
    generate.next_int(NOW_NS)  # the pool is filled before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same millisecond, same counter state as the parent
        try:
            os.write(write, generate.next_int(NOW_NS).to_bytes(16, "big"))
        finally:
            os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 16), "big")
    os.close(read)
    os.waitpid(pid, 0)
    parent = generate.next_int(NOW_NS)
    # Without the at-fork reset both would take the same pool word: the very same id.
    assert child >> 62 == parent >> 62  # same time field and counter
    assert child != parent
