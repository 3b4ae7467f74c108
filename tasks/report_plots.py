"""The monitoring report's plots: PNGs drawn with matplotlib's Agg canvas, as base64 text.

matplotlib is imported inside :func:`figure` (no pyplot global state), so importing this module
stays cheap. Every ``plot_*`` function returns the base64 of one PNG, ready for a ``data:`` URI.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from capture.offline_statements import DailyCounts
from capture.rows import ConfidenceBucket, IntentStats, IntentSuccessRate
from tasks.report_figures import ModelPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

BLUE, GREEN, ORANGE, RED = "#3b6ea8", "#3f8f5a", "#d08a2e", "#b8433c"
#: Intents below this workflow success rate (%) are drawn red.
LOW_SUCCESS_PERCENT = 80


def png_base64(fig: Figure) -> str:
    """The figure as a PNG (100 dpi, tight box), base64-encoded."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(height: float = 3.2, width: float = 9.0) -> tuple[Figure, Any]:
    """A figure (inches) with one axes: light horizontal grid, no top or right spine."""
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


def _horizontal_bars(n: int) -> tuple[Figure, Any]:
    fig, ax = figure(height=_bar_height(n))
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    return fig, ax


def plot_confidence(buckets: Sequence[ConfidenceBucket]) -> str:
    """Prompts per confidence bucket (rounded to 0.1); the NULL bucket is left out."""
    fig, ax = figure()
    known = sorted((b for b in buckets if b.bucket is not None), key=lambda b: b.bucket or 0.0)
    ax.bar([b.bucket for b in known], [b.count for b in known], width=0.08, color=BLUE)
    ax.set_xticks([i / 10 for i in range(11)])
    ax.set_xlim(-0.06, 1.06)
    ax.set_xlabel("confidence (rounded to 0.1)")
    ax.set_ylabel("prompts")
    return png_base64(fig)


def plot_intents(intents: Sequence[IntentStats], top: int) -> str:
    """The ``top`` most frequent intents: prompts, and corrected prompts over them."""
    shown = list(intents[:top])[::-1]
    fig, ax = _horizontal_bars(len(shown))
    names = [i.predicted_intent for i in shown]
    ax.barh(names, [i.count for i in shown], color=BLUE, label="prompts")
    ax.barh(names, [i.corrections for i in shown], color=ORANGE, label="corrected")
    ax.set_xlabel("prompts")
    ax.legend(loc="lower right", frameon=False)
    return png_base64(fig)


def plot_success(success: Sequence[IntentSuccessRate], top: int) -> str:
    """Workflow success rate of the ``top`` lowest-rate intents (red below 80%)."""
    shown = list(success[:top])[::-1]  # lowest rate first in the query: show those on top
    fig, ax = _horizontal_bars(len(shown))
    colors = [RED if s.success_rate < LOW_SUCCESS_PERCENT else GREEN for s in shown]
    ax.barh([s.predicted_intent for s in shown], [s.success_rate for s in shown], color=colors)
    ax.set_xlim(0, 100)
    ax.set_xlabel("workflow success rate (%)")
    return png_base64(fig)


def plot_daily_rate(daily: Sequence[DailyCounts], attribute: str, color: str, label: str) -> str:
    """A rate of :class:`DailyCounts` (``attribute``, a fraction) per day, in percent."""
    fig, ax = figure(height=2.8)
    days = [d.day for d in daily]
    rates = [100 * getattr(d, attribute) for d in daily]
    ax.plot(days, rates, marker="o", color=color)
    ax.set_ylim(0, min(100.0, max(5.0, 1.3 * max(rates, default=0.0))))
    ax.set_ylabel(label)
    fig.autofmt_xdate()
    return png_base64(fig)


def plot_models(models: Sequence[ModelPoint]) -> str:
    """Evaluation accuracy of each dated registry version over time, the serving one marked."""
    fig, ax = figure(height=3.0)
    dated = [m for m in models if m.created_at is not None and m.accuracy is not None]
    xs = [m.created_at for m in dated]
    ys = [100 * (m.accuracy or 0.0) for m in dated]
    ax.plot(xs, ys, marker="o", color=BLUE)
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
    return png_base64(fig)
