"""What ``tasks.train.train_model`` checks before it loads a model, and its errors.

Every refusal is a ``UserError`` (one line and exit code 2 in the CLI, never retried by Prefect)
that names the real cause and the fix:

* :class:`TrainingDataError` — fewer than two labels; fewer than two intents with
  :data:`tasks.pairs.MIN_EXAMPLES_PER_INTENT` distinct examples (fine-tuning packs pairs of
  *different* intents into a batch, so it needs pairs of at least two), naming every intent
  short of the minimum with its count; a pair budget (``max_pairs``) or a pairs file that covers
  fewer than two intents;
* :class:`TrainConfigError` — a hyperparameter out of range;
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
from tasks.pairs import MIN_EXAMPLES_PER_INTENT, Pair, group_by_label, pairable_labels
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


def check_pairs_possible(
    rows: Sequence[Record],
    labels: Sequence[str],
    config: TrainConfig,
    *,
    pairs: Sequence[Pair] | None,
    extra_pairs: Sequence[Pair] | None,
) -> None:
    """Refuse, naming the real cause, data whose pairs cannot fill a batch of two intents (a
    batch holds pairs of distinct intents, so fine-tuning needs pairs of at least two); warn
    about intents that get no pair (the head still learns them, the encoder does not)."""
    known = set(labels)
    extra_labels = {p.label for p in extra_pairs or () if p.label in known}
    if extra_pairs and len(extra_labels) < len({p.label for p in extra_pairs}):
        unknown = sorted({p.label for p in extra_pairs} - known)
        logger.warning(
            "extra pairs: %d of %d pairs have labels not in the training data (%s); they are "
            "left out",
            sum(p.label not in known for p in extra_pairs),
            len(extra_pairs),
            _named(unknown),
        )
    if pairs is not None:
        covered = sorted({p.label for p in pairs if p.label in known} | extra_labels)
        if not covered:
            raise TrainingDataError(
                f"pairs: expected pairs whose labels occur in the training data, found none of "
                f"{len(pairs)}; rebuild the pairs from this training file"
            )
        if len(covered) < 2:
            raise TrainingDataError(
                f"pairs: the pairs cover {len(covered)} intent ({_named(covered)}) of the "
                f"{len(labels)} in the training data; a training batch holds pairs of different "
                "intents, so at least 2 intents need pairs: rebuild the pairs from a file with "
                f"at least {MIN_EXAMPLES_PER_INTENT} distinct examples of 2 or more intents"
            )
        return
    groups = group_by_label(rows)
    pairable = pairable_labels(groups)
    short = [f"{label} ({len(groups[label])})" for label in labels if label not in pairable]
    if len(set(pairable) | extra_labels) < 2:
        raise TrainingDataError(
            f"training data: too few examples per intent to form pairs (two different texts of "
            f"the same intent): an intent needs at least {MIN_EXAMPLES_PER_INTENT} distinct "
            f"examples, and at least 2 intents need them; {len(pairable)} of {len(labels)} "
            f"intents have enough. Intents with fewer than {MIN_EXAMPLES_PER_INTENT} distinct "
            f"examples (count): {_named(short)}. Add examples so that at least 2 intents (best: "
            f"every intent) have {MIN_EXAMPLES_PER_INTENT} or more distinct texts"
        )
    budget = pair_budget(rows, labels, config)
    if budget < 2 and len(extra_labels) < 2:
        raise TrainingDataError(
            f"max_pairs: a budget of {budget} pair(s) covers at most {budget} intent; a "
            "training batch holds pairs of different intents, so at least 2 are needed: set "
            "max_pairs to 2 or more (or leave it unset: about one pair per example)"
        )
    if short:
        logger.warning(
            "intents with fewer than %d distinct examples get no pairs (the head learns them, "
            "the encoder does not): %s; add examples",
            MIN_EXAMPLES_PER_INTENT,
            _named(short),
        )


def pair_budget(rows: Sequence[Record], labels: Sequence[str], config: TrainConfig) -> int:
    """How many pairs to build: ``max_pairs``, else ``pairs_per_example`` per row (at least
    one per label)."""
    if config.max_pairs is not None:
        return config.max_pairs
    return max(round(config.pairs_per_example * len(rows)), len(labels))
