"""Hostile values, round two (issue 38): no command writes a wrong value with exit 0, answers bad
input with a traceback, or hangs. A bad value is a one-line error (exit 2) that names the file,
row, column or option; where a warning is right, the summary counts it. The concurrency and
ownership cases live in tests/test_hostile_inputs.py."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tests.conftest import SAMPLES
from tests.test_hostile_inputs import one_line_error

LABELED = SAMPLES / "labeled" / "part-00000.parquet"


def shard_of(tmp_path: Path, frame: pl.DataFrame, name: str = "in") -> Path:
    """`frame` as the one shard of a fresh folder."""
    folder = tmp_path / name
    folder.mkdir()
    frame.write_parquet(folder / "part-00000.parquet")
    return folder


def on_row(row: int, value, otherwise: str) -> pl.Expr:
    """`value` on one row, the column `otherwise` elsewhere."""
    return pl.when(pl.int_range(pl.len()) == row).then(value).otherwise(pl.col(otherwise))


@pytest.fixture
def labeled() -> pl.DataFrame:
    """The labeled GSM8K sample: steps, step_labels, first_error."""
    return pl.read_parquet(LABELED)


# --- wrong values written with exit 0 ---------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_lone_surrogate_in_json_is_refused_not_stored_as_a_nul(prmtool, tmp_path, suffix):
    row = '{"question": "a \\ud800 b", "answer": "x #### 5"}'
    source = tmp_path / f"in.{suffix}"
    source.write_text('{"question": "fine \\ud83d\\ude00", "answer": "x #### 4"}\n' + row + "\n")
    if suffix == "json":
        source.write_text(f'[{{"question": "fine", "answer": "x #### 4"}}, {row}]')
    one_line_error(prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out"), "row 1", "'question'")
    assert not (tmp_path / "out").exists()


def test_a_surrogate_pair_is_one_character(prmtool, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"question": "smile \\ud83d\\ude00", "answer": "x #### 4"}\n')
    assert prmtool("import", source, "--preset", "gsm8k", "-o", tmp_path / "out", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["problem"].to_list() == ["smile \N{GRINNING FACE}"]


EXPORT_VALUES = {
    "a null problem": ("problem", lambda: on_row(2, None, "problem"), "sft-messages", "column 'problem' is null"),
    "a null problem (verl)": ("problem", lambda: on_row(2, None, "problem"), "verl", "column 'problem' is null"),
    "a null problem (math-shepherd)": (
        "problem",
        lambda: on_row(2, None, "problem"),
        "math-shepherd",
        "column 'problem' is null",
    ),
    "a null response": ("response", lambda: on_row(2, None, "response"), "sft-prompt-completion", "'response' is null"),
    "a step label of 7": (
        "step_labels",
        lambda: on_row(2, pl.col("step_labels").list.eval(pl.lit(7, pl.Int8)), "step_labels"),
        "trl-stepwise",
        "'step_labels' holds a value other than 1",
    ),
    "a step label of -1": (
        "step_labels",
        lambda: on_row(2, pl.col("step_labels").list.eval(pl.lit(-1, pl.Int8)), "step_labels"),
        "math-shepherd",
        "'step_labels' holds a value other than 1",
    ),
    "a null step": (
        "steps",
        lambda: on_row(
            2,
            pl.col("steps").list.eval(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.element())),
            "steps",
        ),
        "trl-stepwise",
        "'steps' holds a null step",
    ),
}


@pytest.mark.parametrize("case", EXPORT_VALUES)
def test_export_refuses_a_value_it_would_write_wrongly(prmtool, tmp_path, labeled, case):
    column, value, format, message = EXPORT_VALUES[case]
    folder = shard_of(tmp_path, labeled.with_columns(value().alias(column)))
    result = prmtool("export", folder, "-o", tmp_path / "out", "-f", format)
    one_line_error(result, str(folder / "part-00000.parquet"), "row 2", message)
    assert not (tmp_path / "out").exists()
    one_line_error(prmtool("export", folder, "-o", "-", "-f", format), "row 2", message)


def test_export_checks_only_the_rows_where_keeps(prmtool, tmp_path, labeled):
    folder = shard_of(tmp_path, labeled.with_columns(problem=on_row(2, None, "problem")))
    result = prmtool("export", folder, "-o", tmp_path / "out", "-f", "sft-messages", "--where", "problem IS NOT NULL")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(tmp_path / "out" / "train" / "*.parquet").height == labeled.height - 1


PROCESSBENCH = {"id": "a", "problem": "1+1?", "steps": ["One and one.", "So 2."], "label": 1}
PROCESSBENCH_ROWS = {
    "label 1.7": ({"label": 1.7}, "label 1.7 is not a step index"),
    "a label past the last step": ({"label": 2}, "label 2 is not a step index"),
    "a label below -1": ({"label": -2}, "label -2 is not a step index"),
    "a label past int64": ({"label": 2**70}, "is not a step index"),
    "a text label": ({"label": "one"}, "column 'label' must hold step indices"),
    "steps as one text": ({"steps": "One and one. So 2."}, "'steps' must be a list of step texts"),
    "a null step": ({"steps": ["One and one.", None]}, "holds a null step"),
    "no steps": ({"steps": []}, "'steps' is empty"),
}


@pytest.mark.parametrize("case", PROCESSBENCH_ROWS)
def test_processbench_labels_and_steps_are_checked(prmtool, write_jsonl, tmp_path, case):
    change, message = PROCESSBENCH_ROWS[case]
    source = write_jsonl([dict(PROCESSBENCH, id="fine"), dict(PROCESSBENCH, **change)])
    result = prmtool("import", source, "--preset", "processbench", "-o", tmp_path / "out")
    one_line_error(result, str(source), "--preset processbench", message)
    if "column" not in message and "list" not in message:
        assert "row 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_processbench_whole_number_labels_are_kept(prmtool, write_jsonl, tmp_path):
    source = write_jsonl([dict(PROCESSBENCH, id="a", label=-1), dict(PROCESSBENCH, id="b", label=1.0)])
    assert prmtool("import", source, "--preset", "processbench", "-o", tmp_path / "out", "-q").exit_code == 0
    assert pl.read_parquet(tmp_path / "out" / "*.parquet")["human_first_error"].to_list() == [-1, 1]


@pytest.mark.parametrize(
    "preset, row, message",
    [
        ("gsm8k", {"question": "q", "answer": "x #### "}, "'####' line of 'answer' has no answer"),
        ("math", {"problem": "q", "solution": "so \\boxed{}"}, "last \\boxed{} of 'solution' is empty"),
        (None, {"problem": "q", "reference_answer": "  "}, "'reference_answer' is blank"),
    ],
)
def test_an_empty_reference_answer_is_refused(prmtool, write_jsonl, tmp_path, preset, row, message):
    source = write_jsonl([row])
    preset_options = ["--preset", preset] if preset else []
    one_line_error(prmtool("import", source, *preset_options, "-o", tmp_path / "out"), "row 0", message)


# --- tracebacks -------------------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """A stand-in for every model loader: it records the load and refuses it, so a test sees
    whether a command got as far as loading a model (20 s for the embedded one on CPU)."""
    import prmtool.engines as engines
    from prmtool.core.errors import InputError

    loads = []

    def stand_in(*args, **kwargs):
        loads.append(args)
        raise InputError("stand-in loader: a model would load here")

    monkeypatch.setattr(engines, "load_engine", stand_in)
    monkeypatch.setattr(engines, "load_step_classifier", stand_in)
    return loads


NULL_STEP_COMMANDS = {
    "score": ["--no-ref"],
    "label": [],
    "intervene": [],
}


@pytest.mark.parametrize("command", NULL_STEP_COMMANDS)
@pytest.mark.parametrize("null", ["a null step", "null steps"])
def test_a_null_step_is_refused_before_any_model_loads(prmtool, tmp_path, labeled, model_loads, command, null):
    steps = (
        pl.col("steps").list.eval(pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.element()))
        if null == "a null step"
        else pl.lit(None, pl.List(pl.String))
    )
    frame = labeled.with_columns(correct=pl.col("first_error") < 0, steps=on_row(3, steps, "steps"))
    folder = shard_of(tmp_path, frame)
    result = prmtool(command, folder, "-o", tmp_path / "out", *NULL_STEP_COMMANDS[command])
    one_line_error(result, str(folder / "part-00000.parquet"), "row 3", "'steps'")
    assert model_loads == [], "the input is checked before any model loads"
    assert not list((tmp_path / "out").glob("*.parquet")) if (tmp_path / "out").exists() else True
