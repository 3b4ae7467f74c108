"""The monitoring dashboard: one self-contained HTML file; the same figures as Prefect artifacts.

Figures (over the last ``days`` days, from the design note's monitoring queries in
``capture.queries`` plus one per-day query defined here):

- confidence histogram (``select_confidence_distribution``),
- intent distribution with corrections per intent (``select_intent_distribution``),
- workflow success rate by intent (``select_success_rate_by_intent``),
- correction rate overall, per intent and per day,
- low-confidence rate per day (confidence below ``low_confidence_threshold``),
- model versions over time with their evaluation accuracy (the registry under ``models_dir``).

Plots are PNGs drawn with matplotlib's Agg canvas (imported inside the render function) and
inlined as base64 ``data:`` URIs; CSS is inline; the file loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Date, case, false, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement

from capture import queries
from capture.db import database_url, get_sync_engine
from capture.queries import (
    ConfidenceBucket,
    IntentStats,
    IntentSuccessRate,
    as_real,
    since_days,
    to_utc,
    utc_now,
)
from capture.types import check_confidence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

C = queries.C
DEFAULT_DAYS = 30
ARTIFACT_KEY = "prompt-capture-monitoring"
ARTIFACT_TABLE_KEY = "prompt-capture-monitoring-intents"


# --------------------------------------------------------------------------- data


class utc_day(FunctionElement[date]):  # SQL function style name
    """The UTC calendar day of a timestamp column, on both databases."""

    name = "utc_day"
    type = Date()
    inherit_cache = True


@compiles(utc_day)
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite stores timestamps as naive UTC text.
    return f"date({compiler.process(element.clauses, **kw)})"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(timezone('UTC', {compiler.process(element.clauses, **kw)}) AS DATE)"


@dataclass(frozen=True, slots=True)
class DailyStats:
    """One UTC day of traffic."""

    day: date
    total: int
    low_confidence: int
    corrections: int
    outcomes: int  # rows with a known workflow outcome
    failures: int

    @property
    def low_confidence_rate(self) -> float:
        return self.low_confidence / self.total if self.total else 0.0

    @property
    def correction_rate(self) -> float:
        return self.corrections / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class ModelPoint:
    """One registry version: when it was trained and how it evaluated."""

    version: str
    created_at: datetime | None
    accuracy: float | None
    macro_f1: float | None
    serving: bool
    gate: str | None


@dataclass(frozen=True, slots=True)
class ReportData:
    generated_at: datetime
    since: datetime
    days: float
    low_confidence_threshold: float
    confidence: list[ConfidenceBucket]
    intents: list[IntentStats]
    success: list[IntentSuccessRate]
    daily: list[DailyStats]
    models: list[ModelPoint] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.count for i in self.intents)

    @property
    def corrections(self) -> int:
        return sum(i.corrections for i in self.intents)

    @property
    def correction_rate(self) -> float:
        return self.corrections / self.total if self.total else 0.0

    @property
    def low_confidence(self) -> int:
        return sum(d.low_confidence for d in self.daily)

    @property
    def low_confidence_rate(self) -> float:
        return self.low_confidence / self.total if self.total else 0.0

    @property
    def outcomes(self) -> int:
        return sum(s.total for s in self.success)

    @property
    def successes(self) -> int:
        return sum(s.successes for s in self.success)

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.outcomes if self.outcomes else None


def select_daily_stats(*, since: datetime | None, low_confidence_threshold: float) -> Any:
    """Per UTC day: prompts, low-confidence prompts, corrections, known outcomes, failures."""
    day = utc_day(C.created_at).label("day")
    # Compare with the float4 value of the threshold: a stored REAL 0.7 is not below 0.7.
    threshold = as_real(low_confidence_threshold)
    stmt = select(
        day,
        func.count().label("total"),
        func.count(case((C.confidence < threshold, 1))).label("low_confidence"),
        func.count(C.corrected_intent).label("corrections"),
        func.count(C.was_successful).label("outcomes"),
        func.count(case((C.was_successful == false(), 1))).label("failures"),
    ).group_by(day)
    if since is not None:
        stmt = stmt.where(C.created_at > to_utc(since, "since"))
    return stmt.order_by(day)


def _as_date(value: date | str) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        logger.warning("registry: created_at %r is not an ISO 8601 time; plotted without it", value)
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _first_number(
    sources: Sequence[dict[str, Any]], paths: Sequence[tuple[str, ...]]
) -> float | None:
    for source in sources:
        for path in paths:
            value: Any = source
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return None


_ACCURACY_PATHS = (
    ("evaluation", "all", "challenger", "accuracy"),
    ("evaluation", "base test", "challenger", "accuracy"),
    ("accuracy",),
    ("val_accuracy",),
    ("test_accuracy",),
)
_MACRO_F1_PATHS = (
    ("evaluation", "all", "challenger", "macro_f1"),
    ("evaluation", "base test", "challenger", "macro_f1"),
    ("macro_f1",),
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def model_history(models_dir: Path) -> list[ModelPoint]:
    """Every registry version with its creation time and evaluation accuracy, oldest first.

    Accuracy is read from metrics.json (the weekly cycle's evaluation) and falls back to the
    ``metrics`` of metadata.json (the training run's own evaluation).
    """
    from tasks.registry import list_models

    points = []
    for entry in list_models(models_dir):
        metadata = _read_json(entry.path / "metadata.json")
        metadata_metrics = metadata.get("metrics")
        sources = [entry.metrics, metadata_metrics if isinstance(metadata_metrics, dict) else {}]
        points.append(
            ModelPoint(
                version=entry.version,
                created_at=_parse_time(entry.created_at),
                accuracy=_first_number(sources, _ACCURACY_PATHS),
                macro_f1=_first_number(sources, _MACRO_F1_PATHS),
                serving=entry.serving,
                gate=entry.gate,
            )
        )
    return points


def collect_report_data(
    url: str | None = None,
    *,
    days: float = DEFAULT_DAYS,
    low_confidence_threshold: float | None = None,
    models_dir: Path | None = None,
    now: datetime | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> ReportData:
    """Run the monitoring queries over the last ``days`` days and read the registry."""
    from capture.settings import get_settings

    settings = get_settings()
    threshold = (
        settings.review_confidence_threshold
        if low_confidence_threshold is None
        else low_confidence_threshold
    )
    check_confidence(threshold, "low_confidence_threshold")
    generated_at = to_utc(now if now is not None else clock(), "now")
    since = since_days(generated_at, days)
    assert since is not None
    with Session(get_sync_engine(database_url(url))) as session:
        confidence = [
            queries.map_confidence_bucket(r)
            for r in session.execute(queries.select_confidence_distribution(since=since))
        ]
        intents = [
            queries.map_intent_stats(r)
            for r in session.execute(queries.select_intent_distribution(since=since))
        ]
        success = [
            queries.map_success_rate(r)
            for r in session.execute(queries.select_success_rate_by_intent(since=since))
        ]
        daily = [
            DailyStats(
                day=_as_date(r.day),
                total=int(r.total),
                low_confidence=int(r.low_confidence),
                corrections=int(r.corrections),
                outcomes=int(r.outcomes),
                failures=int(r.failures),
            )
            for r in session.execute(
                select_daily_stats(since=since, low_confidence_threshold=threshold)
            )
        ]
    return ReportData(
        generated_at=generated_at,
        since=since,
        days=days,
        low_confidence_threshold=threshold,
        confidence=confidence,
        intents=intents,
        success=success,
        daily=daily,
        models=model_history(models_dir if models_dir is not None else settings.models_dir),
    )


# --------------------------------------------------------------------------- plots

_BLUE, _GREEN, _ORANGE, _RED = "#3b6ea8", "#3f8f5a", "#d08a2e", "#b8433c"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(height: float = 3.2, width: float = 9.0) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _bar_height(n: int) -> float:
    return max(2.2, min(0.32 * n + 1.0, 9.0))


def plot_confidence(buckets: Sequence[ConfidenceBucket]) -> str:
    fig, ax = _figure()
    known = sorted((b for b in buckets if b.bucket is not None), key=lambda b: b.bucket or 0.0)
    ax.bar([b.bucket for b in known], [b.count for b in known], width=0.08, color=_BLUE)
    ax.set_xticks([i / 10 for i in range(11)])
    ax.set_xlim(-0.06, 1.06)
    ax.set_xlabel("confidence (rounded to 0.1)")
    ax.set_ylabel("prompts")
    return _png(fig)


def plot_intents(intents: Sequence[IntentStats], top: int) -> str:
    shown = list(intents[:top])[::-1]
    fig, ax = _figure(height=_bar_height(len(shown)))
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    names = [i.predicted_intent for i in shown]
    ax.barh(names, [i.count for i in shown], color=_BLUE, label="prompts")
    ax.barh(names, [i.corrections for i in shown], color=_ORANGE, label="corrected")
    ax.set_xlabel("prompts")
    ax.legend(loc="lower right", frameon=False)
    return _png(fig)


def plot_success(success: Sequence[IntentSuccessRate], top: int) -> str:
    shown = list(success[:top])[::-1]  # lowest rate first in the query: show those on top
    fig, ax = _figure(height=_bar_height(len(shown)))
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    colors = [_RED if s.success_rate < 80 else _GREEN for s in shown]
    ax.barh([s.predicted_intent for s in shown], [s.success_rate for s in shown], color=colors)
    ax.set_xlim(0, 100)
    ax.set_xlabel("workflow success rate (%)")
    return _png(fig)


def plot_daily_rate(daily: Sequence[DailyStats], attribute: str, color: str, label: str) -> str:
    fig, ax = _figure(height=2.8)
    days = [d.day for d in daily]
    rates = [100 * getattr(d, attribute) for d in daily]
    ax.plot(days, rates, marker="o", color=color)
    ax.set_ylim(0, min(100.0, max(5.0, 1.3 * max(rates, default=0.0))))
    ax.set_ylabel(label)
    fig.autofmt_xdate()
    return _png(fig)


def plot_models(models: Sequence[ModelPoint]) -> str:
    fig, ax = _figure(height=3.0)
    dated = [m for m in models if m.created_at is not None and m.accuracy is not None]
    xs = [m.created_at for m in dated]
    ys = [100 * (m.accuracy or 0.0) for m in dated]
    ax.plot(xs, ys, marker="o", color=_BLUE)
    for m, x, y in zip(dated, xs, ys, strict=True):
        ax.annotate(
            f"v{m.version}" + (" (serving)" if m.serving else ""),
            (x, y),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    low = min(ys, default=0.0)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("evaluation accuracy (%)")
    fig.autofmt_xdate()
    return _png(fig)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;
color:#1d2330}
header{background:#1f2a44;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;color:#c9d1e3;font-size:13px}
main{max-width:1080px;margin:0 auto;padding:20px 24px 40px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:8px}
.card{background:#fff;border-radius:8px;padding:12px 16px;min-width:150px;flex:1;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#5b6478}
section{background:#fff;border-radius:8px;padding:16px 20px;margin-top:16px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
section h2{margin:0 0 8px;font-size:17px} section p.note{color:#5b6478;font-size:13px;margin:4px 0}
img{max-width:100%;height:auto;display:block;margin:8px 0}
table{border-collapse:collapse;font-size:13px;margin-top:6px;min-width:50%}
th,td{padding:4px 10px;border-bottom:1px solid #e3e6ec;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f0f2f6;font-weight:600}
.empty{color:#7a8296;font-style:italic;padding:12px 0}
details summary{cursor:pointer;color:#3b6ea8;font-size:13px;margin-top:6px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _share(hits: int, total: int) -> str:
    """``hits / total`` as a percentage with one decimal, rounded half up exactly (the design
    note's ``ROUND(100.0 * hits / total, 1)``); "–" when ``total`` is 0."""
    if total == 0:
        return "–"
    tenths = (2000 * hits + total) // (2 * total)
    return f"{tenths // 10}.{tenths % 10}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{png}">'


def _section(section_id: str, title: str, note: str, body: str) -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{note_html}{body}</section>'


def _empty(message: str) -> str:
    return f'<p class="empty">{_e(message)}</p>'


def render_report_html(data: ReportData, *, top_intents: int = 25) -> str:
    """The dashboard as one HTML document (inline CSS, base64 PNG plots)."""
    span = f"last {data.days:g} days"
    window = f"{span} ({data.since:%Y-%m-%d %H:%M} – {data.generated_at:%Y-%m-%d %H:%M} UTC)"
    no_traffic = _empty(f"No prompts were logged in the {span}.")
    serving = next((m.version for m in data.models if m.serving), None)
    cards = [
        ("prompts", f"{data.total:,}"),
        ("corrected", f"{data.corrections:,} ({_share(data.corrections, data.total)})"),
        (
            f"low confidence (< {data.low_confidence_threshold:g})",
            f"{data.low_confidence:,} ({_share(data.low_confidence, data.total)})",
        ),
        ("workflow success", _share(data.successes, data.outcomes)),
        ("serving model", f"v{serving}" if serving else "none"),
    ]
    sections = [
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    ]

    # Confidence histogram.
    if data.total:
        body = _img(plot_confidence(data.confidence), "confidence histogram") + _table(
            ["confidence bucket", "prompts", "share"],
            [
                (
                    "none" if b.bucket is None else f"{b.bucket:.1f}",
                    b.count,
                    _share(b.count, data.total),
                )
                for b in data.confidence
            ],
            "confidence-table",
        )
    else:
        body = no_traffic
    sections.append(
        _section("confidence", "Confidence histogram", "Prompts per rounded confidence.", body)
    )

    # Intent distribution.
    if data.intents:
        more = len(data.intents) - top_intents
        note = (
            f"Top {top_intents} intents plotted; all {len(data.intents)} in the table."
            if more > 0
            else ""
        )
        body = (
            _img(plot_intents(data.intents, top_intents), "intent distribution")
            + (f'<p class="note">{_e(note)}</p>' if note else "")
            + _table(
                ["predicted intent", "prompts", "share", "avg confidence", "corrections"],
                [
                    (
                        i.predicted_intent,
                        i.count,
                        _share(i.count, data.total),
                        _num(i.avg_confidence),
                        i.corrections,
                    )
                    for i in data.intents
                ],
                "intent-table",
            )
        )
    else:
        body = no_traffic
    sections.append(_section("intents", "Intent distribution", "", body))

    # Success rate by intent.
    if data.success:
        body = _img(plot_success(data.success, top_intents), "success rate by intent") + _table(
            ["predicted intent", "outcomes", "successes", "success rate"],
            [
                (s.predicted_intent, s.total, s.successes, f"{s.success_rate:.1f}%")
                for s in data.success
            ],
            "success-table",
        )
    else:
        body = _empty("No workflow outcomes were reported in this window.")
    sections.append(
        _section(
            "success",
            "Workflow success rate by intent",
            "Prompts whose workflow outcome is known; lowest rate first (red: below 80%).",
            body,
        )
    )

    # Correction rate.
    if data.total:
        corrected = sorted(
            (i for i in data.intents if i.corrections),
            key=lambda i: (-i.corrections / i.count, i.predicted_intent),
        )
        body = (
            f'<p class="note">Overall: {data.corrections:,} of {data.total:,} prompts corrected '
            f"({_share(data.corrections, data.total)}).</p>"
            + _img(
                plot_daily_rate(data.daily, "correction_rate", _ORANGE, "corrected (%)"),
                "correction rate per day",
            )
            + _table(
                ["day", "prompts", "corrected", "correction rate"],
                [
                    (d.day.isoformat(), d.total, d.corrections, _share(d.corrections, d.total))
                    for d in data.daily
                ],
                "correction-daily-table",
            )
            + (
                _table(
                    ["predicted intent", "prompts", "corrected", "correction rate"],
                    [
                        (i.predicted_intent, i.count, i.corrections, _share(i.corrections, i.count))
                        for i in corrected
                    ],
                    "correction-intent-table",
                )
                if corrected
                else _empty("No prompt in this window was corrected.")
            )
        )
    else:
        body = no_traffic
    sections.append(_section("corrections", "Correction rate", "", body))

    # Low-confidence rate per day.
    if data.total:
        body = _img(
            plot_daily_rate(data.daily, "low_confidence_rate", _RED, "low confidence (%)"),
            "low-confidence rate per day",
        ) + _table(
            ["day", "prompts", "low confidence", "rate"],
            [
                (d.day.isoformat(), d.total, d.low_confidence, _share(d.low_confidence, d.total))
                for d in data.daily
            ],
            "low-confidence-table",
        )
    else:
        body = no_traffic
    sections.append(
        _section(
            "low-confidence",
            "Low-confidence rate per day",
            f"Share of prompts with confidence below {data.low_confidence_threshold:g} (UTC days).",
            body,
        )
    )

    # Model versions.
    if data.models:
        plottable = [m for m in data.models if m.created_at is not None and m.accuracy is not None]
        body = (
            _img(plot_models(data.models), "model versions over time")
            if plottable
            else _empty("No version has both a creation time and an evaluation accuracy yet.")
        ) + _table(
            ["version", "created", "accuracy", "macro-F1", "gate", "serving"],
            [
                (
                    m.version,
                    m.created_at.strftime("%Y-%m-%d %H:%M") if m.created_at else "–",
                    _pct(m.accuracy),
                    _num(m.macro_f1),
                    m.gate or "–",
                    "yes" if m.serving else "",
                )
                for m in data.models
            ],
            "models-table",
        )
    else:
        body = _empty("The model registry is empty: no version has been trained yet.")
    sections.append(
        _section("models", "Model versions", "Evaluation accuracy of each registry version.", body)
    )

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Prompt Capture report {data.generated_at:%Y-%m-%d}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>Prompt Capture monitoring</h1><p>{_e(window)} · generated "
        f"{data.generated_at:%Y-%m-%d %H:%M} UTC</p></header><main>"
        + "".join(sections)
        + "</main></body></html>\n"
    )


def write_report(
    output: Path,
    url: str | None = None,
    *,
    days: float = DEFAULT_DAYS,
    low_confidence_threshold: float | None = None,
    models_dir: Path | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Collect the figures, render the HTML and write it to ``output`` atomically."""
    from tasks.registry import write_text_atomic

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


def render_markdown(data: ReportData) -> str:
    """The report's figures as markdown tables (for the Prefect UI)."""
    lines = [
        f"# Prompt Capture monitoring — last {data.days:g} days",
        "",
        f"Window {data.since:%Y-%m-%d %H:%M} – {data.generated_at:%Y-%m-%d %H:%M} UTC.",
        "",
        "| prompts | corrected | low confidence | workflow success |",
        "|---:|---:|---:|---:|",
        f"| {data.total} | {data.corrections} ({_share(data.corrections, data.total)}) | "
        f"{data.low_confidence} ({_share(data.low_confidence, data.total)}) | "
        f"{_share(data.successes, data.outcomes)} |",
        "",
    ]

    def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        lines.extend([f"## {title}", ""])
        if not rows:
            lines.extend(["_no data_", ""])
            return
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
        for row in rows:
            cells = [str(c).replace("|", "\\|") for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    table(
        "Confidence histogram",
        ["bucket", "prompts"],
        [("none" if b.bucket is None else f"{b.bucket:.1f}", b.count) for b in data.confidence],
    )
    table(
        "Intent distribution",
        ["intent", "prompts", "avg confidence", "corrections"],
        [
            (i.predicted_intent, i.count, _num(i.avg_confidence), i.corrections)
            for i in data.intents
        ],
    )
    table(
        "Workflow success rate by intent",
        ["intent", "outcomes", "successes", "rate"],
        [
            (s.predicted_intent, s.total, s.successes, f"{s.success_rate:.1f}%")
            for s in data.success
        ],
    )
    table(
        "Per day",
        ["day", "prompts", "low confidence", "corrected", "failures"],
        [
            (
                d.day.isoformat(),
                d.total,
                _share(d.low_confidence, d.total),
                _share(d.corrections, d.total),
                d.failures,
            )
            for d in data.daily
        ],
    )
    table(
        "Model versions",
        ["version", "created", "accuracy", "gate", "serving"],
        [
            (
                m.version,
                m.created_at.strftime("%Y-%m-%d") if m.created_at else "–",
                _pct(m.accuracy),
                m.gate or "–",
                "yes" if m.serving else "",
            )
            for m in data.models
        ],
    )
    return "\n".join(lines)


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
    rates = {s.predicted_intent: s for s in data.success}
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=render_markdown(data),
        description=f"monitoring figures, last {days:g} days",
    )
    create_table_artifact(
        key=ARTIFACT_TABLE_KEY,
        table=[
            {
                "intent": i.predicted_intent,
                "prompts": i.count,
                "avg_confidence": i.avg_confidence,
                "corrections": i.corrections,
                "success_rate": rates[i.predicted_intent].success_rate
                if i.predicted_intent in rates
                else None,
            }
            for i in data.intents
        ],
        description=f"per-intent figures, last {days:g} days",
    )
    return {
        "prompts": data.total,
        "corrections": data.corrections,
        "correction_rate": data.correction_rate,
        "low_confidence_rate": data.low_confidence_rate,
        "success_rate": data.success_rate,
    }
