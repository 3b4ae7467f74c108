"""Synthetic prompt-log rows for ``bench/scale.py``: wire rows (``capture.spool_format``
column order, as the capture writer COPYs them) with a realistic mix, generated vectorised."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson

from bench.queries import _texts_by_intent
from capture.spool_format import EMPTY_SECONDARY, JSONB_VERSION

N_USERS = 20_000
CHUNK = 100_000


class RowMaker:
    """Wire rows (``capture.spool_format`` column order) with a realistic mix: 150 intents with
    a Zipf-like skew, confidence ~ Beta(6, 1.6), ~70% with an outcome, ~10% failed and ~2%
    corrected (both likelier at low confidence), ~20k users (5% anonymous), weekly models."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.texts = _texts_by_intent(rng)
        self.intents = sorted(self.texts)
        rng.shuffle(self.intents)
        k = len(self.intents)
        weights = 1.0 / np.arange(1, k + 1) ** 1.1
        self.weights = weights / weights.sum()
        self.users = [os.urandom(16) for _ in range(N_USERS)]

    def rows(self, created: np.ndarray, rng: np.random.Generator, start: float) -> list[Any]:
        """One wire row per ``created`` (Unix seconds, sorted)."""
        n, k = len(created), len(self.intents)
        ms = (created * 1000).astype(np.uint64)
        ids = np.empty((n, 2), dtype=">u8")
        ids[:, 0] = (
            (ms << np.uint64(16)) | np.uint64(0x7000) | rng.integers(0, 4096, n).astype(np.uint64)
        )
        ids[:, 1] = rng.integers(0, 2**62, n, dtype=np.uint64) | np.uint64(1 << 63)
        id_bytes = ids.tobytes()
        conv = os.urandom(16 * n)
        intent = rng.choice(k, n, p=self.weights)
        conf = rng.beta(6.0, 1.6, n).astype(np.float32)
        second = (intent + 1 + rng.integers(0, k - 1, n)) % k
        conf2 = ((1 - conf) * rng.uniform(0.3, 0.8, n)).astype(np.float32)
        lowness = (1 - conf) / float(np.mean(1 - conf))
        has_outcome = rng.random(n) < 0.70
        failed = has_outcome & (rng.random(n) < np.clip(0.10 / 0.70 * lowness, 0, 1))
        corrected = rng.random(n) < np.clip(0.02 * lowness, 0, 1)
        corrected_to = (intent + 1 + rng.integers(0, k - 1, n)) % k
        user_of = rng.integers(0, N_USERS, n)
        anonymous = rng.random(n) < 0.05
        pick = rng.random(n)
        message_index = rng.integers(0, 12, n)
        out: list[Any] = []
        for i in range(n):
            name = self.intents[intent[i]]
            pool = self.texts[name]
            at = datetime.fromtimestamp(float(created[i]), UTC)
            secondary = (
                JSONB_VERSION
                + orjson.dumps(
                    [{"intent": self.intents[second[i]], "confidence": round(float(conf2[i]), 4)}]
                )
                if conf2[i] > 0.01
                else EMPTY_SECONDARY
            )
            fixed = corrected[i]
            out.append(
                (
                    id_bytes[16 * i : 16 * i + 16],
                    None if anonymous[i] else self.users[user_of[i]],
                    pool[int(pick[i] * len(pool))],
                    name,
                    float(conf[i]),
                    secondary,
                    self.intents[corrected_to[i]] if fixed else None,
                    None,
                    at + timedelta(hours=2) if fixed else None,
                    (not failed[i]) if has_outcome[i] else None,
                    name if has_outcome[i] else None,
                    "upstream timeout" if failed[i] else None,
                    conv[16 * i : 16 * i + 16],
                    int(message_index[i]),
                    f"v{1 + int(created[i] - start) // (7 * 86_400)}",
                    at,
                    at,
                )
            )
        return out


def round_chunks(
    maker: RowMaker, n: int, start: float, end: float, seed: int
) -> Iterator[list[Any]]:
    """``n`` rows uniform over ``[start, end)``, in time order, ``CHUNK`` at a time."""
    rng = np.random.default_rng(seed)
    created = np.sort(rng.uniform(start, end, n))
    for i in range(0, n, CHUNK):
        yield maker.rows(created[i : i + CHUNK], rng, start)
