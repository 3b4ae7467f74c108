"""The serving fast path: a static-embedding model in front of the ONNX model (a cascade).

numpy and ``tokenizers`` only (no torch, no model2vec): a prompt's tokens (the model's
``tokenizer.json``, without special tokens) index rows of a static table distilled from the
fine-tuned encoder; their mean, L2-normalised, goes through a linear head and a softmax. When the
top probability reaches the fitted threshold the fast path answers; otherwise it returns None and
the caller (``capture.classifier.OnnxClassifier``) asks the full model. The threshold was fitted on
validation so that the answers agree with the full model's decisions (``tasks.fast_path``, which
builds it; the files and their validation are ``capture.model_dir``'s ``FastPathMetadata`` and
``FastPathTables``).

A fast answer's confidence is the fast path's own top probability (at least the threshold), and
its runners-up are the fast path's next classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from capture.model_dir import (
    TOKENIZER_FILE,
    FastPathMetadata,
    FastPathTables,
    ModelDirError,
    ModelMetadata,
    OnnxMetadata,
    read_tokenizer,
)
from capture.types import Prediction

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)


class FastPath:
    """One model directory's fast path, loaded once; thread-safe (read-only arrays)."""

    def __init__(
        self,
        section: FastPathMetadata,
        tables: FastPathTables,
        tokenizer: Tokenizer,
        *,
        top_k: int,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1 ranked intents, found {top_k}")
        self.section = section
        self.labels = section.labels
        self.threshold = section.threshold
        self.top_k = top_k
        self._table = tables.embeddings
        self._weight = tables.weight
        self._weight_t = np.ascontiguousarray(tables.weight.T)
        self._bias = tables.bias
        self._tokenizer = tokenizer

    def __repr__(self) -> str:
        return (
            f"FastPath(labels={len(self.labels)}, dim={self.section.embedding_dim}, "
            f"threshold={self.threshold:.4f}, teacher={self.section.teacher_version!r})"
        )

    @classmethod
    def load(
        cls, model_dir: Path, model: ModelMetadata | OnnxMetadata, *, top_k: int
    ) -> FastPath | None:
        """The fast path of ``model_dir`` (None when ``metadata.json`` has no ``fast_path``
        section), checked against ``model`` (the served model's metadata). Raises
        ``ModelDirError`` when a file is malformed or belongs to another model."""
        model_dir = Path(model_dir)
        meta = ModelMetadata.read(model_dir)
        section = meta.fast_path
        if section is None:
            return None
        source = model_dir / "metadata.json"
        section.check_against(model, source)
        tables = FastPathTables.read(model_dir, section)
        tokenizer = _tokenizer(model_dir, section.vocab_size)
        return cls(section, tables, tokenizer, top_k=top_k)

    # Scoring.

    def _ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, found {type(text).__name__}")
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def _embed_one(self, text: str) -> np.ndarray | None:
        ids = self._ids(text)
        if not ids:
            return None
        vector = self._table[ids].sum(axis=0)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0.0 else None

    def _proba_one(self, text: str) -> np.ndarray | None:
        vector = self._embed_one(text)
        if vector is None:
            return None
        logits = vector @ self._weight_t + self._bias
        logits -= logits.max()
        probs = np.exp(logits)
        probs /= probs.sum()
        return probs

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised static sentence embeddings, shape ``(len(texts), dim)``; a text
        without tokens gives a zero row."""
        out = np.zeros((len(texts), self._table.shape[1]), dtype=np.float32)
        for row, text in enumerate(texts):
            vector = self._embed_one(text)
            if vector is not None:
                out[row] = vector
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities over :attr:`labels`, shape ``(len(texts), len(labels))``, computed
        exactly as :meth:`predict` computes them; a text without tokens gives a row of zeros
        (never answered)."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for row, text in enumerate(texts):
            probs = self._proba_one(text)
            if probs is not None:
                out[row] = probs
        return out

    # Answers.

    def predict(self, text: str) -> Prediction | None:
        """The fast answer for ``text``, or None when the fast path is not confident
        (top probability below :attr:`threshold`, or no tokens): ask the full model."""
        probs = self._proba_one(text)
        return None if probs is None else self._answer(probs)

    def predict_batch(self, texts: Sequence[str]) -> list[Prediction | None]:
        """:meth:`predict` of each text, in order (one at a time: a static model gains
        nothing from batching, and each answer is then exactly the single-prompt one)."""
        return [self.predict(text) for text in texts]

    def _answer(self, probs: np.ndarray) -> Prediction | None:
        best = int(probs.argmax())
        confidence = float(probs[best])
        if confidence < self.threshold:
            return None
        values = probs.tolist()
        ranked = sorted(range(len(values)), key=values.__getitem__, reverse=True)[: self.top_k]
        runners = tuple((self.labels[i], min(1.0, max(0.0, values[i]))) for i in ranked[1:])
        return Prediction(self.labels[best], min(1.0, confidence), runners)


def _tokenizer(model_dir: Path, vocab_size: int) -> Tokenizer:
    tokenizer = read_tokenizer(model_dir, fix_missing="the fast path uses the exported tokenizer")
    path = model_dir / TOKENIZER_FILE
    if tokenizer.get_vocab_size() != vocab_size:
        raise ModelDirError(
            f"{path}: vocabulary of {tokenizer.get_vocab_size()} tokens, but the fast path has "
            f"{vocab_size} rows; it was built for another tokenizer: build the fast path again"
        )
    tokenizer.no_padding()  # one text at a time: no padding to strip
    return tokenizer
