"""Which captured prompts a human should review this week, within a review budget.

Strategies (``STRATEGIES``):

- ``random`` — a seeded random sample (the baseline the simulator compares against);
- ``threshold`` — lowest confidence first (the spec's review export);
- ``margin`` — smallest gap between the top-1 and top-2 confidences first;
- ``failed-first`` — prompts whose workflow failed first, then the rest, each by margin;
- ``diverse`` — the most uncertain prompts (by margin) spread over embedding clusters: a pool of
  about ``pool_factor`` × ``limit`` uncertain prompts is clustered with spherical k-means into
  ``limit`` clusters and the most uncertain prompt of each cluster is taken.

Shadow disagreements first (production A/B, docs/AB_TESTING.md): when a shadow candidate
predicted a logged prompt (``ReviewCandidate.shadow_intent``) and disagreed with the champion's
answer, a human label on that prompt says which model was right, the evidence the shadow
decision reads. Up to ``shadow_share`` of the budget (default :data:`DEFAULT_SHADOW_SHARE`,
half) goes first to those prompts, in the strategy's own priority order (random: a seeded
sample of them); the rest of the budget is spent by the strategy on everything left (which may
include more disagreements). Without shadow predictions the selection is unchanged.

Every strategy but ``random`` collapses near-duplicates so a batch does not spend the budget on
the same question asked twice: prompts equal after normalisation (case, punctuation, spacing) are
always collapsed, and when embeddings are available (``embeddings`` or ``embed``) so are prompts
whose cosine similarity with an already selected one reaches ``dedupe_threshold``. The first of a
group in priority order is kept. numpy only.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from capture.offline_statements import ParameterError, check_count

logger = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("random", "threshold", "margin", "failed-first", "diverse")
# The simulator's evidence (bench/RESULTS.md, "Learning-loop simulator: target run"; CLINC150,
# 150 intents, 5 labels per intent to start, 3,000 prompts and 300 reviews a week, 4 weeks, mean
# of 3 seeds): threshold 95.64 %, margin 95.50 %, random 92.88 % (all 15,000 labels: 96.42 %).
# threshold and margin are within noise of each other (seed ranges overlap); threshold has the
# higher mean and is the spec's rule, so it is the default.
DEFAULT_STRATEGY = "threshold"
#: The share of the review budget that shadow disagreements may take first (see above).
DEFAULT_SHADOW_SHARE = 0.5

EmbedFn = Callable[[Sequence[str]], np.ndarray]

_EMBED_CHUNK = 256
_KMEANS_ITERATIONS = 20
_KMEANS_RESTARTS = 3
_PUNCTUATION = re.compile(r"[^\w\s]+")


@dataclass(frozen=True, slots=True)
class ReviewCandidate:
    """A logged prompt that may be sent for review.

    ``secondary_intents`` are the runners-up as ranked ``(intent, confidence)`` pairs.
    """

    id: uuid.UUID | str
    prompt: str
    predicted_intent: str
    confidence: float
    secondary_intents: tuple[tuple[str, float], ...] = ()
    was_successful: bool | None = None
    created_at: datetime | None = None
    #: The shadow candidate's intent for this prompt (None: no shadow prediction).
    shadow_intent: str | None = None

    @property
    def shadow_disagrees(self) -> bool:
        """True when a shadow candidate predicted another intent than the answered one."""
        return self.shadow_intent is not None and self.shadow_intent != self.predicted_intent

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 confidence (top-2 is 0 when there is no runner-up)."""
        runner_up = max(
            (conf for name, conf in self.secondary_intents if name != self.predicted_intent),
            default=0.0,
        )
        return self.confidence - runner_up

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ReviewCandidate:
        """Build a candidate from a ``nlu_prompt_logs`` row (a mapping of column to value).

        ``secondary_intents`` may be stored as ``[[intent, conf], ...]`` or as
        ``[{"intent": ..., "confidence": ...}, ...]``; anything else raises ``ValueError``
        naming the row.
        """
        confidence = row.get("confidence")
        return cls(
            id=row["id"],
            prompt=str(row["prompt"]),
            predicted_intent=str(row["predicted_intent"]),
            confidence=float(confidence) if confidence is not None else 0.0,
            secondary_intents=parse_secondary_intents(
                row.get("secondary_intents"), where=f"row {row['id']}"
            ),
            was_successful=row.get("was_successful"),
            created_at=row.get("created_at"),
            shadow_intent=row.get("shadow_intent"),
        )


def check_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`STRATEGIES`, else :class:`ParameterError` naming
    them (a ``UserError``)."""
    if strategy not in STRATEGIES:
        raise ParameterError(
            f"strategy: expected one of {', '.join(STRATEGIES)}, found {strategy!r}"
        )
    return strategy


def parse_secondary_intents(value: Any, *, where: str = "value") -> tuple[tuple[str, float], ...]:
    """Normalise stored runners-up to ranked ``(intent, confidence)`` pairs."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"{where}: secondary_intents: expected a list of [intent, confidence] pairs, "
            f"found {type(value).__name__} {value!r}"
        )
    pairs: list[tuple[str, float]] = []
    for rank, item in enumerate(value):
        if isinstance(item, Mapping) and "intent" in item and "confidence" in item:
            name, conf = item["intent"], item["confidence"]
        elif isinstance(item, list | tuple) and len(item) == 2:
            name, conf = item
        else:
            raise ValueError(
                f"{where}: secondary_intents[{rank}]: expected [intent, confidence] or "
                f'{{"intent", "confidence"}}, found {item!r}'
            )
        pairs.append((str(name), float(conf)))
    pairs.sort(key=lambda pair: -pair[1])
    return tuple(pairs)


def normalise_prompt(text: str) -> str:
    """The text two prompts must share to count as exact duplicates."""
    return " ".join(_PUNCTUATION.sub(" ", text.casefold()).split())


class _Vectors:
    """L2-normalised embeddings of the candidates, given up front or computed lazily in chunks."""

    def __init__(
        self,
        candidates: Sequence[ReviewCandidate],
        embeddings: np.ndarray | None,
        embed: EmbedFn | None,
    ) -> None:
        self._candidates = candidates
        self._embed = embed
        self._cache: dict[int, np.ndarray] = {}
        self._matrix: np.ndarray | None = None
        if embeddings is not None:
            matrix = np.asarray(embeddings, dtype=np.float32)
            if matrix.ndim != 2 or matrix.shape[0] != len(candidates):
                raise ValueError(
                    f"embeddings: expected shape ({len(candidates)}, dim) — one row per "
                    f"candidate — found {matrix.shape}; pass embeddings aligned with candidates"
                )
            self._matrix = _l2_normalise(matrix)

    @property
    def available(self) -> bool:
        return self._matrix is not None or self._embed is not None

    def get(self, indices: Sequence[int], lookahead: Sequence[int] = ()) -> np.ndarray:
        """Vectors of ``indices``; missing ones are embedded with up to a chunk of ``lookahead``."""
        if self._matrix is not None:
            return self._matrix[np.asarray(indices, dtype=np.int64)]
        if self._embed is None:
            raise ValueError("no embeddings: pass `embeddings` or `embed`")
        missing = [i for i in indices if i not in self._cache]
        if missing:
            wanted = set(missing)
            extra = [i for i in lookahead if i not in self._cache and i not in wanted]
            batch = missing + extra[: max(0, _EMBED_CHUNK - len(missing))]
            vectors = np.asarray(
                self._embed([self._candidates[i].prompt for i in batch]), dtype=np.float32
            )
            if vectors.ndim != 2 or vectors.shape[0] != len(batch):
                raise ValueError(
                    f"embed: expected an array of shape ({len(batch)}, dim) for {len(batch)} "
                    f"prompts, found {vectors.shape}"
                )
            for i, row in zip(batch, _l2_normalise(vectors), strict=True):
                self._cache[i] = row
        return np.stack([self._cache[i] for i in indices]) if indices else np.zeros((0, 0))


def _l2_normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


class _Deduper:
    """Keeps the first of each group of exact (normalised) or near (cosine) duplicates."""

    def __init__(self, vectors: _Vectors | None, threshold: float) -> None:
        self._vectors = vectors
        self._threshold = threshold
        self._seen_text: set[str] = set()
        self._kept: list[np.ndarray] = []

    def is_text_duplicate(self, candidate: ReviewCandidate) -> bool:
        return normalise_prompt(candidate.prompt) in self._seen_text

    def try_keep(
        self, index: int, candidate: ReviewCandidate, lookahead: Sequence[int] = ()
    ) -> bool:
        """Keep ``candidate`` unless it duplicates one already kept; say whether it was kept."""
        key = normalise_prompt(candidate.prompt)
        if key in self._seen_text:
            return False
        vector: np.ndarray | None = None
        if self._vectors is not None and self._vectors.available:
            vector = self._vectors.get([index], lookahead)[0]
            if self._kept:
                similarity = float(np.max(np.stack(self._kept) @ vector))
                if similarity >= self._threshold:
                    return False
        self._seen_text.add(key)
        if vector is not None:
            self._kept.append(vector)
        return True


def _order(candidates: Sequence[ReviewCandidate], strategy: str) -> list[int]:
    """Indices in review priority order (stable: ties keep the input order)."""
    indices = range(len(candidates))
    if strategy == "threshold":
        return sorted(indices, key=lambda i: candidates[i].confidence)
    if strategy in ("margin", "diverse"):
        return sorted(indices, key=lambda i: candidates[i].margin)
    if strategy == "failed-first":
        return sorted(
            indices,
            key=lambda i: (candidates[i].was_successful is not False, candidates[i].margin),
        )
    raise AssertionError(strategy)


def _take_in_order(
    candidates: Sequence[ReviewCandidate], order: Sequence[int], limit: int, deduper: _Deduper
) -> list[int]:
    chosen: list[int] = []
    for position, index in enumerate(order):
        if len(chosen) >= limit:
            break
        if deduper.try_keep(
            index, candidates[index], order[position + 1 : position + 1 + _EMBED_CHUNK]
        ):
            chosen.append(index)
    return chosen


def spherical_kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    iterations: int = _KMEANS_ITERATIONS,
    restarts: int = _KMEANS_RESTARTS,
) -> np.ndarray:
    """Cluster L2-normalised ``vectors`` into ``k`` groups by cosine; returns the labels.

    k-means++ seeding, ``restarts`` runs from different seeds, the tightest one kept.
    """
    n = vectors.shape[0]
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    best_labels, best_score = np.zeros(n, dtype=np.int64), -np.inf
    for _ in range(max(1, restarts)):
        labels, score = _kmeans_once(vectors, k, rng, iterations)
        if score > best_score:
            best_labels, best_score = labels, score
    return best_labels


def _kmeans_once(
    vectors: np.ndarray, k: int, rng: np.random.Generator, iterations: int
) -> tuple[np.ndarray, float]:
    n = vectors.shape[0]
    centres = np.empty((k, vectors.shape[1]), dtype=np.float32)
    centres[0] = vectors[rng.integers(n)]
    distance = 1.0 - vectors @ centres[0]
    for c in range(1, k):
        weights = np.maximum(distance, 0.0)
        total = float(weights.sum())
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centres[c] = vectors[pick]
        distance = np.minimum(distance, 1.0 - vectors @ centres[c])
    labels = np.full(n, -1)
    for _ in range(iterations):
        new_labels = np.argmax(vectors @ centres.T, axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(k):
            members = vectors[labels == c]
            if len(members):
                centre = members.sum(axis=0)
                centres[c] = centre / max(float(np.linalg.norm(centre)), 1e-12)
    similarity = vectors @ centres.T
    labels = np.argmax(similarity, axis=1)
    return labels, float(similarity[np.arange(n), labels].sum())


def _diverse(
    candidates: Sequence[ReviewCandidate],
    *,
    limit: int,
    seed: int,
    vectors: _Vectors,
    deduper: _Deduper,
    pool_factor: int,
    exclude: frozenset[int] = frozenset(),
) -> list[int]:
    order = [i for i in _order(candidates, "diverse") if i not in exclude]
    # The pool: the most uncertain prompts, exact duplicates dropped before clustering.
    seen: set[str] = set()
    pool: list[int] = []
    for index in order:
        key = normalise_prompt(candidates[index].prompt)
        if key not in seen:
            seen.add(key)
            pool.append(index)
            if len(pool) >= pool_factor * limit:
                break
    labels = spherical_kmeans(vectors.get(pool), min(limit, len(pool)), seed=seed)
    # The most uncertain member of each cluster (pool is in uncertainty order), then runners-up
    # of each cluster in turn when a cluster's first choice is a near-duplicate of another pick.
    by_cluster: dict[int, list[int]] = {}
    for index, label in zip(pool, labels.tolist(), strict=True):
        by_cluster.setdefault(label, []).append(index)
    chosen: list[int] = []
    for members in sorted(by_cluster.values(), key=lambda m: candidates[m[0]].margin):
        for index in members:
            if deduper.try_keep(index, candidates[index]):
                chosen.append(index)
                break
        if len(chosen) >= limit:
            return chosen
    # Fewer clusters than the budget, or clusters that were all duplicates: fill by uncertainty.
    taken = set(chosen)
    rest = [i for i in order if i not in taken]
    chosen.extend(_take_in_order(candidates, rest, limit - len(chosen), deduper))
    chosen.sort(key=lambda i: candidates[i].margin)
    return chosen


def select_for_review(
    candidates: Iterable[ReviewCandidate],
    *,
    strategy: str,
    limit: int,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    embed: EmbedFn | None = None,
    dedupe_threshold: float = 0.95,
    pool_factor: int = 5,
    shadow_share: float = DEFAULT_SHADOW_SHARE,
) -> list[ReviewCandidate]:
    """Pick at most ``limit`` candidates to review with ``strategy``, in review priority order.

    Up to ``ceil(shadow_share * limit)`` of them are shadow disagreements, taken first (module
    docstring); ``shadow_share`` 0 turns that off.

    ``embeddings`` (one row per candidate, in order) or ``embed`` (prompts -> array) enable the
    cosine near-duplicate collapse; ``diverse`` needs one of them. The same inputs and ``seed``
    always give the same selection. A bad argument raises ``ParameterError`` (a ``UserError``
    and ``ValueError``) naming it.
    """
    check_strategy(strategy)
    check_count(limit, "limit", minimum=0)
    if not (0.0 < dedupe_threshold <= 1.0) or math.isnan(dedupe_threshold):
        raise ParameterError(
            f"dedupe_threshold: expected a cosine similarity in (0, 1], found {dedupe_threshold!r}"
        )
    check_count(pool_factor, "pool_factor")
    if not 0.0 <= shadow_share <= 1.0:
        raise ParameterError(
            f"shadow_share: expected a share of the budget in [0, 1], found {shadow_share!r}"
        )
    items = list(candidates)
    vectors = _Vectors(items, embeddings, embed)
    if strategy == "diverse" and not vectors.available:
        raise ParameterError(
            "strategy 'diverse' clusters prompt embeddings: pass `embeddings` (one row per "
            "candidate) or `embed` (e.g. the serving classifier's .embed)"
        )
    if limit == 0 or not items:
        return []
    disagree = [i for i, c in enumerate(items) if c.shadow_disagrees]
    quota = min(len(disagree), math.ceil(shadow_share * limit))
    if strategy == "random":
        rng = np.random.default_rng(seed)
        if not quota:  # no shadow predictions: the plain seeded sample
            return [items[i] for i in rng.permutation(len(items))[:limit].tolist()]
        sampled = [disagree[i] for i in rng.permutation(len(disagree))[:quota].tolist()]
        seen = set(sampled)
        rest = [i for i in rng.permutation(len(items)).tolist() if i not in seen]
        return [items[i] for i in sampled + rest[: limit - len(sampled)]]
    deduper = _Deduper(vectors if vectors.available else None, dedupe_threshold)
    # Shadow disagreements first, in the strategy's priority order (docstring).
    order = _order(items, strategy)
    flagged = set(disagree)
    first = _take_in_order(items, [i for i in order if i in flagged], quota, deduper)
    taken = frozenset(first)
    if len(first) >= limit:
        chosen: list[int] = []
    elif strategy == "diverse":
        chosen = _diverse(
            items,
            limit=limit - len(first),
            seed=seed,
            vectors=vectors,
            deduper=deduper,
            pool_factor=pool_factor,
            exclude=taken,
        )
    else:
        rest = [i for i in order if i not in taken]
        chosen = _take_in_order(items, rest, limit - len(first), deduper)
    logger.debug(
        "selected %d of %d candidates with %s (%d shadow disagreements first)",
        len(first) + len(chosen),
        len(items),
        strategy,
        len(first),
    )
    return [items[i] for i in first + chosen]
