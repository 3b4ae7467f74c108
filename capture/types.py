"""Plain value types shared by the classifier, the service and the repository."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from capture.text import check_intent_name

#: How many runners-up the NLU service logs with each prediction (``secondary_intents``): the
#: review workbench shows these as the top-3 alternatives. A classifier may return more (the
#: service keeps the best ``RUNNERS_UP``) or fewer (all are kept).
RUNNERS_UP = 3


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a classifier says about one prompt.

    ``secondary_intents`` are the runners-up, ranked, as ``(intent, confidence)`` pairs.
    """

    intent: str
    confidence: float
    secondary_intents: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the prediction cannot be logged: an intent
        name not in the allowed form of :func:`capture.text.check_intent_name` (surrounding
        whitespace aside; the error is a ``capture.text.IntentNameError``), or a confidence
        that is not a number in [0, 1]."""
        self.normalised()

    def normalised(self) -> Prediction:
        """This prediction validated (see :meth:`validate`), with intent names stripped of
        surrounding whitespace and confidences as ``float``; ``self`` when nothing changes."""
        intent = check_intent_name(self.intent, field="Prediction.intent")
        check_confidence(self.confidence, "Prediction.confidence")
        secondary: list[tuple[str, float]] = []
        for rank, pair in enumerate(self.secondary_intents):
            where = f"Prediction.secondary_intents[{rank}]"
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"{where}: expected an (intent, confidence) pair, found {pair!r}")
            name, conf = pair
            check_confidence(conf, where)
            secondary.append((check_intent_name(name, field=where), float(conf)))
        normal = Prediction(intent, float(self.confidence), tuple(secondary))
        return self if normal == self else normal


def check_confidence(value: float, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number in [0, 1], found {value!r}")
    if math.isnan(value) or value < 0.0 or value > 1.0:
        raise ValueError(
            f"{where}: expected a number in [0, 1], found {value!r}; "
            "confidences must be probabilities"
        )


@runtime_checkable
class Classifier(Protocol):
    """Anything that turns a prompt into a :class:`Prediction`."""

    def predict(self, text: str) -> Prediction: ...


@dataclass(slots=True)
class NLUResult:
    """What ``NLUService.process_message`` returns: the prediction and the id of its log row.

    Not frozen: a frozen dataclass costs about 1 µs more to build, on every request.
    """

    intent: str
    confidence: float
    secondary_intents: tuple[tuple[str, float], ...]
    log_id: uuid.UUID
    model_version: str | None = None
