"""The monitoring dashboard: one self-contained HTML file; the same figures as Prefect artifacts.

The figures are collected once (:mod:`tasks.report_figures`), then written as

- an HTML page (:func:`write_report`; :mod:`tasks.report_html` renders the Jinja2 template
  ``tasks/templates/report.html.j2`` with the plots of :mod:`tasks.report_plots`, inline CSS
  and base64 PNGs, so the file loads nothing from the network), or
- markdown tables and a per-intent table in the Prefect UI (:func:`publish_monitoring_artifact`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.files import write_text_atomic
from tasks.report_figures import (
    DEFAULT_DAYS,
    ModelPoint,
    ReportData,
    collect_report_data,
    model_history,
    number_text,
    percent_text,
    share_text,
)
from tasks.report_html import render_report_html

logger = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_KEY",
    "ARTIFACT_TABLE_KEY",
    "DEFAULT_DAYS",
    "ModelPoint",
    "ReportData",
    "collect_report_data",
    "model_history",
    "publish_monitoring_artifact",
    "render_markdown",
    "render_report_html",
    "write_report",
]

ARTIFACT_KEY = "prompt-capture-monitoring"
ARTIFACT_TABLE_KEY = "prompt-capture-monitoring-intents"


def write_report(
    output: Path,
    url: str | None = None,
    *,
    days: float = DEFAULT_DAYS,
    low_confidence_threshold: float | None = None,
    models_dir: Path | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Collect the figures, render the HTML and write it to ``output`` atomically (a shared
    file: the umask's mode). Raises ``ParameterError`` (a ``UserError``) for a bad ``days`` or
    threshold before touching the database."""
    data = collect_report_data(
        url,
        days=days,
        low_confidence_threshold=low_confidence_threshold,
        models_dir=models_dir,
        now=now,
    )
    write_text_atomic(output, render_report_html(data))
    logger.info("report over %d prompts written to %s", data.total, output)
    return data


# --------------------------------------------------------------------------- Prefect artifacts


def _markdown_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [f"## {title}", ""]
    if not rows:
        return "\n".join([*lines, "_no data_", ""])
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    lines.append("")
    return "\n".join(lines)


def _markdown_headline(data: ReportData) -> str:
    o = data.overall
    return "\n".join(
        [
            f"# Prompt Capture monitoring — last {data.days:g} days",
            "",
            f"Window {data.since:%Y-%m-%d %H:%M} – {data.generated_at:%Y-%m-%d %H:%M} UTC.",
            "",
            "| prompts | corrected | low confidence | workflow success |",
            "|---:|---:|---:|---:|",
            f"| {o.total} | {o.corrections} ({share_text(o.corrections, o.total)}) | "
            f"{o.low_confidence} ({share_text(o.low_confidence, o.total)}) | "
            f"{share_text(o.successes, o.outcomes)} |",
            "",
        ]
    )


def render_markdown(data: ReportData) -> str:
    """The report's figures as markdown tables (for the Prefect UI), then the readout of each
    A/B test that ran in the window."""
    tables = [
        _markdown_table(
            "Confidence histogram",
            ["bucket", "prompts"],
            [("none" if b.bucket is None else f"{b.bucket:.1f}", b.count) for b in data.confidence],
        ),
        _markdown_table(
            "Intent distribution",
            ["intent", "prompts", "avg confidence", "corrections"],
            [
                (i.predicted_intent, i.count, number_text(i.avg_confidence), i.corrections)
                for i in data.intents
            ],
        ),
        _markdown_table(
            "Workflow success rate by intent",
            ["intent", "outcomes", "successes", "rate"],
            [
                (s.predicted_intent, s.total, s.successes, f"{s.success_rate:.1f}%")
                for s in data.success
            ],
        ),
        _markdown_table(
            "Per day",
            ["day", "prompts", "low confidence", "corrected", "failures"],
            [
                (
                    d.day.isoformat(),
                    d.total,
                    share_text(d.low_confidence, d.total),
                    share_text(d.corrections, d.total),
                    d.failures,
                )
                for d in data.daily
            ],
        ),
        _markdown_table(
            "Model versions",
            ["version", "created", "accuracy", "gate", "serving"],
            [
                (
                    m.version,
                    m.created_at.strftime("%Y-%m-%d") if m.created_at else "–",
                    percent_text(m.accuracy),
                    m.gate or "–",
                    "yes" if m.serving else "",
                )
                for m in data.models
            ],
        ),
    ]
    readouts = [readout.to_markdown() + "\n" for readout in data.ab]  # A/B tests in the window
    return "\n".join([_markdown_headline(data), *tables, *readouts])


def intent_table(data: ReportData) -> list[dict[str, Any]]:
    """One row per intent: prompts, average confidence, corrections, success rate (or None)."""
    rates = {s.predicted_intent: s.success_rate for s in data.success}
    return [
        {
            "intent": i.predicted_intent,
            "prompts": i.count,
            "avg_confidence": i.avg_confidence,
            "corrections": i.corrections,
            "success_rate": rates.get(i.predicted_intent),
        }
        for i in data.intents
    ]


@task(name="publish-monitoring-artifact", cache_policy=NO_CACHE)
def publish_monitoring_artifact(
    url: str | None = None,
    days: float = 7,
    *,
    models_dir: Path | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Publish the report's figures to the Prefect UI: a markdown artifact (key
    ``prompt-capture-monitoring``) and a per-intent table artifact (key
    ``prompt-capture-monitoring-intents``). Returns the headline numbers."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    data = collect_report_data(url, days=days, models_dir=models_dir, now=now)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=render_markdown(data),
        description=f"monitoring figures, last {days:g} days",
    )
    create_table_artifact(
        key=ARTIFACT_TABLE_KEY,
        table=intent_table(data),
        description=f"per-intent figures, last {days:g} days",
    )
    o = data.overall
    return {
        "prompts": o.total,
        "corrections": o.corrections,
        "correction_rate": o.correction_rate,
        "low_confidence_rate": o.low_confidence_rate,
        "success_rate": o.success_rate,
    }
