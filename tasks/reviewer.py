"""The stand-in reviewer of the demo and the simulator: fills a review file with true labels.

A real reviewer opens the review export (``tasks.review_file``'s format), sets
``corrected_intent`` on each row and drops the file in the inbox. The stand-in does the same
from the labels the traffic was sent with (``capture.traffic.TrafficResult.truth``), so the real
corrections import and the weekly cycle run on its file unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from tasks.review_file import ReviewFileError, read_review_file, write_review_file

logger = logging.getLogger(__name__)

REVIEWER_NOTE = "simulated reviewer (true label)"


def fill_review_file(
    review_path: Path, truth: Mapping[str, str], output: Path, *, note: str = REVIEWER_NOTE
) -> int:
    """Copy the review file ``review_path`` to ``output`` with ``corrected_intent`` set to the
    true label of every row (confirming or correcting the prediction) and ``notes`` to
    ``note``; ``output`` is written atomically and privately (it holds raw prompts).

    Returns the number of rows. Raises ``tasks.review_file.ReviewFileError`` (a ``UserError``)
    for a malformed review file or a row whose ``id`` is not in ``truth`` (not a prompt this
    traffic sent).
    """
    rows = read_review_file(review_path)
    for number, row in enumerate(rows, start=1):
        if row.id not in truth:
            raise ReviewFileError(
                f"{review_path}: row {number}: id {row.id} is not a prompt this simulation sent"
            )
    n = write_review_file(output, [row.reviewed(truth[row.id], note) for row in rows])
    logger.info("stand-in reviewer: %d rows of %s -> %s", n, review_path, output)
    return n


def reviewed_name(review_path: Path) -> str:
    """The name a reviewed copy of ``review-<stamp>.json`` gets: ``reviewed-<stamp>.json``."""
    return review_path.name.replace("review-", "reviewed-", 1)
