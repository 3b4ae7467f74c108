"""Prompt Capture, the online side: schema, repository, logger, NLU service, ONNX classifier.

Nothing in this package imports torch; the training side lives in ``tasks/``.
"""

from __future__ import annotations

from capture.types import NLUResult, Prediction

__all__ = ["NLUResult", "Prediction"]
