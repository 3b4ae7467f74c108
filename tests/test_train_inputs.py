"""Bad training and evaluation inputs: every refusal names the real cause, as one line and exit
code 2 from the CLI, before any model is loaded (a table of files -> exact messages)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tasks.pairs import Pair
from tasks.records import Record
from tasks.train import TrainConfig, TrainingDataError, train_model
from tasks.train_inputs import training_texts
from tests.test_registry import fake_model


def records(rows: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)


THREE_SINGLES = records(
    [("will it rain", "weather"), ("play jazz", "music"), ("my balance", "banking")]
)
GOOD = records([(f"{lab} {i}", lab) for lab in ("weather", "music", "banking") for i in range(4)])
RECORDS_EXPECTED = 'expected UTF-8 JSON Lines, one {"text": ..., "label": ...} object per line'
PAIRS_EXPECTED = (
    'expected JSON Lines of pair objects {"anchor", "positive", "label"} (optionally '
    '"negative", "negative_label"), as `prompt-capture convert-to-pairs` writes them'
)
MODEL_FILES = "metadata.json, head.npz, encoder"
MALFORMED = (
    "malformed.jsonl:13: malformed JSON (Expecting value at column 24): "
    '\'{"text": "x", "label":\'; expected one JSON object per line'
)


def cannot_read(name: str, kind: str, found: str, expected: str, advice: str) -> str:
    """The message for a ``kind`` (records, pairs) file that its reader cannot read."""
    return f"{name}: cannot read this {kind} file: found {found}, {expected}; {advice}"


def empty_file(kind: str, expected: str) -> str:
    """The message for ``empty.jsonl`` read as a ``kind`` file."""
    return cannot_read(
        "empty.jsonl",
        kind,
        "an empty file (0 bytes)",
        expected,
        "was it saved or copied completely? write or export it again",
    )


def csv_file(kind: str, expected: str) -> str:
    """The message for ``table.csv`` read as a ``kind`` file."""
    return cannot_read(
        "table.csv",
        kind,
        "CSV (comma-separated values) with header 'text,label'",
        expected,
        "a spreadsheet's CSV export cannot be read; keep the file as JSON (edit it in a text "
        "editor) or convert the table to JSON",
    )


def unreadable(name: str, found: str, advice: str) -> tuple[list[str], str]:
    """The case of ``train --train NAME`` on a records file that cannot be read."""
    return ["train", "--train", name], cannot_read(name, "records", found, RECORDS_EXPECTED, advice)


FILES: dict[str, str | bytes] = {
    "three.jsonl": THREE_SINGLES,
    "bom-crlf.jsonl": b"\xef\xbb\xbf" + THREE_SINGLES.replace("\n", "\r\n").encode(),
    "dups.jsonl": records([("will it rain", "weather")] * 2 + [("play jazz", "music")] * 2),
    "one-pairable.jsonl": records(
        [
            ("will it rain", "weather"),
            ("is it sunny", "weather"),
            ("play jazz", "music"),
            ("my balance", "banking"),
        ]
    ),
    "one-label.jsonl": records([("a", "weather"), ("b", "weather")]),
    "empty.jsonl": "",
    "blank.jsonl": "  \n\n",
    "no-label.jsonl": '{"text": "will it rain"}\n',
    "int-label.jsonl": '{"text": "will it rain", "label": 3}\n',
    "empty-text.jsonl": '{"text": "  ", "label": "weather"}\n',
    "malformed.jsonl": GOOD + '{"text": "x", "label": \n',
    "object.json": '{\n "text": "a",\n "label": "b"\n}\n',
    "utf16.jsonl": THREE_SINGLES.encode("utf-16"),
    "latin1.jsonl": '{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"),
    "table.csv": "text,label\nwill it rain,weather\n",
    "page.html": "<!DOCTYPE html><html><body>Sign in</body></html>\n",
    "good.jsonl": GOOD,
    "no-positive.jsonl": '{"anchor": "a", "label": "weather"}\n',
}

# (command line without --output, the one-line message after "error: ")
CASES: dict[str, tuple[list[str], str]] = {
    "one intent": (
        ["train", "--train", "one-label.jsonl"],
        "one-label.jsonl: expected at least 2 distinct labels, found 1 (['weather']); a "
        "classifier needs examples of several intents",
    ),
    "empty file": (
        ["train", "--train", "empty.jsonl"],
        empty_file("records", RECORDS_EXPECTED),
    ),
    "whitespace only": unreadable(
        "blank.jsonl",
        "only whitespace (4 bytes)",
        "was it saved completely? write or export it again",
    ),
    "missing label": (
        ["train", "--train", "no-label.jsonl"],
        "no-label.jsonl:1: missing field 'label': expected keys 'text' and 'label', found "
        "['text']; add the 'label' field",
    ),
    "label not a string": (
        ["train", "--train", "int-label.jsonl"],
        "int-label.jsonl:1: field 'label': expected a string, found int 3",
    ),
    "empty text": (
        ["train", "--train", "empty-text.jsonl"],
        "empty-text.jsonl:1: field 'text': expected non-empty text, found ' '; fill it in or "
        "remove the line",
    ),
    "a malformed line": (
        ["train", "--train", "malformed.jsonl"],
        MALFORMED,
    ),
    "one object over several lines": unreadable(
        "object.json",
        "one JSON object spread over several lines (keys: 'text', 'label'), not rows",
        "put the rows in a JSON list [{...}, {...}] or write one object per line",
    ),
    "UTF-16": unreadable(
        "utf16.jsonl",
        "UTF-16 LE text (it starts with the UTF-16 LE byte-order mark)",
        "save it as UTF-8 (the editor's 'Save as' offers the encoding), or convert it: iconv -f "
        "UTF-16 -t UTF-8 'utf16.jsonl' > 'utf16.utf8.jsonl'",
    ),
    "Latin-1": unreadable(
        "latin1.jsonl",
        'a byte that is not UTF-8: 0xe9 at byte offset 13 (line 1, near \'{"text": "caf\ufffd", '
        '"label": "a"}\\x0a\'); the file is probably Windows-1252 or Latin-1',
        "save it as UTF-8, or convert it: iconv -f WINDOWS-1252 -t UTF-8 'latin1.jsonl' > "
        "'latin1.utf8.jsonl'",
    ),
    "CSV": (
        ["train", "--train", "table.csv"],
        csv_file("records", RECORDS_EXPECTED),
    ),
    "an HTML error page": unreadable(
        "page.html",
        "an HTML page",
        "it is probably an error page saved instead of the file (a download that failed or "
        "needed a login); download or export the file again",
    ),
    "a pair budget of one": (
        ["train", "--train", "good.jsonl", "--max-pairs", "1"],
        "max_pairs: a budget of 1 pair(s) of same-intent texts covers 1 intent(s); fine-tuning "
        "needs the texts of at least 2 intents: set max_pairs to 2 or more (or leave it unset: "
        "every training example is used)",
    ),
    "an unknown device": (
        ["train", "--train", "good.jsonl", "--device", "gpu"],
        "device: expected 'auto', 'cpu' or 'cuda', found 'gpu'",
    ),
    "cuda on a machine without CUDA": (
        ["train", "--train", "good.jsonl", "--device", "cuda"],
        "device: 'cuda' was asked but torch.cuda.is_available() is False (torch "
        f"{torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU-only build)'}); use "
        "device 'auto' or 'cpu', or install a CUDA build of torch on a machine with a visible GPU",
    ),
    "an output directory that is not empty": (
        ["train", "--train", "good.jsonl", "--output", "busy"],
        "busy: already exists and is not empty; choose a new output directory",
    ),
    "a base model that does not exist": (
        ["train", "--train", "good.jsonl", "--base-model", "nowhere"],
        "nowhere: does not exist; expected a model directory (metadata.json + encoder/) or a "
        "sentence-transformers model directory",
    ),
    "a base model without its encoder": (
        ["train", "--train", "good.jsonl", "--base-model", "metadata-only"],
        "metadata-only: has metadata.json but no encoder/ directory; expected a model directory "
        "written by `prompt-capture train`",
    ),
    "a CSV pairs file": (
        ["train", "--train", "good.jsonl", "--pairs", "table.csv"],
        csv_file("pairs", PAIRS_EXPECTED),
    ),
    "a pair without a positive": (
        ["train", "--train", "good.jsonl", "--pairs", "no-positive.jsonl"],
        "no-positive.jsonl:1: expected a pair object with 'anchor', 'positive' and 'label' "
        "(non-empty strings; 'negative' and 'negative_label' optional strings), found "
        '\'{"anchor": "a", "label": "weather"}\' (\'positive\' is missing); fix or remove it '
        "(pairs files come from `prompt-capture convert-to-pairs`)",
    ),
    "an empty pairs file": (
        ["train", "--train", "good.jsonl", "--pairs", "empty.jsonl"],
        empty_file("pairs", PAIRS_EXPECTED),
    ),
    "a malformed validation file": (
        ["train", "--train", "good.jsonl", "--val", "malformed.jsonl"],
        MALFORMED,
    ),
    "evaluate: not a model directory": (
        ["evaluate", "--model", "no-model", "--data", "good.jsonl"],
        "no-model/metadata.json: missing; expected a model directory written by `prompt-capture "
        f"train` ({MODEL_FILES})",
    ),
    "evaluate: torch without the trained files": (
        ["evaluate", "--model", "metadata-only", "--data", "good.jsonl", "--backend", "torch"],
        f"metadata-only/head.npz: missing; a model directory needs {MODEL_FILES} "
        "(docs/ARCHITECTURE.md, 'The model directory'); train or copy a complete model "
        "directory first",
    ),
    "evaluate: onnx without an export": (
        ["evaluate", "--model", "metadata-only", "--data", "good.jsonl", "--backend", "onnx"],
        "metadata-only/model.onnx: missing; export the model first (tasks.export_onnx.export_onnx)",
    ),
    "evaluate: empty data": (
        ["evaluate", "--model", "metadata-only", "--data", "empty.jsonl"],
        empty_file("records", RECORDS_EXPECTED),
    ),
}

if torch.cuda.is_available():  # the refusal is for machines without CUDA
    del CASES["cuda on a machine without CUDA"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for name, content in FILES.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("x", encoding="utf-8")
    (root / "no-model").mkdir()
    fake_model(root / "metadata-only", onnx=False)
    return root


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_inputs_get_one_line_naming_the_real_cause(
    case: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.cli import app

    args, message = CASES[case]
    if args[0] == "train" and "--output" not in args:
        args = [*args, "--output", "never"]
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {message}"
    assert "Traceback" not in result.output
    assert not (workdir / "never").exists()


def test_the_same_checks_hold_for_train_model_and_given_pairs(tmp_path: Path) -> None:
    rows = [Record(f"{lab} {i}", lab) for lab in ("weather", "music") for i in range(3)]
    one_intent = [Pair("weather 0", "weather 1", "weather")]
    with pytest.raises(TrainingDataError) as info:
        train_model(rows, None, tmp_path / "b", pairs=one_intent, progress=False)
    assert str(info.value) == (
        "pairs: the pairs cover 1 intent (weather) of the 2 in the training data; fine-tuning "
        "on the texts of one intent would pull every text towards it, so at least 2 intents "
        "need pairs: rebuild the pairs from a file with at least 2 distinct examples of 2 or "
        "more intents"
    )
    with pytest.raises(TrainingDataError, match="found none of 1"):
        train_model(rows, None, tmp_path / "c", pairs=[Pair("x", "y", "nope")], progress=False)
    with pytest.raises(TrainingDataError, match="max_pairs: a budget of 0 pair"):
        train_model(rows, None, tmp_path / "d", config=TrainConfig(max_pairs=0), progress=False)
    assert not any(tmp_path.iterdir())


def test_training_texts_are_the_rows_or_the_texts_of_the_pairs() -> None:
    rows = [Record(f"{lab} {i}", lab) for lab in ("weather", "music") for i in range(3)]
    labels = ["music", "weather"]
    extra = [Pair("rain?", "snow?", "weather"), Pair("a", "b", "unknown")]
    config = TrainConfig()
    assert training_texts(rows, labels, config, pairs=None, extra_pairs=None) == rows
    assert training_texts(rows, labels, config, pairs=None, extra_pairs=extra) == [
        *rows,
        Record("rain?", "weather"),
        Record("snow?", "weather"),
    ]
    given = [Pair("weather 0", "weather 1", "weather"), Pair("music 0", "weather 0", "music")]
    assert training_texts(rows, labels, config, pairs=given, extra_pairs=None) == [
        Record("weather 0", "weather"),
        Record("weather 1", "weather"),
        Record("music 0", "music"),
        Record("weather 0", "music"),
    ]
    budget = training_texts(rows, labels, TrainConfig(max_pairs=2), pairs=None, extra_pairs=None)
    assert len(budget) == 4 and {r.label for r in budget} == {"music", "weather"}
    assert all(r in rows for r in budget)


def test_validation_log_prints_closed_set_accuracy_as_a_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The training log once printed closed-set accuracy with ``%.4s`` (a cut string)."""
    from tasks import train

    labels = ["a", "b", "oos"]
    val = [Record("a1", "a"), Record("a2", "a"), Record("b1", "b"), Record("o1", "oos")]
    emb = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]
    W = np.eye(3, dtype=np.float32) * 5
    caplog.set_level(logging.INFO, logger="tasks.train")
    train._calibrate(
        "logreg",
        train._Validation.of(val, emb, labels),
        W,
        np.zeros(3, np.float32),
        labels=labels,
        config=TrainConfig(),
    )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation")]
    assert re.search(r"closed-set \d\.\d{4}, macro-F1", line), line
