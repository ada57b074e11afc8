"""`prmtool import`: problems (and optional responses) from JSONL, JSON, CSV, Parquet or a
`datasets` folder, into the row contract, as Parquet shards."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import Split, TraceSettings
from prmtool.core.outputs import check_outputs, input_roots, run_key
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary
from prmtool.core.runner import whole_output
from prmtool.core.schema import cast_to_contract, check_columns
from prmtool.core.stage import Stage
from prmtool.methods.steps import make_splitter, split_steps
from prmtool.methods.thinking import (
    ThinkSplit,
    parse_think_tags,
    think_split_of,
    thinking_of_given_steps,
    trace_columns,
)
from prmtool.methods.verification import last_boxed

PRESETS = ("gsm8k", "math", "processbench", "deltabench")
ID_COLUMNS = ("problem_id", "response_id", "reference_answer", "reference_solution")


def read_source(path: Path, dataset_split: str | None = None) -> pl.DataFrame:
    """One input file or `datasets` folder as a frame; errors name the file."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not path.is_dir() and not path.is_file():  # a FIFO or a device would block the read
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device); give a file or a datasets folder")
    try:
        if path.is_dir():
            return _read_datasets_folder(path, dataset_split)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            _check_surrogates(path, lines=True)
            return pl.read_ndjson(path, infer_schema_length=None)
        if suffix == ".json":
            _check_surrogates(path, lines=False)
            return pl.read_json(path, infer_schema_length=None)
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=0)  # all text: ids and answers stay as written
        if suffix == ".parquet":
            return pl.read_parquet(path)
    except InputError:
        raise
    except Exception as exc:
        if not path.is_dir() and path.suffix.lower() in (".jsonl", ".ndjson"):
            with path.open("rb") as lines:
                if where := shards.first_bad_json_line(lines):  # polars' message names no line
                    raise InputError(f"{path}: {where}") from None
        raise InputError(
            f"{path}: cannot be read as {path.suffix or 'a datasets folder'} ({shards._one_line(exc)})"
        ) from None
    raise InputError(f"{path}: unknown format; expected .jsonl, .json, .csv, .parquet or a datasets folder")


# A JSON escape of a UTF-16 surrogate; paired ones are one character, a lone one is no text at
# all (polars would store it as a NUL byte).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_surrogates(path: Path, lines: bool) -> None:
    """Refuse a JSON source holding a lone surrogate escape (`"\\ud800"`), naming its row and
    column. Only a file with such an escape is parsed a second time, by Python's json."""
    data = path.read_bytes()
    if not _SURROGATE_ESCAPE.search(data):
        return
    try:
        records = [json.loads(line) for line in data.splitlines() if line.strip()] if lines else json.loads(data)
    except ValueError:
        return  # not valid JSON: polars' reader says so, with its own message
    for row, record in enumerate(records if isinstance(records, list) else [records]):
        for column, value in record.items() if isinstance(record, dict) else [("", record)]:
            if _holds_lone_surrogate(value):
                raise InputError(
                    f"{path}: row {row}: column {column!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                    "without its pair), which is not text"
                )


def _holds_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_holds_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(item) for item in value.values())
    return False


def _read_datasets_folder(path: Path, dataset_split: str | None) -> pl.DataFrame:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if dataset_split is None and len(names) == 1:
            dataset_split = names[0]
        if dataset_split is None:
            raise InputError(f"{path}: pick a split with --dataset-split (has: {', '.join(names)})")
        if dataset_split not in loaded:
            close = difflib.get_close_matches(dataset_split, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"{path}: --dataset-split {dataset_split!r}: no such split (has: {', '.join(names)}){hint}"
            )
        loaded = loaded[dataset_split]
    return pl.from_arrow(loaded.data.table)


def apply_preset(frame: pl.DataFrame, preset: str | None, source: str) -> pl.DataFrame:
    """gsm8k: `question`/`answer` with `#### X`; math: `problem`/`solution` with a last \\boxed{}."""
    if preset is None:
        return frame
    if preset == "gsm8k":
        _require(frame, ("question", "answer"), source, "--preset gsm8k")
        unmarked = ~pl.Series(frame["answer"]).cast(pl.String).str.contains("####").fill_null(False)
        if unmarked.any():
            raise InputError(
                f"{source}: row {int(unmarked.arg_true()[0])}: --preset gsm8k: column 'answer' has no '#### ANSWER' "
                f"line"
            )
        solution_and_answer = pl.col("answer").str.split_exact("####", 1)
        frame = (
            frame.rename({"question": "problem"})
            .with_columns(
                reference_solution=solution_and_answer.struct.field("field_0").str.strip_chars(),
                reference_answer=solution_and_answer.struct.field("field_1").str.strip_chars().str.replace_all(",", ""),
            )
            .drop("answer")
        )
        _no_blank_answers(frame, source, "--preset gsm8k: the '####' line of 'answer' has no answer")
        return frame
    if preset == "math":
        _require(frame, ("problem", "solution"), source, "--preset math")
        frame = frame.rename({"solution": "reference_solution"})
        if "answer" in frame.columns and "reference_answer" not in frame.columns:
            return frame.rename({"answer": "reference_answer"})
        frame = frame.with_columns(
            reference_answer=pl.col("reference_solution").map_elements(last_boxed, return_dtype=pl.String)
        )
        missing = frame["reference_answer"].is_null()
        if missing.any():
            raise InputError(
                f"{source}: row {int(missing.arg_true()[0])}: --preset math found no \\boxed{{}} answer in 'solution'"
            )
        _no_blank_answers(frame, source, "--preset math: the last \\boxed{} of 'solution' is empty")
        return frame
    if preset == "processbench":
        # ProcessBench: each row a solution, its `steps` as given (the human labels index them),
        # `label` the earliest wrong step or -1.
        _require(frame, ("problem", "steps", "label"), source, "--preset processbench")
        _check_processbench(frame, source)
        frame = frame.rename({"label": "human_first_error"}).with_columns(
            response=pl.col("steps").list.join("\n\n"), human_first_error=pl.col("human_first_error").cast(pl.Int32)
        )
        if "id" in frame.columns and "response_id" not in frame.columns:
            frame = frame.rename({"id": "response_id"})
        if "reference_answer" not in frame.columns:
            frame = frame.with_columns(reference_answer=pl.lit(None, dtype=pl.String))
        return frame
    if preset == "deltabench":
        return _deltabench(frame, source)
    raise InputError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")


def _check_processbench(frame: pl.DataFrame, source: str) -> None:
    """ProcessBench's `steps` are a list of step texts, and its `label` the index of the earliest
    wrong one or -1: a label that is not a whole number, or names no step, is refused."""
    what = "--preset processbench"
    steps, label = frame["steps"], frame["label"]
    if not isinstance(steps.dtype, pl.List) or steps.dtype.inner not in (pl.String, pl.Null):
        raise InputError(f"{source}: {what}: column 'steps' must be a list of step texts, not {steps.dtype}")
    bad = steps.is_null() | (steps.list.len() == 0) | (steps.list.eval(pl.element().is_null()).list.any())
    if bad.any():
        row = int(bad.arg_true()[0])
        raise InputError(f"{source}: row {row}: {what}: column 'steps' is empty or holds a null step")
    if not (label.dtype.is_numeric() or label.dtype == pl.Null):
        raise InputError(f"{source}: {what}: column 'label' must hold step indices (-1: no error), not {label.dtype}")
    values = label.cast(pl.Float64, strict=False)
    whole = values.is_not_null() & values.is_finite() & (values == values.floor())
    in_range = whole & (values >= -1) & (values < steps.list.len().cast(pl.Float64))
    if not in_range.all():
        row = int((~in_range).arg_true()[0])
        raise InputError(
            f"{source}: row {row}: {what}: label {label[row]!r} is not a step index: expected -1 (no error) or 0 to "
            f"{steps[row].len() - 1} (the response has {steps[row].len()} steps)"
        )


def _no_blank_answers(frame: pl.DataFrame, source: str, message: str) -> None:
    answers = frame["reference_answer"].cast(pl.String)  # an all-null column has no type of its own
    blank = answers.is_not_null() & (answers.str.strip_chars() == "")
    if blank.any():
        raise InputError(f"{source}: row {int(blank.arg_true()[0])}: {message}")


def _deltabench(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """DeltaBench (OpenStellarTeam): a long chain of thought cut into sections by people, with
    the numbers (from 1) of the sections they found wrong. Each section is a step; the earliest
    wrong one is `human_first_error`. The sections are all thinking: DeltaBench keeps no
    written solution apart from them."""
    _require(frame, ("question", "reason_error_section_numbers"), source, "--preset deltabench")
    if "sections" not in frame.columns and "sections_content" not in frame.columns:
        raise InputError(f"{source}: --preset deltabench needs column 'sections' or 'sections_content'")
    rows = frame.to_dicts()
    steps, first_errors = [], []
    for number, row in enumerate(rows):
        sections = _deltabench_sections(row)
        if not sections:
            raise InputError(f"{source}: row {number}: --preset deltabench: no sections")
        wrong = _section_numbers(row["reason_error_section_numbers"], f"{source}: row {number}")
        if any(not 1 <= n <= len(sections) for n in wrong):
            raise InputError(
                f"{source}: row {number}: reason_error_section_numbers {sorted(wrong)} outside the sections, "
                f"1..{len(sections)}"
            )
        steps.append(sections)
        first_errors.append(min(wrong) - 1 if wrong else -1)
    renames = {"question": "problem"}
    if "answer" in frame.columns and "reference_answer" not in frame.columns:
        renames["answer"] = "reference_answer"
    if "id" in frame.columns and "response_id" not in frame.columns:
        renames["id"] = "response_id"
    frame = frame.rename(renames).with_columns(
        pl.Series("steps", steps, dtype=pl.List(pl.String)),
        pl.Series("human_first_error", first_errors, dtype=pl.Int32),
        pl.Series("thinking_steps", [len(s) for s in steps], dtype=pl.Int32),
        pl.Series("finished", [None] * len(steps), dtype=pl.Boolean),  # not known: no solution part
    )
    frame = frame.with_columns(response=pl.col("steps").list.join("\n\n"))
    if "reference_answer" not in frame.columns:
        frame = frame.with_columns(reference_answer=pl.lit(None, dtype=pl.String))
    return frame


def _deltabench_sections(row: dict) -> list[str]:
    """The sections' texts: from `sections` (a list of {content: ...}), else from
    `sections_content` ("section1:\n...\n\nsection2:\n..." as DeltaBench's judge prompt shows them)."""
    import re

    sections = row.get("sections")
    if sections:
        return [
            str(s.get("content") or s.get("section") or "").strip() if isinstance(s, dict) else str(s).strip()
            for s in sections
        ]
    text = row.get("sections_content") or ""
    pieces = re.split(r"(?im)^\s*section\s*\d+\s*:[ \t]*\n?", text)
    return [piece.strip() for piece in pieces[1:]] if len(pieces) > 1 else []


def _section_numbers(value, where: str) -> list[int]:
    """A list of section numbers, as JSON gives it or as a CSV cell writes it ("[3, 5]")."""
    import ast

    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip() or "[]")
        except (ValueError, SyntaxError):
            raise InputError(f"{where}: reason_error_section_numbers {value!r} is not a list of numbers") from None
    if isinstance(value, (int, float)):
        value = [value]
    try:
        return [int(n) for n in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: reason_error_section_numbers {value!r} is not a list of numbers") from None


def _require(frame: pl.DataFrame, columns: tuple[str, ...], source: str, what: str) -> None:
    for column in columns:
        if column not in frame.columns:
            raise InputError(f"{source}: {what} needs column '{column}' (has: {', '.join(frame.columns)})")


def stable_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def to_contract(
    frame: pl.DataFrame, source: str, split: str = "blank-line", think: ThinkSplit | None = None
) -> pl.DataFrame:
    """Ids, types and steps: make a renamed frame a valid shard of the row contract."""
    return add_steps(identify(frame, source, split), split, think, source)


def identify(frame: pl.DataFrame, source: str, split: str = "blank-line") -> pl.DataFrame:
    """Every check of a renamed frame, and its ids: `problem_id` and `response_id`."""
    _require(frame, ("problem",), source, "import")
    if "reference_answer" not in frame.columns:  # prompts alone, for generation; verify says no_reference
        frame = frame.with_columns(reference_answer=pl.lit(None, dtype=pl.String))
    frame = frame.with_columns(
        pl.col(c).cast(pl.String)
        for c in ID_COLUMNS
        if c in frame.columns and frame.schema[c] != pl.String and frame.schema[c].is_numeric()
    )
    check_columns(frame.schema, source)
    _no_nulls(frame, "problem", source)
    _no_blank_answers(frame, source, "column 'reference_answer' is blank; leave it null for a problem without one")
    if "problem_id" not in frame.columns:
        frame = frame.with_columns(
            problem_id=pl.col("problem").map_elements(lambda p: stable_id(p), return_dtype=pl.String)
        )
    _no_nulls(frame, "problem_id", source)
    _one_text_per_problem(frame, source)
    if "response" in frame.columns:
        _no_nulls(frame, "response", source)
        if "response_id" not in frame.columns:
            # The k-th identical response to a problem gets its own id, still stable across runs.
            # k counts over the whole source, so an id does not depend on the partition.
            occurrence = pl.int_range(pl.len()).over("problem_id", "response").cast(pl.String)
            frame = frame.with_columns(
                response_id=pl.concat_str("problem_id", "response", occurrence, separator="\x1f").map_elements(
                    lambda key: stable_id(key), return_dtype=pl.String
                )
            )
        if "steps" in frame.columns:
            _check_given_steps(frame, make_splitter(split).separator, split, source)
    return frame


def _one_text_per_problem(frame: pl.DataFrame, source: str) -> None:
    """A problem_id names one problem: two texts under one id would merge two groups."""
    texts = frame.group_by("problem_id", maintain_order=True).agg(pl.col("problem").n_unique().alias("texts"))
    clash = texts.filter(pl.col("texts") > 1)
    if clash.height:
        raise InputError(
            f"{source}: problem_id {clash['problem_id'][0]!r} has {clash['texts'][0]} different problem texts"
        )


def add_steps(
    frame: pl.DataFrame, split: str = "blank-line", think: ThinkSplit | None = None, source: str = "input"
) -> pl.DataFrame:
    """`steps` for responses that came without them, the contract's column order and types.
    `--split think` also gives `thinking_steps` and `finished`."""
    if "response" in frame.columns and split == "think":
        frame = _add_thinking(frame, think or ThinkSplit(), source)
    elif "response" in frame.columns and "steps" not in frame.columns:
        splitter = make_splitter(split)
        # a loop, not map_elements: a split that runs out of time is its own one-line error
        steps = [split_steps(response, splitter) for response in frame["response"].to_list()]
        frame = frame.with_columns(steps=pl.Series(steps, dtype=pl.List(pl.String)))
    leading = [
        c
        for c in ("problem_id", "problem", "reference_answer", "reference_solution", "response_id", "response", "steps")
        if c in frame.columns
    ]
    return cast_to_contract(frame.select(leading + [c for c in frame.columns if c not in leading]))


def _add_thinking(frame: pl.DataFrame, think: ThinkSplit, source: str) -> pl.DataFrame:
    """Steps, `thinking_steps` and `finished` of reasoning traces. Steps that came with the data
    stay; columns of the same names that came with it must agree with what the tags say."""
    responses = frame["response"].to_list()
    if "steps" in frame.columns:
        found = [thinking_of_given_steps(s or [], r, think) for s, r in zip(frame["steps"].to_list(), responses)]
        columns = {"thinking_steps": [t for t, _ in found], "finished": [f for _, f in found]}
    else:
        columns = trace_columns(responses, think)
        frame = frame.with_columns(pl.Series("steps", columns.pop("steps"), dtype=pl.List(pl.String)))
    for name, dtype in (("thinking_steps", pl.Int32), ("finished", pl.Boolean)):
        computed = pl.Series(name, columns[name], dtype=dtype)
        if name in frame.columns:
            given = frame[name].cast(dtype, strict=False)
            differs = (given != computed).fill_null(False)
            if differs.any():
                row = int(differs.arg_true()[0])
                raise InputError(
                    f"{source}: row {row}: column '{name}' is {given[row]} but the trace's tags say {computed[row]}; "
                    f"rename the column with --map {name}=OTHER"
                )
            computed = given.fill_null(computed)
        frame = frame.with_columns(computed.fill_null(0) if name == "thinking_steps" else computed)
    return frame


def _check_given_steps(frame: pl.DataFrame, separator: str, split: str, source: str) -> None:
    """Steps that came with the data are kept (labels may refer to them), but only if they are
    a lossless split of the response with the --split separator, as every stage assumes."""
    joined = frame["steps"].list.join(separator)
    mismatch = (joined != frame["response"]) | frame["steps"].is_null()
    if mismatch.any():
        row = int(mismatch.arg_true()[0])
        raise InputError(
            f"{source}: row {row}: column 'steps' does not join back to 'response' with the "
            f"--split {split} separator {separator!r}; drop the column or pick the matching --split"
        )


def _no_nulls(frame: pl.DataFrame, column: str, source: str) -> None:
    nulls = frame[column].is_null()
    if nulls.any():
        raise InputError(f"{source}: row {int(nulls.arg_true()[0])}: column '{column}' is empty")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a `datasets` folder, so a changed source reruns."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _digest(path: Path) -> str:
    """A hash of a file's bytes, or of every file of a `datasets` folder, so that a source
    edited in place (even to the same size) is a new input."""
    if path.is_file():
        return shards.content_digest(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return run_key([(str(f.relative_to(path)), shards.content_digest(f)) for f in files])


def parse_maps(maps: list[str]) -> dict[str, str]:
    renames = {}
    for item in maps:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise InputError(f"--map {item!r}: expected SRC=DST")
        renames[source] = target
    return renames


def import_rows(
    paths: list[Path],
    maps: dict[str, str],
    preset: str | None,
    split: str,
    dataset_split: str | None = None,
    partition: Partition = shards.WHOLE,
    think: ThinkSplit | None = None,
) -> pl.DataFrame:
    """Read, rename, apply the preset and conform every source; one frame in input order.
    With a partition, only its problems' rows; every row is still read and checked, and ids
    are given before any row is set aside, so they are the whole run's."""
    identified = []
    for path in paths:
        frame = read_source(path, dataset_split)
        missing = [s for s in maps if s not in frame.columns]
        if missing:
            raise InputError(f"{path}: --map names missing column '{missing[0]}' (has: {', '.join(frame.columns)})")
        frame = apply_preset(frame.rename(maps), preset, str(path))
        identified.append(identify(frame, str(path), split))
    if any("response_id" in frame.columns for frame in identified):
        # A source without responses adds null ids, as the rows of a concatenated frame would.
        no_ids = pl.Series("response_id", dtype=pl.String)
        response_ids = pl.concat([
            frame["response_id"] if "response_id" in frame.columns else no_ids.extend_constant(None, frame.height)
            for frame in identified
        ])  # fmt: skip
        dupes = response_ids.filter(response_ids.is_duplicated())
        if dupes.len():
            raise InputError(f"{', '.join(map(str, paths))}: duplicate response_id {dupes[0]!r}")
    if not partition.whole:  # steps are split only for the partition's own rows
        identified = [frame.filter(partition.owns_problems(frame["problem_id"])) for frame in identified]
    return pl.concat(
        [add_steps(frame, split, think, str(path)) for path, frame in zip(paths, identified)], how="diagonal_relaxed"
    )


EXAMPLES = """\b
Examples:
  prmtool import data_samples/gsm8k/test_sample.jsonl --preset gsm8k -o work/problems
  prmtool import outputs.csv --map question=problem --map gold=reference_answer --map output=response -o work/responses
  prmtool import my_hf_dataset/ --dataset-split test --preset math --shard-rows 5000 -o work/math-problems
  prmtool import data_samples/long-cot/sky-t1-amc23.jsonl --split think -o work/traces
  prmtool import r1_outputs.jsonl --split think --think-tags '<think>,</think>' --thinking-opened -o work/r1-traces
  prmtool import data_samples/deltabench/sample.jsonl --preset deltabench -o work/deltabench
"""


@dataclass(kw_only=True)
class ImportSettings(TraceSettings):
    map: Annotated[list[str], typer.Option("--map", help="Rename a column: SRC=DST (repeatable).")] = field(
        default_factory=list
    )
    preset: Annotated[
        str | None,
        typer.Option(help="Column conventions of a known dataset: gsm8k, math, processbench or deltabench."),
    ] = None
    split: Split = "blank-line"
    shard_rows: Annotated[int, typer.Option(help="Rows per output shard.", min=1, max=1_000_000_000)] = 50_000
    dataset_split: Annotated[str | None, typer.Option(help="Which split of a datasets DatasetDict folder to read.")] = (
        None
    )


def _stdin_copy() -> Path:
    """`-`: JSONL on standard input, kept in a private temporary file so that it can be read
    like any other source (and hashed for provenance)."""
    import atexit
    import shutil
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="prmtool-stdin-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / "stdin.jsonl"
    with target.open("wb") as copy:
        shutil.copyfileobj(sys.stdin.buffer, copy)
    return target


def run(
    inputs: list[str], output: Path, settings: ImportSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Bring problems (and optional model responses) into prmtool's row contract. With
    --num-shards, partitions are sets of whole problems."""
    inputs = [_stdin_copy() if str(path) == "-" else Path(path) for path in inputs]  # never globs
    stats = RunStats("import", quiet=quiet)
    arguments = {
        "map": settings.map,
        "preset": settings.preset,
        "split": settings.split,
        "shard_rows": settings.shard_rows,
        "dataset_split": settings.dataset_split,
    }
    if settings.split == "think":
        arguments.update(
            think_tags=settings.think_tags,
            min_step_tokens=settings.min_step_tokens,
            max_steps=settings.max_steps,
            thinking_opened=settings.thinking_opened,
        )
    sources = [{"path": str(p.resolve()), "size": _size(p), "xxh3": _digest(p)} for p in inputs if p.exists()]
    renames = parse_maps(settings.map)
    check_outputs(input_roots(inputs), {"-o": output})
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: -o exists and is not a directory")
    think = think_split_of(settings)
    frame = import_rows(
        list(inputs), renames, settings.preset, settings.split, settings.dataset_split, partition, think
    )
    count = max(1, -(-frame.height // settings.shard_rows))
    names = [partition.shard_name(f"part-{number:05d}.parquet") for number in range(count)]
    with whole_output("import", output, arguments, sources, overwrite, partition, stats, names) as work_to_do:
        if not work_to_do:
            return stats.summary()
        _write(frame, output, arguments, sources, settings.shard_rows, partition, stats)
    return stats.finish()


def _write(
    frame: pl.DataFrame,
    output: Path,
    arguments: dict,
    sources: list[dict],
    shard_rows: int,
    partition: Partition,
    stats: RunStats,
) -> None:
    stats.rows_in = stats.rows_out = frame.height
    if frame["reference_answer"].null_count():  # prompts alone may be imported; verify cannot grade them
        stats.counts["rows_without_reference_answer"] = frame["reference_answer"].null_count()
        stats.warn(
            f"{frame['reference_answer'].null_count()} rows have no reference_answer: verify cannot grade their "
            f"responses"
        )
    if arguments["split"] != "blank-line" and "response" not in frame.columns:
        # the rows are problems: their responses are split where they are written, by generate
        stats.warn(f"--split {arguments['split']}: the rows have no responses to split (give it to generate)")
    stats.problem_ids.update(frame["problem_id"].to_list())
    written = {}
    for number, start in enumerate(range(0, max(frame.height, 1), shard_rows)):
        name = partition.shard_name(f"part-{number:05d}.parquet")
        piece = frame.slice(start, shard_rows)
        shards.write_shard(piece, output / name, shards.provenance("import", arguments))
        written[name] = piece.height
        stats.shards_written += 1
    shards.write_manifest(output, "import", arguments, sources, written, partition)


def check_choices(settings: ImportSettings) -> None:
    if settings.preset is not None and settings.preset not in PRESETS:
        raise InputError(f"--preset {settings.preset!r}: expected one of {', '.join(PRESETS)}")
    parse_maps(settings.map or [])
    make_splitter(settings.split)
    parse_think_tags(settings.think_tags)


STAGE = Stage(
    "import",
    ImportSettings,
    run,
    EXAMPLES,
    inputs_option=Annotated[
        list[Path], typer.Argument(help="JSONL, JSON, CSV or Parquet files, or datasets folders.", show_default=False)
    ],
    output_option=Annotated[Path, typer.Option("--output", "-o", help="Output directory of Parquet shards.")],
    check=check_choices,
)
