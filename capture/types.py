"""Plain value types shared by the classifier, the service and the repository."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a classifier says about one prompt.

    ``secondary_intents`` are the runners-up, ranked, as ``(intent, confidence)`` pairs.
    """

    intent: str
    confidence: float
    secondary_intents: tuple[tuple[str, float], ...] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the prediction cannot be logged."""
        if not isinstance(self.intent, str) or not self.intent.strip():
            raise ValueError(
                f"Prediction.intent: expected a non-empty string, found {self.intent!r}; "
                "fix the classifier's output"
            )
        check_confidence(self.confidence, "Prediction.confidence")
        for rank, (name, conf) in enumerate(self.secondary_intents):
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"Prediction.secondary_intents[{rank}]: expected (intent, confidence) with a "
                    f"non-empty intent, found {name!r}"
                )
            check_confidence(conf, f"Prediction.secondary_intents[{rank}]")


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
