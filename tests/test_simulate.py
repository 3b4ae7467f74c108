"""The learning-loop simulator: its pieces on handmade data, and end to end through the real
service and flows on a tiny synthetic dataset (SQLite; PostgreSQL in the slow set)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from capture.traffic import workflow_outcomes
from tasks.records import Record
from tasks.review_file import ReviewFileError
from tasks.reviewer import fill_review_file
from tasks.simulate.data import (
    SimulationData,
    SimulationError,
    check_strategies,
    load_simulation_data,
    plan_traffic,
)
from tasks.simulate.results import (
    ALL_LABELS,
    CSV_FIELDS,
    WeekResult,
    best_strategy,
    format_table,
    plot_accuracy,
    read_csv,
    summarise,
    write_csv,
)
from tasks.simulate.space import LoopSettings, RunSpace
from tasks.simulate.week import simulation_start

TEMPLATES = {
    "weather": ["will it rain in {c} {d}", "what is the weather in {c} {d}", "forecast {c} {d}"],
    "calendar": [
        "schedule a meeting in {c} {d}",
        "add an event {d} in {c}",
        "move my {c} call {d}",
    ],
    "music": ["play songs from {c} {d}", "put on the {c} playlist {d}", "skip this {c} song {d}"],
    "banking": ["transfer money to {c} {d}", "pay my {c} bill {d}", "show my {c} account {d}"],
}
CITIES = ["paris", "london", "tokyo", "boston", "madrid", "rome", "berlin", "oslo"]
DAYS = ["today", "tomorrow", "on monday", "on friday", "this weekend", "next week"]


def write_tiny_dataset(folder: Path, *, per_intent: int = 30, seed: int = 0) -> Path:
    """4 intents of templated prompts: ``per_intent`` each, one in five to test."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for label, templates in TEMPLATES.items():
        seen: set[str] = set()
        while len(seen) < per_intent:
            seen.add(rng.choice(templates).format(c=rng.choice(CITIES), d=rng.choice(DAYS)))
        rows += [(text, label) for text in sorted(seen)]
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", lambda i: i % 5 != 0), ("test", lambda i: i % 5 == 0)):
        lines = [
            json.dumps({"text": t, "label": lab}) for i, (t, lab) in enumerate(rows) if keep(i)
        ]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def data_of(per_label: dict[str, int], test_per_label: int = 2) -> SimulationData:
    train = tuple(
        Record(f"{lab} prompt {i}", lab) for lab, n in per_label.items() for i in range(n)
    )
    test = tuple(Record(f"{lab} test {i}", lab) for lab in per_label for i in range(test_per_label))
    return SimulationData(train=train, test=test, labels=tuple(sorted(per_label)))


# --------------------------------------------------------------------------- pieces


def test_load_drops_excluded_labels_and_limits_intents(tmp_path: Path) -> None:
    rows = [("a1", "a"), ("a2", "a"), ("b1", "b"), ("o1", "oos"), ("c1", "c")]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    )
    (tmp_path / "test.jsonl").write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n"
            for t, lab in [("ta", "a"), ("tb", "b"), ("to", "oos"), ("tz", "z")]
        )
    )
    data = load_simulation_data(tmp_path)
    assert data.labels == ("a", "b", "c")
    assert [r.text for r in data.test] == ["ta", "tb"]  # oos excluded, unknown z dropped
    two = load_simulation_data(tmp_path, max_intents=2)
    assert two.labels == ("a", "b")
    assert {r.label for r in two.train} == {"a", "b"}
    with pytest.raises(SimulationError, match=r"expected test\.jsonl"):
        (tmp_path / "test.jsonl").unlink()
        load_simulation_data(tmp_path)


def test_plan_is_disjoint_per_intent_and_repeatable() -> None:
    data = data_of({"a": 20, "b": 20, "c": 20})
    plan = plan_traffic(
        data, seed=3, initial_per_intent=4, traffic_per_week=14, weeks=3, gate_per_intent=2
    )
    assert Counter(r.label for r in plan.seed_set) == {"a": 4, "b": 4, "c": 4}
    assert Counter(r.label for r in plan.gate_set) == {"a": 2, "b": 2, "c": 2}
    assert [len(w) for w in plan.weeks] == [14, 14, 14]
    texts = [r.text for r in plan.seed_set + plan.gate_set] + [
        r.text for week in plan.weeks for r in week
    ]
    assert len(texts) == len(set(texts)) == 12 + 6 + 42
    again = plan_traffic(
        data, seed=3, initial_per_intent=4, traffic_per_week=14, weeks=3, gate_per_intent=2
    )
    assert again == plan
    other = plan_traffic(
        data, seed=4, initial_per_intent=4, traffic_per_week=14, weeks=3, gate_per_intent=2
    )
    assert other.weeks != plan.weeks
    with pytest.raises(SimulationError, match=r"has 42 prompts left .* need 45; lower"):
        plan_traffic(
            data, seed=0, initial_per_intent=4, traffic_per_week=15, weeks=3, gate_per_intent=2
        )


def test_workflow_outcomes_fail_more_when_wrong() -> None:
    correct = [True] * 2000 + [False] * 2000
    outcomes = workflow_outcomes(correct, seed=1, fail_if_wrong=0.5, fail_if_right=0.05)
    assert outcomes == workflow_outcomes(correct, seed=1, fail_if_wrong=0.5, fail_if_right=0.05)
    fail_right = outcomes[:2000].count(False) / 2000
    fail_wrong = outcomes[2000:].count(False) / 2000
    assert 0.03 < fail_right < 0.07
    assert 0.45 < fail_wrong < 0.55


def test_stand_in_reviewer_fills_true_labels(tmp_path: Path) -> None:
    review = tmp_path / "review.json"
    rows = [
        {"id": "1", "prompt": "p", "predicted_intent": "a", "confidence": 0.4,
         "created_at": None, "corrected_intent": "", "notes": ""},
        {"id": "2", "prompt": "q", "predicted_intent": "b", "confidence": 0.5,
         "created_at": None, "corrected_intent": "", "notes": ""},
    ]  # fmt: skip
    review.write_text(json.dumps(rows))
    out = tmp_path / "inbox" / "c.json"
    assert fill_review_file(review, {"1": "a", "2": "c"}, out) == 2
    filled = json.loads(out.read_text())
    assert [r["corrected_intent"] for r in filled] == ["a", "c"]
    assert filled[1]["predicted_intent"] == "b"
    with pytest.raises(ReviewFileError, match="row 2: id 2 is not a prompt"):
        fill_review_file(review, {"1": "a"}, out)


def result(
    strategy: str, seed: int, week: int, accuracy: float, gate: str = "promoted"
) -> WeekResult:
    return WeekResult(
        strategy=strategy, seed=seed, week=week, accuracy=accuracy, reviewed=10 * week,
        errors_found=4 * week, labels_used=8 + 10 * week, traffic_accuracy=0.5 if week else None,
        candidates=30 if week else None, training_rows=20, gate=gate, model_version=str(week + 1),
        week_seconds=1.5,
    )  # fmt: skip


ROWS = [
    result("random", 0, 0, 0.50, "initial"),
    result("random", 0, 1, 0.60),
    result("random", 1, 0, 0.52, "initial"),
    result("random", 1, 1, 0.62),
    result("margin", 0, 0, 0.50, "initial"),
    result("margin", 0, 1, 0.70),
    result("margin", 1, 0, 0.52, "initial"),
    result("margin", 1, 1, 0.74, "rejected"),
    WeekResult(ALL_LABELS, 0, 0, 0.9, 0, 0, 96, None, None, 96, "reference", "ref", 9.0),
]


def test_summary_table_csv_and_best(tmp_path: Path) -> None:
    summary = {(s.strategy, s.week): s for s in summarise(ROWS)}
    assert summary[("margin", 1)].accuracy == pytest.approx(0.72)
    assert summary[("margin", 1)].accuracy_min == pytest.approx(0.70)
    assert summary[("margin", 1)].promoted == 1
    assert summary[("random", 1)].accuracy == pytest.approx(0.61)
    assert (ALL_LABELS, 0) not in summary
    assert best_strategy(ROWS) == "margin"
    table = format_table(ROWS)
    assert "margin           1     2    72.00%" in table
    assert "all-labels" in table and "90.00%" in table
    path = write_csv(ROWS, tmp_path / "sim.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert tuple(header) == CSV_FIELDS
    assert read_csv(path) == ROWS


def test_plot_writes_a_png_that_decodes(tmp_path: Path) -> None:
    import matplotlib.image

    path = plot_accuracy(ROWS, tmp_path / "plot.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_strategy_names_are_checked() -> None:
    assert check_strategies(["all"]) == ("random", "threshold", "margin", "failed-first", "diverse")
    assert check_strategies(["margin", "random", "margin"]) == ("margin", "random")
    with pytest.raises(SimulationError, match="expected one of random, threshold"):
        check_strategies(["smartest"])


def test_a_run_reaches_the_flows_through_parameters_not_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from capture.settings import Settings

    monkeypatch.setenv("PROMPT_CAPTURE_HOME", "/tmp/outer-home")
    monkeypatch.delenv("PROMPT_CAPTURE_DATABASE_URL", raising=False)
    before = dict(os.environ)
    url = f"sqlite:///{tmp_path / 'run.db'}"
    space = RunSpace(
        name="margin-seed-0",
        home=tmp_path,
        database_url=url,
        own_database=False,
        settings=Settings().for_run(tmp_path, url),
    )
    assert space.flow_params() == {"home": str(tmp_path), "database_url": url}
    assert (space.settings.home, space.settings.resolved_database_url) == (tmp_path, url)
    assert space.settings.spool_dir == tmp_path / "spool"  # the service spools in the run
    with_secret = RunSpace(
        "x", tmp_path, "postgresql+psycopg://u:pw@h/db", True, space.settings, "u", "blk"
    )
    assert with_secret.flow_params() == {"home": str(tmp_path), "database_secret": "blk"}
    assert dict(os.environ) == before


def test_a_run_database_with_a_password_travels_as_a_secret_block(
    tmp_path: Path, prefect_harness: None
) -> None:
    from capture.settings import Settings
    from tasks.run_settings import DatabaseSettingError, resolve_run_settings
    from tasks.simulate.space import _save_secret, release_space

    url = "postgresql+psycopg://sim:s3cr3t@db.example/pc_sim_x"
    block = _save_secret("margin-seed-0", url)
    assert block.startswith("prompt-capture-sim-margin-seed-0-")
    run = resolve_run_settings(Settings(), home=str(tmp_path), database_secret=block)
    assert run.database_url == url
    sqlite = f"sqlite:///{tmp_path / 'run.db'}"
    settings = Settings().for_run(tmp_path, sqlite)
    space = RunSpace("x", tmp_path, sqlite, False, settings, None, block)
    assert "s3cr3t" not in str(space.flow_params())
    release_space(space)  # the block goes with the run
    with pytest.raises(DatabaseSettingError, match="no Prefect Secret block"):
        resolve_run_settings(Settings(), home=str(tmp_path), database_secret=block)


def test_loop_settings_refuse_bad_values() -> None:
    with pytest.raises(SimulationError, match="fail_if_wrong"):
        LoopSettings(fail_if_wrong=1.5)
    with pytest.raises(SimulationError, match="weeks"):
        LoopSettings(weeks=0)
    params = LoopSettings(hyperparameters={"max_steps": 3}).weekly_cycle_parameters()
    assert params["hyperparameters"] == {"max_steps": 3}
    assert params["days"] is None and params["import_inbox"] is True


def test_simulation_start_puts_the_last_week_before_now() -> None:
    now = datetime(2026, 3, 10, 12, 34, tzinfo=UTC)
    start = simulation_start(4, now)
    assert start + timedelta(weeks=4) <= now
    assert now - (start + timedelta(weeks=4)) < timedelta(hours=2)


def test_cli_refuses_an_unknown_strategy_before_running(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deployments.cli import app

    folder = write_tiny_dataset(tmp_path / "data", per_intent=10)
    out = CliRunner().invoke(app, ["simulate", "--dataset", str(folder), "--strategy", "smartest"])
    assert out.exit_code == 2
    assert "expected one of random, threshold" in out.output
    missing = CliRunner().invoke(app, ["simulate", "--dataset", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "train.jsonl" in missing.output


# --------------------------------------------------------------------------- end to end

TINY_TRAINING = {"min_steps": 2, "max_steps": 3, "batch_size": 4, "max_seq_length": 16}


def run_tiny_simulation(
    tmp_path: Path, *, strategies: list[str], database_url: str | None = None
) -> dict[str, object]:
    from prefect.testing.utilities import prefect_test_harness

    from flows.simulate import simulate_flow

    folder = write_tiny_dataset(tmp_path / "tiny")
    with prefect_test_harness(server_startup_timeout=180):
        return simulate_flow(
            str(folder),
            strategies=strategies,
            seeds=[0],
            weeks=2,
            review_budget=10,
            initial_per_intent=2,
            traffic_per_week=30,
            output=str(tmp_path / "out"),
            gate_per_intent=2,
            hyperparameters=TINY_TRAINING,
            max_pairs=20,
            quantize=False,
            database_url=database_url,
        )


def check_outputs(tmp_path: Path, out: dict[str, object], strategies: list[str]) -> None:
    import matplotlib.image

    rows = read_csv(Path(str(out["csv"])))
    assert [(r.strategy, r.week) for r in rows] == [(s, w) for s in strategies for w in (0, 1, 2)]
    for strategy in strategies:
        week0, week1, week2 = [r for r in rows if r.strategy == strategy]
        assert week0.gate == "initial" and week0.model_version == "1" and week0.reviewed == 0
        assert week0.labels_used == 8  # 2 per intent x 4 intents
        # Every prompt is a candidate; near-duplicates (templated prompts) may collapse.
        assert week1.candidates == 30
        assert 5 <= week1.reviewed <= 10
        assert week1.reviewed + 5 <= week2.reviewed <= week1.reviewed + 10
        assert week2.labels_used == 8 + week2.reviewed
        for r in (week1, week2):
            assert r.gate in {"promoted", "rejected"}
            assert 0.0 <= r.accuracy <= 1.0 and r.traffic_accuracy is not None
            assert r.week_seconds > 0 and r.training_rows is not None and r.training_rows >= 8
    image = matplotlib.image.imread(str(out["png"]))
    assert image.ndim == 3 and image.shape[0] > 100
    assert strategies[0] in str(out["table"])
    assert out["best"] in strategies


def test_simulator_runs_two_weeks_through_the_real_flows_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMPT_CAPTURE_DATABASE_URL", raising=False)
    out = run_tiny_simulation(tmp_path, strategies=["margin"])
    check_outputs(tmp_path, out, ["margin"])
    rows = read_csv(Path(str(out["csv"])))
    home = tmp_path / "out" / "runs" / "margin-seed-0" / "home"
    with sqlite3.connect(home / "prompt_capture.db") as conn:
        total, corrected, with_outcome = conn.execute(
            "SELECT COUNT(*), COUNT(corrected_intent), COUNT(was_successful) FROM nlu_prompt_logs"
        ).fetchone()
        stamps = [row[0] for row in conn.execute("SELECT created_at FROM nlu_prompt_logs")]
    assert total == 60 and with_outcome == 60  # two weeks of 30 prompts, every outcome logged
    assert corrected == rows[-1].reviewed  # every reviewed prompt was imported as a correction
    # The simulated clock spreads the traffic over two weeks that end before now.
    first, last = min(stamps), max(stamps)
    span = datetime.fromisoformat(last) - datetime.fromisoformat(first)
    assert timedelta(days=7) < span < timedelta(days=14)
    registry = home / "models"
    assert (registry / "current").read_text().strip() == rows[-1].model_version
    inbox = home / "inbox" / "processed"
    assert sorted(p.name for p in inbox.iterdir()) == [
        "corrections-week-01.json",
        "corrections-week-02.json",
    ]


@pytest.mark.slow
def test_simulator_compares_strategies_on_postgres(
    tmp_path: Path, postgres_server_url: str
) -> None:
    strategies = ["random", "diverse"]
    out = run_tiny_simulation(tmp_path, strategies=strategies, database_url=postgres_server_url)
    check_outputs(tmp_path, out, strategies)
