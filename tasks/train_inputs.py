"""What ``tasks.train.train_model`` checks before it loads a model, and its errors.

Every refusal is a ``UserError`` (one line and exit code 2 in the CLI, never retried by Prefect)
that names the real cause and the fix:

* :class:`TrainingDataError` — fewer than two labels; a pair budget (``max_pairs``) or a pairs
  file that covers fewer than two intents;
* :class:`TrainConfigError` — a hyperparameter out of range, or ``device='cuda'`` without CUDA;
* :class:`TrainOutputError` — an output directory that is not empty;
* :class:`BaseModelError` — a base model that is not a model directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from capture.errors import UserError
from capture.model_dir import ENCODER_DIR, METADATA_FILE, ModelMetadata
from tasks.evaluate import bundled_base_model
from tasks.pairs import MIN_EXAMPLES_PER_INTENT, Pair, build_pairs
from tasks.records import Record

if TYPE_CHECKING:
    from tasks.train import TrainConfig

logger = logging.getLogger(__name__)

_MAX_NAMED = 10  # intents named in a message before "and N more"


class TrainingDataError(UserError, ValueError):
    """The training data (or pairs) cannot train a classifier; the message names the intents,
    the minimum and the fix."""


class TrainConfigError(UserError, ValueError):
    """A hyperparameter out of range; the message names it, the range and the value."""


class TrainOutputError(UserError, FileExistsError):
    """The output directory is not empty (training never overwrites a model)."""


class BaseModelError(UserError, FileNotFoundError):
    """The base model to warm-start from is not a model directory."""


def resolve_base(base_model: str | os.PathLike[str] | None) -> tuple[str, ModelMetadata | None]:
    """(encoder path, parent metadata or None) for a base model argument."""
    if base_model is None:
        return bundled_base_model(), None
    p = Path(base_model)
    if (p / METADATA_FILE).exists():
        parent = ModelMetadata.read(p)
        if not (p / ENCODER_DIR).is_dir():
            raise BaseModelError(
                f"{p}: has {METADATA_FILE} but no {ENCODER_DIR}/ directory; expected a model "
                "directory written by `prompt-capture train`"
            )
        return str(p / ENCODER_DIR), parent
    if p.is_dir():
        return str(p), None
    found = "not a directory" if p.exists() else "does not exist"
    raise BaseModelError(
        f"{p}: {found}; expected a model directory ({METADATA_FILE} + {ENCODER_DIR}/) or a "
        "sentence-transformers model directory"
    )


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainOutputError(
            f"{out}: already exists and is not empty; choose a new output directory"
        )


def training_rows(train: Sequence[Record], config: TrainConfig) -> tuple[list[Record], list[str]]:
    """The rows trained on (out-of-scope rows only when ``oos_as_class``) and their sorted
    labels; raises :class:`TrainingDataError` with fewer than two labels."""
    rows = [r for r in train if config.oos_as_class or r.label != config.oos_label]
    labels = sorted({r.label for r in rows})
    if len(labels) < 2:
        raise TrainingDataError(
            f"training data: expected at least 2 labels, found {labels}; add examples of more "
            "intents"
        )
    return rows, labels


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else "")


def resolve_device(device: str) -> str:
    """The torch device to fine-tune and embed on: ``auto`` is ``cuda`` when
    ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` when CUDA is unavailable raises
    :class:`TrainConfigError` naming the fix."""
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if device == "cuda" and not available:
        build = torch.version.cuda or "none (a CPU-only build)"
        raise TrainConfigError(
            f"device: 'cuda' was asked but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA {build}); use device 'auto' or 'cpu', or install a "
            "CUDA build of torch on a machine with a visible GPU"
        )
    return device


def training_texts(
    rows: Sequence[Record],
    labels: Sequence[str],
    config: TrainConfig,
    *,
    pairs: Sequence[Pair] | None,
    extra_pairs: Sequence[Pair] | None,
) -> list[Record]:
    """The labelled texts the encoder is fine-tuned on (one cross-entropy example each).

    Every training row by default. With ``pairs`` (the weekly cycle's budgeted pairs file) or a
    ``max_pairs`` budget, the distinct texts of those pairs instead, so a retrain costs the
    budget, not the size of the training data. The texts of ``extra_pairs`` are added. Pairs of
    labels not in ``labels`` are left out (with a warning for ``extra_pairs``).

    Raises :class:`TrainingDataError` when the pairs (or the budget) cover fewer than two
    intents: fine-tuning on one intent's texts would pull every text towards that intent.
    """
    known = set(labels)
    extra = [p for p in extra_pairs or () if p.label in known]
    if extra_pairs and len(extra) < len(extra_pairs):
        unknown = sorted({p.label for p in extra_pairs} - known)
        logger.warning(
            "extra pairs: %d of %d pairs have labels not in the training data (%s); they are "
            "left out",
            len(extra_pairs) - len(extra),
            len(extra_pairs),
            _named(unknown),
        )
    if pairs is not None:
        chosen = [p for p in pairs if p.label in known]
        if not chosen and not extra:
            raise TrainingDataError(
                f"pairs: expected pairs whose labels occur in the training data, found none of "
                f"{len(pairs)}; rebuild the pairs from this training file"
            )
        texts = _pair_texts([*chosen, *extra])
        _check_two_intents(texts, len(labels), "pairs")
        return texts
    if config.max_pairs is not None:
        budget = build_pairs(rows, max_pairs=config.max_pairs, seed=config.seed)
        texts = _pair_texts([*budget, *extra])
        if len({r.label for r in texts}) < 2:
            raise TrainingDataError(
                f"max_pairs: a budget of {config.max_pairs} pair(s) of same-intent texts covers "
                f"{len({p.label for p in budget})} intent(s); fine-tuning needs the texts of at "
                "least 2 intents: set max_pairs to 2 or more (or leave it unset: every training "
                "example is used)"
            )
        return texts
    return [*rows, *_pair_texts(extra)]


def _pair_texts(pairs: Sequence[Pair]) -> list[Record]:
    """The distinct (text, label) of the anchors and positives of ``pairs``, in order."""
    seen: dict[tuple[str, str], None] = {}
    for p in pairs:
        seen.setdefault((p.anchor, p.label))
        seen.setdefault((p.positive, p.label))
    return [Record(text, label) for text, label in seen]


def _check_two_intents(texts: Sequence[Record], n_labels: int, what: str) -> None:
    covered = sorted({r.label for r in texts})
    if len(covered) < 2:
        raise TrainingDataError(
            f"{what}: the pairs cover {len(covered)} intent ({_named(covered)}) of the "
            f"{n_labels} in the training data; fine-tuning on the texts of one intent would "
            "pull every text towards it, so at least 2 intents need pairs: rebuild the pairs "
            f"from a file with at least {MIN_EXAMPLES_PER_INTENT} distinct examples of 2 or more "
            "intents"
        )
