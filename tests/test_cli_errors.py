"""A person's mistake on the command line, and a database nobody migrated, as the person sees
them: one ``error:`` line on stderr, exit code 2, no traceback, no Prefect run (so no retry).

Each case runs the real ``prompt-capture`` in a subprocess (what a terminal shows, logging
included), two at a time, in a home of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from capture import db
from tests import run_cli

UPGRADE = "prompt-capture db upgrade"


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Path], list[str]]  # the work folder -> the command line
    expect: str  # in the error line
    # migrated | unmigrated (an empty SQLite file) | missing | no-registry (a home without models/)
    database: str = "migrated"
    env: Callable[[Path], dict[str, str]] | None = None  # the work folder -> variables to set
    absent: str = "\x00"  # never in the output (a password)
    line: Callable[[Path], str] | None = None  # the work folder -> the whole error line


def files(work: Path) -> dict[str, str]:
    return {
        "records": str(work / "records.jsonl"),
        "full_dir": str(work / "full"),
        "missing": str(work / "missing.jsonl"),
        "reviewed": str(work / "reviewed.json"),
        "a_file": str(work / "a-file"),
        "not_json": str(work / "not-json.json"),
        "bad_id": str(work / "bad-id.json"),
        "unknown_id": str(work / "unknown-id.json"),
    }


def f(name: str) -> Callable[[Path], str]:
    return lambda work: files(work)[name]


def cmd(*parts: str | Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda work: [p(work) if callable(p) else p for p in parts]


def under(name: str, tail: str) -> Callable[[Path], str]:
    """The path ``tail`` below the case's file ``name`` (a folder or, to be refused, a file)."""
    return lambda work: f"{files(work)[name]}/{tail}"


def in_file(option_path: Callable[[Path], str]) -> Callable[[Path], str]:
    """The one line of an output path whose parent is the case's file ``a-file``."""
    return lambda work: (
        f"error: --output {option_path(work)}: {files(work)['a_file']} is a file, not a folder; "
        "pass a path inside a folder"
    )


def exactly(line: str) -> Callable[[Path], str]:
    """An error line that names no path of the case's work folder."""
    return lambda _work: line


def invalid(command: str, option: str, bound: str) -> str:
    """typer's line for a number out of an option's range."""
    return (
        f"error: prompt-capture {command}: invalid value for '{option}': Input should be "
        f"{bound} (see `prompt-capture {command} --help`)"
    )


UNWRITABLE = (
    "cannot write in /proc (No such file or directory); pass a path in a folder you can write"
)
Args = list[str | Callable[[Path], str]]
# The commands with an --output file, and a file name each writes.
OUTPUT_COMMANDS: list[tuple[str, Args, str]] = [
    ("report", ["report"], "r.html"),
    ("retraining", ["export", "--mode", "retraining"], "r.jsonl"),
    ("review", ["export", "--mode", "review", "--no-open-round"], "r.json"),
    ("pairs", ["convert-to-pairs", "--input", f("records")], "p.jsonl"),
]
# Every option naming a file to write goes through one check, before any flow starts: a folder,
# a path below a file, a place nobody can write. Missing folders on the way are created.
OUTPUTS = [
    *(
        Case(
            f"{name}-output-below-a-file",
            cmd(*args, "--output", under("a_file", leaf)),
            "is a file, not a folder",
            line=in_file(under("a_file", leaf)),
        )
        for name, args, leaf in OUTPUT_COMMANDS
    ),
    Case(
        "pairs-output-is-a-directory",
        cmd("convert-to-pairs", "--input", f("records"), "--output", f("full_dir")),
        "is a directory",
        line=lambda work: (
            f"error: --output {files(work)['full_dir']}: is a directory; pass the path of a "
            "file to write"
        ),
    ),
    *(
        Case(
            f"{name}-output-unwritable",
            cmd(*args, "--output", f"/proc/{leaf}"),
            "cannot write in /proc",
            line=exactly(f"error: --output /proc/{leaf}: {UNWRITABLE}"),
        )
        for name, args, leaf in OUTPUT_COMMANDS
    ),
]
# A count below its floor, a fraction outside its range: refused at the option.
NUMBERS = [
    Case(
        "pairs-max-pairs-negative",
        cmd(
            "convert-to-pairs", "--input", f("records"), "--output", "p.jsonl", "--max-pairs", "-5"
        ),
        "--max-pairs",
        line=exactly(invalid("convert-to-pairs", "--max-pairs", "greater than or equal to 0")),
    ),
    Case(
        "train-max-steps-negative",
        cmd("train", "--train", f("records"), "--output", "m", "--max-steps", "-1"),
        "--max-steps",
        line=exactly(invalid("train", "--max-steps", "greater than or equal to 1")),
    ),
    Case(
        "train-max-pairs-negative",
        cmd("train", "--train", f("records"), "--output", "m", "--max-pairs", "-1"),
        "--max-pairs",
        line=exactly(invalid("train", "--max-pairs", "greater than or equal to 0")),
    ),
    Case(
        "retention-batch-size-0",
        cmd("retention", "--batch-size", "0"),
        "--batch-size",
        line=exactly(invalid("retention", "--batch-size", "greater than or equal to 1")),
    ),
    Case(
        "report-low-confidence-above-1",
        cmd("report", "--low-confidence", "2"),
        "--low-confidence",
        line=exactly(invalid("report", "--low-confidence", "less than or equal to 1")),
    ),
    *(
        Case(
            f"ab-margin-{value}",
            cmd("ab", "--margin", value),
            "--margin",
            line=exactly(
                f"error: --margin: expected a fraction in [0, 1) (0.01 = 1 point), found {value}"
            ),
        )
        for value in ("-1", "5", "1")
    ),
]


MISTAKES = [
    Case("review-days-0", cmd("export", "--mode", "review", "--days", "0"), "days"),
    Case("review-limit-negative", cmd("export", "--mode", "review", "--limit", "-5"), "limit"),
    Case(
        "review-strategy-bogus", cmd("export", "--mode", "review", "--strategy", "bogus"), "bogus"
    ),
    Case(
        "review-threshold-above-1",
        cmd("export", "--mode", "review", "--confidence-threshold", "1.5"),
        "confidence_threshold",
    ),
    Case(
        "review-output-is-a-directory",
        cmd("export", "--mode", "review", "--output", f("full_dir")),
        "is a directory",
    ),
    Case("retraining-days-0", cmd("export", "--mode", "retraining", "--days", "0"), "--days"),
    Case(
        "retraining-threshold",
        cmd("export", "--mode", "retraining", "--confidence-threshold", "-1"),
        "--confidence-threshold",
    ),
    Case("export-mode-bogus", cmd("export", "--mode", "bogus"), "--mode"),
    Case("report-days-0", cmd("report", "--days", "0"), "--days"),
    Case("report-now-garbage", cmd("report", "--now", "yesterday"), "--now"),
    Case("cycle-hyperparameters-json", cmd("cycle", "--hyperparameters", "{bad"), "JSON object"),
    Case("cycle-hyperparameters-list", cmd("cycle", "--hyperparameters", "[1, 2]"), "found list"),
    Case(
        "cycle-hyperparameters-unknown",
        cmd("cycle", "--hyperparameters", '{"max_stepz": 1}'),
        "max_stepz",
    ),
    Case("cycle-days-0", cmd("cycle", "--days", "0"), "--days"),
    Case("import-missing-file", cmd("import-corrections", f("missing")), "no such file"),
    Case("import-a-directory", cmd("import-corrections", f("full_dir")), "is a directory"),
    Case(
        "train-missing-file",
        cmd("train", "--train", f("missing"), "--output", "new-model"),
        "no such file",
    ),
    Case(
        "train-existing-output",
        cmd("train", "--train", f("records"), "--output", f("full_dir")),
        "already exists",
    ),
    Case(
        "train-missing-val",
        cmd("train", "--train", f("records"), "--val", f("missing"), "--output", "m"),
        "no such file",
    ),
    Case(
        "evaluate-not-a-model",
        cmd("evaluate", "--model", f("full_dir"), "--data", f("records")),
        "metadata.json",
    ),
    Case(
        "pairs-missing-input",
        cmd("convert-to-pairs", "--input", f("missing"), "--output", "p.jsonl"),
        "no such file",
    ),
    Case("demo-traffic-count-0", cmd("demo-traffic", "--count", "0"), "--count"),
    Case("demo-traffic-count-text", cmd("demo-traffic", "--count", "many"), "--count"),
    Case("retention-days-0", cmd("retention", "--days", "0"), "days"),
    Case("monitor-now-garbage", cmd("monitor", "--now", "soon"), "--now"),
    Case("simulate-missing-dataset", cmd("simulate", "--dataset", f("missing")), "--dataset"),
    Case("rollback-unknown-version", cmd("rollback", "--to", "9"), "9"),
    *(
        Case(
            f"round-close-{value}",
            cmd("review-round", "close", value),
            "ROUND_ID",
            line=exactly(
                "error: ROUND_ID: expected a round id (a UUID) as `prompt-capture review-round "
                f"list` shows it, found '{value}'"
            ),
        )
        for value in ("abc", "999")
    ),
    Case(
        "rollback-nothing-deployed",
        cmd("rollback"),
        "nothing to roll back: no version is deployed in",
    ),
]
# What typer finds on the command line: one line naming the command, the mistake, the closest
# name when one is close, and where the help is (never click's boxed usage).
USAGE = [
    Case(
        "unknown-command",
        cmd("trian"),
        "prompt-capture: no such command 'trian'; did you mean 'train'? "
        "(`prompt-capture --help` lists the commands)",
    ),
    Case(
        "unknown-command-nothing-close",
        cmd("xyzzy"),
        "prompt-capture: no such command 'xyzzy' (`prompt-capture --help` lists the commands)",
    ),
    Case(
        "unknown-subcommand",
        cmd("db", "curent"),
        "prompt-capture db: no such command 'curent'; did you mean 'current'? "
        "(`prompt-capture db --help` lists the commands)",
    ),
    Case(
        "unknown-option",
        cmd("train", "--trian", "x"),
        "prompt-capture train: no such option '--trian'; did you mean '--train'? "
        "(`prompt-capture train --help` lists its options)",
    ),
    Case(
        "unknown-option-of-a-group-command",
        cmd("spool", "list", "--jsn"),
        "prompt-capture spool list: no such option '--jsn'; did you mean '--json'?",
    ),
    Case(
        "unknown-top-level-option",
        cmd("--bogus", "models"),
        "prompt-capture: no such option '--bogus'",
    ),
    Case(
        "missing-required-option",
        cmd("train", "--output", "m"),
        "prompt-capture train: missing option '--train' (see `prompt-capture train --help`)",
    ),
    Case("missing-argument", cmd("deploy"), "prompt-capture deploy: missing argument"),
    Case("extra-argument", cmd("deploy", "1", "2"), "unexpected extra argument"),
    Case(
        "bad-option-value",
        cmd("rollback", "--lock-timeout", "soon"),
        "prompt-capture rollback: invalid value for '--lock-timeout'",
    ),
]

READS_THE_DATABASE = [
    ("export-review", cmd("export", "--mode", "review")),
    ("export-retraining", cmd("export", "--mode", "retraining")),
    ("monitor", cmd("monitor")),
    ("report", cmd("report")),
    ("import-corrections", cmd("import-corrections", f("reviewed"))),
    ("retention", cmd("retention")),
    ("cycle", cmd("cycle")),
    ("demo-traffic", cmd("demo-traffic", "--count", "5")),
]
UNMIGRATED = [
    Case(f"{name}-unmigrated", args, UPGRADE, database="unmigrated")
    for name, args in READS_THE_DATABASE
] + [
    Case(f"{name}-no-database", args, UPGRADE, database="missing")
    for name, args in READS_THE_DATABASE[:2]
]
# A flow that needs the registry refuses a home that holds none (before the database check).
NO_REGISTRY = [
    Case("cycle-no-registry", cmd("cycle"), "prompt-capture init", database="no-registry")
]


def env(**values: str | Callable[[Path], str]) -> Callable[[Path], dict[str, str]]:
    return lambda work: {
        f"PROMPT_CAPTURE_{k.upper()}": v(work) if callable(v) else v for k, v in values.items()
    }


REFUSED = "postgresql://nobody:s3cret@127.0.0.1:1/x"  # nothing listens on port 1
# A setting, the database or the home is wrong: the one line names the variable (and the URL
# without its password), before anything retries.
SETUP = [
    Case(
        "env-durability-bogus",
        cmd("models"),
        "PROMPT_CAPTURE_DURABILITY: found 'bogus'",
        env=env(durability="bogus"),
    ),
    Case(
        "env-batch-size-text",
        cmd("db", "current"),
        "PROMPT_CAPTURE_BATCH_SIZE: found 'abc'",
        env=env(batch_size="abc"),
    ),
    Case(
        "env-database-url-bogus",
        cmd("demo-traffic", "--count", "1"),
        "PROMPT_CAPTURE_DATABASE_URL",
        env=env(database_url="bogus://user:s3cret@x"),
        absent="s3cret",
    ),
    *(
        Case(
            f"database-refused-{'-'.join(a for a in args if not a.startswith('-'))}",
            cmd(*args),
            "postgresql+psycopg://nobody@127.0.0.1:1/x: cannot connect",
            env=env(database_url=REFUSED),
            absent="s3cret",
        )
        for args in (["db", "current"], ["db", "upgrade"], ["demo-traffic", "--count", "1"])
    ),
    Case("home-a-file-models", cmd("models"), "PROMPT_CAPTURE_HOME", env=env(home=f("a_file"))),
    Case(
        "home-a-file-db-upgrade",
        cmd("db", "upgrade"),
        "is a file, not a folder",
        env=env(home=f("a_file")),
    ),
    Case("init-home-a-file", cmd("init", "--home", f("a_file")), "--home"),
    Case(
        "evaluate-model-a-file",
        cmd("evaluate", "--model", f("records"), "--data", f("records")),
        "--model",
    ),
    Case("db-downgrade-unknown", cmd("db", "downgrade", "zzz"), "'zzz'"),
    Case("import-not-json", cmd("import-corrections", f("not_json")), "not JSON rows"),
    Case(
        "import-bad-id", cmd("import-corrections", f("bad_id")), "row 1 (id '999999'), field 'id'"
    ),
    Case(
        "import-unknown-id",
        cmd("import-corrections", f("unknown_id")),
        "no logged prompt has this id",
    ),
]
# A command that only reads, on a home that does not exist (a typo): refused, nothing created.
READS_ONLY = [
    ("db", "current"),
    ("models",),
    ("candidate", "show"),
    ("ab",),
    ("spool", "list"),
    ("review-user", "list"),
    ("report",),
]
NO_HOME = [
    Case(
        f"no-home-{'-'.join(args)}",
        cmd(*args),
        "PROMPT_CAPTURE_HOME",
        database="no-home",
    )
    for args in READS_ONLY
]
CASES = MISTAKES + OUTPUTS + NUMBERS + USAGE + UNMIGRATED + NO_REGISTRY + SETUP + NO_HOME


def prepare(work: Path, database: str, migrated: Path) -> dict[str, str]:
    """The case's home and files (``migrated``: a migrated SQLite file to copy); returns the
    environment of its command."""
    home = work / "home"
    work.mkdir(parents=True)
    if database != "no-home":
        home.mkdir()
    if database not in ("no-registry", "no-home"):
        (home / "models").mkdir()  # a set-up home (`prompt-capture init`)
    full = work / "full"
    full.mkdir()
    (full / "something.txt").write_text("x", encoding="utf-8")
    (work / "records.jsonl").write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [("a", "x"), ("b", "y")]
        ),
        encoding="utf-8",
    )
    (work / "reviewed.json").write_text("[]", encoding="utf-8")
    (work / "a-file").write_text("not a folder", encoding="utf-8")
    (work / "not-json.json").write_text("not json\n", encoding="utf-8")
    (work / "bad-id.json").write_text(
        json.dumps([{"id": 999999, "corrected_intent": "x"}]), encoding="utf-8"
    )
    (work / "unknown-id.json").write_text(
        json.dumps([{"id": "9b2f4c1e-1111-2222-3333-444455556666", "corrected_intent": "x"}]),
        encoding="utf-8",
    )
    path = home / "prompt_capture.db"
    if database == "migrated":
        shutil.copyfile(migrated, path)
    elif database == "unmigrated":
        sqlite3.connect(path).close()  # an SQLite file without the schema
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPT_CAPTURE_", "PREFECT_"))}
    env |= {"PROMPT_CAPTURE_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return env


def run_case(case: Case, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*case.args(work), env=env, cwd=work)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the cases' work folders (``root / case.id``)."""
    return tmp_path_factory.mktemp("cli-errors")


@pytest.fixture(scope="module")
def outcomes(root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    migrated = root / "migrated.db"
    db.upgrade(f"sqlite:///{migrated}")
    envs = {
        case.id: prepare(root / case.id, case.database, migrated)
        | (case.env(root / case.id) if case.env else {})
        for case in CASES
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda case: run_case(case, root / case.id, envs[case.id]), CASES)
        return {case.id: result for case, result in zip(CASES, done, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_user_error_is_one_line_and_exit_code_2(
    case: Case, root: Path, outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = outcomes[case.id]
    lines = result.stderr.strip().splitlines()
    shown = f"exit {result.returncode}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert result.returncode == 2, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: "), shown
    assert case.expect in lines[0], shown
    if case.line is not None:
        assert lines[0] == case.line(root / case.id), shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert case.absent not in result.stderr + result.stdout, shown
    assert "Retrying" not in result.stderr and "temporary server" not in result.stderr, shown


@pytest.mark.parametrize("case", NO_HOME, ids=lambda c: c.id)
def test_a_read_only_command_names_the_missing_home_and_creates_nothing(
    case: Case, root: Path, outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    line = outcomes[case.id].stderr.strip()
    home = root / case.id / "home"
    assert f"PROMPT_CAPTURE_HOME {home}: no such folder" in line
    assert "`prompt-capture init`" in line
    assert not home.exists()  # no folder, no empty SQLite file


def test_help_is_typers_as_before(root: Path) -> None:
    for args in (["--help"], ["db", "--help"], ["train", "--help"], ["candidate", "set", "--help"]):
        result = run_cli(*args, env={**os.environ, "COLUMNS": "200"}, cwd=root)
        assert result.returncode == 0, result.stderr
        assert f"Usage: prompt-capture {' '.join(args[:-1])}".rstrip() in result.stdout
        assert result.stderr == ""
    rollback = run_cli("rollback", "--help", env={**os.environ, "COLUMNS": "200"}, cwd=root)
    assert "--lock-timeout" in rollback.stdout


def test_piped_output_is_never_wrapped(root: Path) -> None:
    """Not a terminal, no COLUMNS: a line longer than 80 columns stays one line (no rich
    wrapping at 80 in a pipe or a log)."""
    home = root / "piped" / ("a-long-folder-name-" * 5) / "home"
    (home / "models").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPT_CAPTURE_", "COLUMNS"))}
    result = run_cli("models", env=env | {"PROMPT_CAPTURE_HOME": str(home)}, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"no models in {home / 'models'}\n"
    assert len(result.stdout) > 120


def test_an_output_in_missing_folders_creates_them(root: Path) -> None:
    """Missing folders on the way of an --output file are created (every command alike)."""
    work = root / "missing-folders"
    env = prepare(work, "unmigrated", root / "migrated.db")  # no database needed
    result = run_cli(
        "convert-to-pairs",
        "--input",
        "records.jsonl",
        "--output",
        "new/sub/p.jsonl",
        env=env,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert (work / "new" / "sub" / "p.jsonl").is_file()


def test_review_ui_on_a_port_in_use_is_one_line(
    root: Path, outcomes: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """The bind is tried before anything is printed: no "review workbench on" line, no
    uvicorn error, exit code 2."""
    work = root / "port-in-use"
    env = prepare(work, "migrated", root / "migrated.db")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("review-ui", "--port", str(port), env=env, cwd=work)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: --port {port}: address already in use on 127.0.0.1; choose another port or "
        "stop the process using it"
    ]


def test_a_busy_registry_shows_only_the_error_line(root: Path) -> None:
    """The registry lock's "waiting for ..." lines stay off the console (``--verbose`` shows
    them): a busy registry ends in its one error line."""
    from tests.test_registry_lock import held_by_another_run

    work = root / "busy-registry"
    env = prepare(work, "unmigrated", root / "migrated.db")  # no database needed
    with held_by_another_run(work / "home" / "models", "weekly-cycle/busy-run"):
        result = run_cli("rollback", "--lock-timeout", "0.5", env=env, cwd=work)
        verbose = run_cli("--verbose", "rollback", "--lock-timeout", "0.5", env=env, cwd=work)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "(run 'weekly-cycle/busy-run')" in lines[0]
    assert "is busy: waiting" in verbose.stderr
