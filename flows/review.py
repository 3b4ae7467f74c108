"""Review export flow: pick this week's prompts for human review and write the review file."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from capture.offline_statements import ParameterError
from flows.entry import from_parameters, open_run
from tasks.label_studio import FILE_FORMATS, review_file_to_label_studio_task
from tasks.review_export import (
    ReviewExport,
    ReviewSelection,
    export_review_task,
    publish_review_artifact,
)
from tasks.review_rounds import open_review_round_task
from tasks.review_select import DEFAULT_STRATEGY
from tasks.serving import serving_embedder


@flow(name="review-export", log_prints=False)
def review_export_flow(
    *,
    days: int | None = 7,
    confidence_threshold: float = 0.7,
    margin_threshold: float = 0.15,
    limit: int = 200,
    strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
    use_embeddings: bool = True,
    output: str | None = None,
    file_format: str = "json",
    open_round: bool = True,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> ReviewExport:
    """Write the spec's review file (default ``exports/review-<UTC stamp>.json``) and a table
    artifact of what was selected; returns the export (path, counts, reasons, selected rows).

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.

    ``file_format``: ``json`` (the spec's review file) or ``label-studio`` (Label Studio tasks
    with the prediction as a pre-annotation, and the labeling config next to them:
    ``tasks.label_studio``). ``open_round``: also open a review-workbench round whose queue is
    the same selection (``tasks.review_rounds``; prompts already queued in an open round are left
    out of it).
    """
    selection = from_parameters(ReviewSelection, locals())  # checks every value
    if file_format not in FILE_FORMATS:
        raise ParameterError(
            f"file_format: expected one of {', '.join(FILE_FORMATS)}, found {file_format!r}"
        )
    run = open_run(home, database_url, database_secret)
    url = run.require_database()
    embed = serving_embedder(run.layout.models_dir) if use_embeddings else None
    export = export_review_task(
        Path(output) if output else run.layout.review_export_path(),
        selection,
        url=url,
        embed=embed,
    )
    if file_format == "label-studio":
        review_file_to_label_studio_task(export.path, models_dir=run.layout.models_dir, url=url)
    publish_review_artifact(export)
    if open_round:
        # The round's queue is the same selection as the file's.
        summary = open_review_round_task(url, selection=selection, embed=embed)
        get_run_logger().info(
            "review round %s opened: %d items (%d near-duplicates with them)",
            summary.name,
            summary.items,
            summary.members,
        )
    get_run_logger().info(
        "review file %s: %d prompts selected of %d candidates",
        export.path,
        export.n_selected,
        export.n_candidates,
    )
    return export
