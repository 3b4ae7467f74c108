"""The simulator's results: one row per run and week (``simulation.csv``), the mean over seeds
per strategy, the text table, the plot (``simulation.png``) and the best strategy.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from capture.files import write_text_atomic
from tasks.retry import io_task

logger = logging.getLogger(__name__)

ALL_LABELS = "all-labels"


@dataclass(frozen=True, slots=True)
class WeekResult:
    """One row of ``simulation.csv``. Week 0 is the first model, before any traffic."""

    strategy: str
    seed: int
    week: int
    accuracy: float
    reviewed: int  # prompts reviewed so far (cumulative)
    errors_found: int  # of those, how many the model had predicted wrong (cumulative)
    labels_used: int  # seed set + reviewed so far
    traffic_accuracy: float | None  # accuracy of the live predictions this week
    candidates: int | None  # review candidates this week
    training_rows: int | None  # rows of this week's training data export
    gate: str  # initial / promoted / rejected / reference
    model_version: str
    week_seconds: float


CSV_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WeekResult))


def write_csv(rows: Iterable[WeekResult], path: Path) -> Path:
    """Write ``rows`` to ``path`` (atomically; floats rounded to 4 places); returns ``path``."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(row).items()}
        )
    return write_text_atomic(path, buffer.getvalue())


def read_csv(path: Path) -> list[WeekResult]:
    """Read back a ``simulation.csv`` (e.g. to re-plot or merge runs)."""
    out = []
    with path.open(encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            out.append(
                WeekResult(
                    strategy=raw["strategy"],
                    seed=int(raw["seed"]),
                    week=int(raw["week"]),
                    accuracy=float(raw["accuracy"]),
                    reviewed=int(raw["reviewed"]),
                    errors_found=int(raw["errors_found"]),
                    labels_used=int(raw["labels_used"]),
                    traffic_accuracy=_opt_float(raw["traffic_accuracy"]),
                    candidates=_opt_int(raw["candidates"]),
                    training_rows=_opt_int(raw["training_rows"]),
                    gate=raw["gate"],
                    model_version=raw["model_version"],
                    week_seconds=float(raw["week_seconds"]),
                )
            )
    return out


def _opt_float(value: str) -> float | None:
    return float(value) if value not in ("", "None") else None


def _opt_int(value: str) -> int | None:
    return int(value) if value not in ("", "None") else None


@dataclass(frozen=True, slots=True)
class StrategySummary:
    """Mean (and spread) over seeds of one strategy at one week."""

    strategy: str
    week: int
    seeds: int
    accuracy: float
    accuracy_min: float
    accuracy_max: float
    reviewed: float
    labels_used: float
    promoted: int
    week_seconds: float


def summarise(rows: Iterable[WeekResult]) -> list[StrategySummary]:
    """Per strategy and week, the mean over seeds (reference rows excluded)."""
    groups: dict[tuple[str, int], list[WeekResult]] = defaultdict(list)
    for row in rows:
        if row.strategy != ALL_LABELS:
            groups[(row.strategy, row.week)].append(row)
    out = []
    for (strategy, week), group in sorted(groups.items()):
        accuracies = [r.accuracy for r in group]
        out.append(
            StrategySummary(
                strategy=strategy,
                week=week,
                seeds=len(group),
                accuracy=sum(accuracies) / len(group),
                accuracy_min=min(accuracies),
                accuracy_max=max(accuracies),
                reviewed=sum(r.reviewed for r in group) / len(group),
                labels_used=sum(r.labels_used for r in group) / len(group),
                promoted=sum(r.gate == "promoted" for r in group),
                week_seconds=sum(r.week_seconds for r in group) / len(group),
            )
        )
    return out


def best_strategy(rows: Iterable[WeekResult]) -> str | None:
    """The strategy with the highest mean accuracy at the last week (None without results)."""
    summary = summarise(rows)
    if not summary:
        return None
    last = max(s.week for s in summary)
    final = [s for s in summary if s.week == last]
    return max(final, key=lambda s: s.accuracy).strategy


def format_table(rows: Sequence[WeekResult]) -> str:
    """A plain-text table of the mean over seeds per strategy and week (+ the reference)."""
    summary = summarise(rows)
    header = (
        f"{'strategy':<13} {'week':>4} {'seeds':>5} {'accuracy':>9} {'min':>7} {'max':>7} "
        f"{'reviewed':>8} {'labels':>7} {'promoted':>8} {'week s':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(
            f"{s.strategy:<13} {s.week:>4} {s.seeds:>5} {100 * s.accuracy:>8.2f}% "
            f"{100 * s.accuracy_min:>6.2f}% {100 * s.accuracy_max:>6.2f}% {s.reviewed:>8.0f} "
            f"{s.labels_used:>7.0f} {s.promoted:>8} {s.week_seconds:>7.1f}"
        )
    for r in rows:
        if r.strategy == ALL_LABELS:
            lines.append(
                f"{ALL_LABELS:<13} {'-':>4} {'1':>5} {100 * r.accuracy:>8.2f}% {'':>7} {'':>7} "
                f"{'-':>8} {r.labels_used:>7} {'-':>8} {r.week_seconds:>7.1f}"
            )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[WeekResult], path: Path) -> Path:
    """PNG: test accuracy against prompts reviewed, one line per strategy (mean over seeds, band
    from min to max), the all-labels model as a dashed line when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for strategy in sorted({s.strategy for s in summary}):
        points = [s for s in summary if s.strategy == strategy]
        x = [s.reviewed for s in points]
        ax.plot(x, [100 * s.accuracy for s in points], marker="o", label=strategy)
        if any(s.seeds > 1 for s in points):
            ax.fill_between(
                x,
                [100 * s.accuracy_min for s in points],
                [100 * s.accuracy_max for s in points],
                alpha=0.15,
            )
    for r in rows:
        if r.strategy == ALL_LABELS:
            ax.axhline(
                100 * r.accuracy,
                linestyle="--",
                color="grey",
                label=f"all {r.labels_used} labels",
            )
    ax.set_xlabel("prompts reviewed (cumulative)")
    ax.set_ylabel("test accuracy (%)")
    seeds = max((s.seeds for s in summary), default=0)
    ax.set_title(f"Learning loop: accuracy per reviewed prompt (mean of {seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True, slots=True)
class SimulationOutputs:
    """What :func:`write_outputs` wrote: the CSV, the plot, the text table, the best strategy."""

    csv: Path
    png: Path
    table: str
    best: str | None

    def markdown(self) -> str:
        """The simulation's markdown artifact."""
        return (
            f"# Learning-loop simulation\n\n```\n{self.table}\n```\n\n"
            f"- CSV: `{self.csv}`\n- plot: `{self.png}`\n- best strategy: {self.best}\n"
        )


def write_outputs(rows: Sequence[WeekResult], output: Path) -> SimulationOutputs:
    """Write ``simulation.csv`` and ``simulation.png`` under ``output``; return them + the table."""
    csv_path = write_csv(rows, output / "simulation.csv")
    png_path = plot_accuracy(rows, output / "simulation.png")
    return SimulationOutputs(
        csv=csv_path, png=png_path, table=format_table(rows), best=best_strategy(rows)
    )


write_outputs_task = io_task(write_outputs, name="simulate-write-outputs", retry_delay_seconds=0)
