"""The monitoring report as one self-contained HTML page, rendered from a Jinja2 template.

:func:`build_page` turns :class:`~tasks.report_figures.ReportData` into a :class:`Page` — the
headline cards and six sections (``confidence``, ``intents``, ``success``, ``corrections``,
``low-confidence``, ``models``), then one section ``ab-1``, ``ab-2``, … per A/B test that ran in
the window (newest first; none when no candidate was under test), each a list of blocks: a
note, a plot, a table, or an "empty" message. ``tasks/templates/report.html.j2`` lays the page
out (inline CSS); the plots are inline base64 PNGs, so the file loads nothing from the network.
Autoescape is on: every text from the database (intent names) is escaped by the template.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jinja2

from tasks.ab_readout import MIN_SUPPORT, ABReadout, ArmStats
from tasks.report_figures import ReportData, number_text, percent_text, share_text
from tasks.report_plots import (
    ORANGE,
    RED,
    plot_confidence,
    plot_daily_rate,
    plot_intents,
    plot_models,
    plot_success,
)

logger = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"


# --------------------------------------------------------------------------- page model


@dataclass(frozen=True, slots=True)
class Note:
    """A sentence under a section's title or between its blocks."""

    text: str
    kind: ClassVar[str] = "note"


@dataclass(frozen=True, slots=True)
class Empty:
    """What a section says when it has nothing to show."""

    text: str
    kind: ClassVar[str] = "empty"


@dataclass(frozen=True, slots=True)
class Image:
    """A plot: base64 PNG text and its alternative text."""

    png: str
    alt: str
    kind: ClassVar[str] = "image"


@dataclass(frozen=True, slots=True)
class Table:
    """A table with an ``id`` (the tests and readers find tables by it)."""

    id: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    kind: ClassVar[str] = "table"


Block = Note | Empty | Image | Table


@dataclass(frozen=True, slots=True)
class Section:
    id: str
    title: str
    note: str = ""
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Card:
    label: str
    value: str


@dataclass(frozen=True, slots=True)
class Page:
    date: str  # of the title
    window: str  # "last 7 days (from – to UTC)"
    generated: str
    cards: list[Card]
    sections: list[Section]


# --------------------------------------------------------------------------- sections


def _span(data: ReportData) -> str:
    return f"last {data.days:g} days"


def _no_traffic(data: ReportData) -> list[Block]:
    return [Empty(f"No prompts were logged in the {_span(data)}.")]


def _cards(data: ReportData) -> list[Card]:
    o = data.overall
    serving = data.serving_version
    return [
        Card("prompts", f"{o.total:,}"),
        Card("corrected", f"{o.corrections:,} ({share_text(o.corrections, o.total)})"),
        Card(
            f"low confidence (< {data.low_confidence_threshold:g})",
            f"{o.low_confidence:,} ({share_text(o.low_confidence, o.total)})",
        ),
        Card("workflow success", share_text(o.successes, o.outcomes)),
        Card("serving model", f"v{serving}" if serving else "none"),
    ]


def _confidence_section(data: ReportData) -> Section:
    total = data.total
    table = Table(
        "confidence-table",
        ["confidence bucket", "prompts", "share"],
        [
            ("none" if b.bucket is None else f"{b.bucket:.1f}", b.count, share_text(b.count, total))
            for b in data.confidence
        ],
    )
    blocks: list[Block] = (
        [Image(plot_confidence(data.confidence), "confidence histogram"), table]
        if total
        else _no_traffic(data)
    )
    return Section("confidence", "Confidence histogram", "Prompts per rounded confidence.", blocks)


def _intents_section(data: ReportData, top_intents: int) -> Section:
    if not data.intents:
        return Section("intents", "Intent distribution", blocks=_no_traffic(data))
    blocks: list[Block] = [Image(plot_intents(data.intents, top_intents), "intent distribution")]
    if len(data.intents) > top_intents:
        blocks.append(
            Note(f"Top {top_intents} intents plotted; all {len(data.intents)} in the table.")
        )
    blocks.append(
        Table(
            "intent-table",
            ["predicted intent", "prompts", "share", "avg confidence", "corrections"],
            [
                (
                    i.predicted_intent,
                    i.count,
                    share_text(i.count, data.total),
                    number_text(i.avg_confidence),
                    i.corrections,
                )
                for i in data.intents
            ],
        )
    )
    return Section("intents", "Intent distribution", blocks=blocks)


def _success_section(data: ReportData, top_intents: int) -> Section:
    blocks: list[Block] = (
        [
            Image(plot_success(data.success, top_intents), "success rate by intent"),
            Table(
                "success-table",
                ["predicted intent", "outcomes", "successes", "success rate"],
                [
                    (s.predicted_intent, s.total, s.successes, f"{s.success_rate:.1f}%")
                    for s in data.success
                ],
            ),
        ]
        if data.success
        else [Empty("No workflow outcomes were reported in this window.")]
    )
    note = "Prompts whose workflow outcome is known; lowest rate first (red: below 80%)."
    return Section("success", "Workflow success rate by intent", note, blocks)


@dataclass(frozen=True, slots=True)
class _DailyRate:
    """A per-day rate of :class:`~capture.offline_statements.DailyCounts`: ``counted`` (a
    count field) over the day's prompts, plotted from ``rate`` (its rate property)."""

    counted: str
    rate: str
    color: str
    axis: str  # the plot's y label
    alt: str
    table_id: str
    headers: tuple[str, str, str, str]


_CORRECTION_RATE = _DailyRate(
    "corrections",
    "correction_rate",
    ORANGE,
    "corrected (%)",
    "correction rate per day",
    "correction-daily-table",
    ("day", "prompts", "corrected", "correction rate"),
)
_LOW_CONFIDENCE_RATE = _DailyRate(
    "low_confidence",
    "low_confidence_rate",
    RED,
    "low confidence (%)",
    "low-confidence rate per day",
    "low-confidence-table",
    ("day", "prompts", "low confidence", "rate"),
)


def _per_day(data: ReportData, what: _DailyRate) -> list[Block]:
    """The plot of a daily rate, then its table: day, prompts, count, share."""
    rows = [
        (
            d.day.isoformat(),
            d.total,
            getattr(d, what.counted),
            share_text(getattr(d, what.counted), d.total),
        )
        for d in data.daily
    ]
    plot = plot_daily_rate(data.daily, what.rate, what.color, what.axis)
    return [Image(plot, what.alt), Table(what.table_id, what.headers, rows)]


def _corrections_section(data: ReportData) -> Section:
    if not data.total:
        return Section("corrections", "Correction rate", blocks=_no_traffic(data))
    o = data.overall
    corrected = sorted(
        (i for i in data.intents if i.corrections),
        key=lambda i: (-i.corrections / i.count, i.predicted_intent),
    )
    per_intent: Block = (
        Table(
            "correction-intent-table",
            ["predicted intent", "prompts", "corrected", "correction rate"],
            [
                (i.predicted_intent, i.count, i.corrections, share_text(i.corrections, i.count))
                for i in corrected
            ],
        )
        if corrected
        else Empty("No prompt in this window was corrected.")
    )
    blocks: list[Block] = [
        Note(
            f"Overall: {o.corrections:,} of {o.total:,} prompts corrected "
            f"({share_text(o.corrections, o.total)})."
        ),
        *_per_day(data, _CORRECTION_RATE),
        per_intent,
    ]
    return Section("corrections", "Correction rate", blocks=blocks)


def _low_confidence_section(data: ReportData) -> Section:
    note = f"Share of prompts with confidence below {data.low_confidence_threshold:g} (UTC days)."
    if not data.total:
        return Section("low-confidence", "Low-confidence rate per day", note, _no_traffic(data))
    blocks = _per_day(data, _LOW_CONFIDENCE_RATE)
    return Section("low-confidence", "Low-confidence rate per day", note, blocks)


def _models_section(data: ReportData) -> Section:
    note = "Evaluation accuracy of each registry version."
    if not data.models:
        empty = Empty("The model registry is empty: no version has been trained yet.")
        return Section("models", "Model versions", note, [empty])
    plottable = any(m.created_at is not None and m.accuracy is not None for m in data.models)
    plot: Block = (
        Image(plot_models(data.models), "model versions over time")
        if plottable
        else Empty("No version has both a creation time and an evaluation accuracy yet.")
    )
    table = Table(
        "models-table",
        ["version", "created", "accuracy", "macro-F1", "gate", "serving"],
        [
            (
                m.version,
                m.created_at.strftime("%Y-%m-%d %H:%M") if m.created_at else "–",
                percent_text(m.accuracy),
                number_text(m.macro_f1),
                m.gate or "–",
                "yes" if m.serving else "",
            )
            for m in data.models
        ],
    )
    return Section("models", "Model versions", note, [plot, table])


def _ci_text(arm: ArmStats) -> str:
    low, high = arm.success_ci
    return "–" if arm.outcomes == 0 else f"[{percent_text(low)}, {percent_text(high)}]"


def _arms_table(readout: ABReadout, n: int) -> Table:
    arms = [a for a in (readout.champion_arm, readout.candidate_arm) if a is not None]
    return Table(
        f"ab-arms-{n}",
        [
            "arm",
            "version",
            "prompts",
            "users",
            "outcomes",
            "success rate",
            "95% CI",
            "correction rate",
        ],
        [
            (
                a.arm,
                a.version,
                a.prompts,
                a.users,
                a.outcomes,
                share_text(a.successes, a.outcomes),
                _ci_text(a),
                share_text(a.corrections, a.prompts),
            )
            for a in arms
        ],
    )


def _shadow_block(readout: ABReadout, n: int) -> Block:
    s = readout.shadow
    if not s.compared:
        return Empty("No shadow predictions were logged for this candidate in its window.")
    disagreements = s.compared - s.agreements
    return Table(
        f"ab-shadow-{n}",
        ["shadow evidence", "prompts", "share"],
        [
            ("compared (candidate predicted after the champion answered)", s.compared, "100.0%"),
            ("agreed with the champion", s.agreements, share_text(s.agreements, s.compared)),
            ("disagreed", disagreements, share_text(disagreements, s.compared)),
            (
                "disagreements later corrected",
                s.disagreements_corrected,
                share_text(s.disagreements_corrected, disagreements),
            ),
            (
                "… corrected to the candidate's intent (candidate right)",
                s.candidate_right,
                share_text(s.candidate_right, s.disagreements_corrected),
            ),
            (
                "… corrected to the champion's intent (champion right)",
                s.champion_right,
                share_text(s.champion_right, s.disagreements_corrected),
            ),
            (
                "… corrected to another intent (neither right)",
                s.neither_right,
                share_text(s.neither_right, s.disagreements_corrected),
            ),
            (
                "disagreements whose workflow failed, uncorrected (champion wrong)",
                s.disagreements_failed_uncorrected,
                share_text(s.disagreements_failed_uncorrected, disagreements),
            ),
        ],
    )


def _intent_block(readout: ABReadout, n: int) -> Block:
    by_intent: dict[str, dict[str, dict[str, Any]]] = {}
    for row in readout.per_intent:
        by_intent.setdefault(str(row["intent"]), {})[str(row["arm"])] = row
    if not by_intent:
        return Empty(
            f"No answered intent has {MIN_SUPPORT} workflow outcomes in each arm yet: no "
            "per-intent comparison."
        )
    rows = []
    for intent, arms in sorted(by_intent.items()):
        cells: list[object] = [intent]
        for arm in ("champion", "candidate"):
            stats = arms.get(arm)
            rate = None if stats is None else float(stats["success_rate"])
            cells += ["–" if stats is None else stats["outcomes"], percent_text(rate)]
        rows.append(tuple(cells))
    return Table(
        f"ab-intent-{n}",
        [
            "answered intent",
            "champion outcomes",
            "champion success",
            "candidate outcomes",
            "candidate success",
        ],
        rows,
    )


def _ab_section(readout: ABReadout, n: int) -> Section:
    """One A/B test: its window, arms, shadow evidence, per-intent breakdown and decision."""
    mode = readout.mode or "?"
    if mode == "canary" and readout.share is not None:
        mode += f" ({readout.share:.0%} of users)"
    since = (readout.since or "unknown")[:16].replace("T", " ")
    until = (
        readout.until[:16].replace("T", " ") + " UTC" if readout.until else "now (still under test)"
    )
    note = f"Mode {mode}, from {since} UTC to {until} ({readout.days:.1f} days)."
    verb = "Ended" if readout.ended else "Decision the ab-check takes now"
    blocks: list[Block] = [
        Note(f"{verb}: {readout.decision} — {readout.reason}."),
        _arms_table(readout, n),
    ]
    test = readout.test
    if test.get("difference") is not None:
        blocks.append(
            Note(
                "Success rate, candidate − champion: "
                f"{100 * test['difference']:+.2f} points; always-valid (mSPRT) interval "
                f"[{100 * test['lower']:+.2f}, {100 * test['upper']:+.2f}] points, promotion "
                f"needs its lower end above −{100 * readout.plan.get('margin', 0.01):g}."
            )
        )
    if readout.guardrail:
        blocks.append(
            Note("Guardrail tripped: the candidate's failure rate is significantly higher.")
        )
    if readout.mode == "shadow" or readout.shadow.compared:
        blocks.append(_shadow_block(readout, n))
    blocks.append(_intent_block(readout, n))
    title = f"A/B test: candidate v{readout.candidate} vs champion v{readout.champion}"
    return Section(f"ab-{n}", title, note, blocks)


# --------------------------------------------------------------------------- page


def build_page(data: ReportData, *, top_intents: int = 25) -> Page:
    """The report's content: headline cards, six sections (plots drawn here) and one per A/B
    test in the window."""
    window = f"{_span(data)} ({data.since:%Y-%m-%d %H:%M} – {data.generated_at:%Y-%m-%d %H:%M} UTC)"
    return Page(
        date=f"{data.generated_at:%Y-%m-%d}",
        window=window,
        generated=f"{data.generated_at:%Y-%m-%d %H:%M}",
        cards=_cards(data),
        sections=[
            _confidence_section(data),
            _intents_section(data, top_intents),
            _success_section(data, top_intents),
            _corrections_section(data),
            _low_confidence_section(data),
            _models_section(data),
            *(_ab_section(readout, n) for n, readout in enumerate(data.ab, start=1)),
        ],
    )


@functools.cache
def template() -> jinja2.Template:
    """The page template shipped in the ``tasks`` package (autoescape on, strict undefined)."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("tasks", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.get_template(TEMPLATE)


def render_report_html(data: ReportData, *, top_intents: int = 25) -> str:
    """The dashboard as one HTML document (inline CSS, base64 PNG plots)."""
    return template().render(page=build_page(data, top_intents=top_intents))
