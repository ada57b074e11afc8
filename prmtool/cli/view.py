"""`prmtool view`: a shard set as one self-contained HTML page, to read labelled steps.

The page is one file with everything inline (styles, script, the rows as JSON, the `stats`
plots as PNG data URIs): it opens from disk on a machine with no network. The rows are rendered
by the page's script a page of responses at a time, so 10,000 responses stay responsive
(bench/bench_view.py measures it). `prmtool review` serves the same page with editing on.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import Inputs, Quiet, finite
from prmtool.core.outputs import check_outputs, check_replaceable, input_roots, replace_atomically
from prmtool.core.report import RunStats

# page.html's mark: a file holding it is a page view wrote, which a rerun may replace
GENERATOR = b'<meta name="generator" content="prmtool view">'
FIRST_ERROR_COLUMNS = ("first_error", "human_first_error", "judge_first_error")
# A step list the steps can be shaded by, in the order --color picks its default from
COLOR_COLUMNS = ("step_mc", "step_labels", "step_rewards", "step_values")
# Columns whose values the label filter offers, beside the first-error columns
VALUE_COLUMNS = ("verify_status", "answer_source", "label_reason", "filter_reason")
# Columns the page shows in a response's header, when present
SHOWN_COLUMNS = (
    "problem_id",
    "response_id",
    "reference_answer",
    "pred_answer",
    "correct",
    "prm_score",
    "thinking_steps",
    "intervention_step",
    "intervention",
    *FIRST_ERROR_COLUMNS,
    *VALUE_COLUMNS,
    "review_note",
    "reviewed_at",
)


def extra_columns(frame: pl.DataFrame) -> list[str]:
    """Columns outside the row contract with one short value per row (`generator`, `source`,
    `task`): shown with each response, and offered by the label filter when they have few values."""
    from prmtool.core.schema import COLUMNS

    names = []
    for name, dtype in frame.schema.items():
        if name in COLUMNS or name.startswith("_") or name.endswith("first_error") or name == "thinking_steps":
            continue
        if (dtype == pl.String and frame[name].n_unique() <= 50) or dtype.is_numeric() or dtype == pl.Boolean:
            names.append(name)
    return names[:8]


def first_error_columns(schema: pl.Schema | dict) -> list[str]:
    """The first-error columns present: the three known ones, then any other integer `*first_error`."""
    known = [name for name in FIRST_ERROR_COLUMNS if name in schema]
    others = [n for n, t in schema.items() if n.endswith("first_error") and n not in known and t.is_integer()]
    return known + sorted(others)


def check_view_options(schema: pl.Schema | dict, source: str, color: str | None, compare: list[str]) -> str | None:
    """The --color column (the default when None) and the --compare pair, checked against the
    input's columns; returns the color column (None: the rows have no step list to shade by)."""
    if color is None:
        color = next((name for name in COLOR_COLUMNS if name in schema), None)
    elif color not in schema:
        raise InputError(f"{source}: --color {color}: no such column (step columns: {_step_columns(schema)})")
    elif not isinstance(schema[color], pl.List) or not (
        schema[color].inner.is_numeric() or schema[color].inner == pl.Boolean
    ):
        raise InputError(
            f"{source}: --color {color}: not a list of numbers, one per step (step columns: {_step_columns(schema)})"
        )
    for name in compare:
        if name not in schema or name == "_shard":  # _shard is view's own, not the input's
            integers = [column for column, dtype in schema.items() if dtype.is_integer() and column != "_shard"]
            raise InputError(
                f"{source}: --compare {name}: no such column (integer columns: {', '.join(integers) or 'none'})"
            )
        if not schema[name].is_integer():
            raise InputError(f"{source}: --compare {name}: not a first-error column (an integer step index)")
    return color


def _step_columns(schema) -> str:
    names = [n for n, t in schema.items() if isinstance(t, pl.List) and (t.inner.is_numeric() or t.inner == pl.Boolean)]
    return ", ".join(names) or "none"


def parse_compare(spec: str | None) -> list[str]:
    """`first_error,human_first_error`: the two first-error columns whose disagreements the page filters on."""
    if spec is None:
        return []
    names = [name.strip() for name in spec.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise InputError(f"--compare {spec!r}: expected two different columns, e.g. first_error,human_first_error")
    return names


def read_rows(found: list[shards.InputShard]) -> pl.DataFrame:
    """Every row of the shard set, with `_shard` (the output shard name it comes from)."""
    try:
        frames = [shards.read_shard(s).with_columns(pl.lit(s.name).alias("_shard")) for s in found]
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"{found[0].path}: the shards' columns do not fit together ({shards._one_line(exc)})"
        ) from None


def color_scale(frame: pl.DataFrame, column: str | None) -> dict | None:
    """How the page maps a step's value to a shade: labels are good or bad; values all in [0, 1]
    (MC, probabilities) go from red at 0 to green at 1; anything else (rewards, log-ratios) is
    centred on 0 and spans the 99th percentile of |value|, so one outlier cannot wash out the rest."""
    if column is None:
        return None
    if column == "step_labels" or frame.schema[column].inner == pl.Boolean:
        return {"column": column, "kind": "labels"}
    values = frame[column].explode().drop_nulls().cast(pl.Float64)
    values = values.filter(values.is_finite())
    if values.len() == 0 or (values.min() >= 0 and values.max() <= 1):
        return {"column": column, "kind": "share", "low": 0.0, "high": 1.0}
    span = float(values.abs().quantile(0.99)) or float(values.abs().max()) or 1.0
    return {"column": column, "kind": "signed", "low": -span, "high": span}


def page_rows(frame: pl.DataFrame, color: str | None) -> dict:
    """The rows as the page reads them: one list per column (smaller than one object per row),
    problems stored once and referred to by index, floats rounded to what a person reads."""
    columns: dict[str, list] = {}
    problem_index: dict[str, int] = {}
    problems: list[str] = []
    if "problem" in frame.columns:
        keys = frame["problem_id"] if "problem_id" in frame.columns else frame["problem"]
        indices = []
        for key, text in zip(keys.to_list(), frame["problem"].to_list()):
            key = key if key is not None else text
            if key not in problem_index:
                problem_index[key] = len(problems)
                problems.append(text)
            indices.append(problem_index[key])
        columns["problem"] = indices
    if "steps" in frame.columns:
        columns["steps"] = frame["steps"].to_list()
    elif "response" in frame.columns:  # not split into steps yet: the whole response as one step
        columns["steps"] = [[text] if text is not None else [] for text in frame["response"].to_list()]
    step_lists = {name for name in (*COLOR_COLUMNS, color, "step_labels") if name and name in frame.columns}
    for name in step_lists:
        columns[name] = [_rounded_list(values) for values in frame[name].to_list()]
    for name in [*SHOWN_COLUMNS, *first_error_columns(frame.schema), *extra_columns(frame)]:
        if name in frame.columns and name not in columns:
            values = frame[name].to_list()
            columns[name] = [_rounded(value) for value in values] if frame.schema[name].is_float() else values
    return {"count": frame.height, "problems": problems, "columns": columns}


def _rounded(value):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return round(value, 4) if isinstance(value, float) else value


def _rounded_list(values):
    return None if values is None else [_rounded(value) for value in values]


def summary(frame: pl.DataFrame, quiet: bool = True) -> dict:
    """The summary tab: `prmtool stats`' figures, and its plots as PNG data URIs."""
    from prmtool.cli.stats import plot_shard_set, shard_set_stats

    lazy = frame.drop("_shard", strict=False).lazy()
    figures = shard_set_stats(lazy)
    images = []
    with tempfile.TemporaryDirectory(prefix="prmtool-view-") as folder:
        lines = plot_shard_set(lazy, Path(folder))
        for path in sorted(Path(folder).glob("*.png")):
            images.append(
                {"name": path.name, "src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}
            )
    log = RunStats("view", quiet=quiet)
    for line in lines:
        if line.startswith("skipped"):
            log.log(line)
    return {"figures": figures, "plots": images, "skipped": [line for line in lines if line.startswith("skipped")]}


def render_page(data: dict) -> str:
    """The whole HTML page: the template with its style, its script and `data` put inline.

    The JSON goes into a `<script type="application/json">` element, so `<` is written as
    \\u003c: a response that contains `</script>` or `<!--` cannot end the element early."""
    folder = resources.files("prmtool.cli") / "view_page"
    template = (folder / "page.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    payload = payload.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return (
        template.replace("/*STYLE*/", (folder / "page.css").read_text(encoding="utf-8"))
        .replace("/*SCRIPT*/", (folder / "page.js").read_text(encoding="utf-8"))
        .replace("/*DATA*/", payload)
        .replace("<!--TITLE-->", _html_escape(data["title"]))
    )


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def page_data(
    frame: pl.DataFrame,
    *,
    title: str,
    color: str | None,
    compare: list[str],
    threshold: float,
    page_size: int,
    with_summary: bool = True,
    quiet: bool = True,
) -> dict:
    """Everything the page shows, as one JSON-ready dict (the review server adds `review`)."""
    return {
        "title": title,
        "color": color_scale(frame, color),
        "compare": compare,
        "first_error_columns": first_error_columns(frame.schema),
        "value_columns": [name for name in VALUE_COLUMNS if name in frame.columns]
        + [name for name in extra_columns(frame) if frame.schema[name] == pl.String],
        "extra_columns": extra_columns(frame),
        "threshold": threshold,
        "page_size": page_size,
        "rows": page_rows(frame, color),
        "summary": summary(frame, quiet) if with_summary else None,
        "review": None,
    }


def open_frame(inputs: list[str], color: str | None, compare: list[str]) -> tuple[list, pl.DataFrame, str | None]:
    """Read the shard set and check the options against its columns (one line naming the shard)."""
    found = shards.open_inputs(inputs)
    for shard in found:
        if "steps" not in shard.schema and "response" not in shard.schema and "problem" not in shard.schema:
            raise InputError(
                f"{shard.path}: no problem, response or steps column to show (has: {', '.join(shard.schema)})"
            )
    frame = read_rows(found)
    return found, frame, check_view_options(frame.schema, str(found[0].path.parent), color, compare)


# Options view and review share
Color = Annotated[
    str | None,
    typer.Option(
        "--color",
        help="The per-step column that shades each step: step_mc, step_labels, step_rewards, step_values or any "
        "list of numbers (default: the first of those present).",
        show_default=False,
    ),
]
Compare = Annotated[
    str | None,
    typer.Option(
        "--compare",
        help="Two first-error columns, e.g. first_error,human_first_error: the pair the page's disagreement filter "
        "starts on, and the one the disagreement order puts first where they differ.",
        show_default=False,
    ),
]
Threshold = Annotated[
    float,
    typer.Option(
        "--threshold",
        help="The step_mc value a step is judged against: the 'closest to the threshold' order puts first the "
        "responses with a step MC nearest it.",
        min=0,
        max=1,
        callback=finite,
    ),
]
PageSize = Annotated[int, typer.Option("--page-size", help="Responses per page of the list.", min=1, max=1000)]

EXAMPLES = """\b
Examples:
  prmtool view data_samples/gsm8k/labeled -o work/labeled.html
  prmtool view work/labeled --color step_mc -o work/labeled.html
  prmtool view work/pb-labeled --compare first_error,human_first_error -o work/pb.html
  prmtool view work/scored --color step_rewards --page-size 50 -o work/scored.html
"""


def command(
    inputs: Inputs,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")],
    color: Color = None,
    compare: Compare = None,
    threshold: Threshold = 0.5,
    page_size: PageSize = 20,
    quiet: Quiet = False,
) -> None:
    """One self-contained HTML page of a shard set: problems and responses with each step shaded
    by --color, every first-error column marked on its step, thinking steps folded; filters for
    right and wrong answers, a label column's value and disagreeing first errors, a search over
    the problems, and the stats plots on a summary tab. Opens offline in any browser."""
    pair = parse_compare(compare)
    found, frame, color_column = open_frame(inputs, color, pair)
    check_outputs(input_roots(inputs, [s.path for s in found]), {"-o": output})
    if output.is_dir():
        raise InputError(f"{output}: -o is a directory; give the HTML file's path")
    # before the page is built; a page an earlier view wrote is replaced, no other file
    check_replaceable(output, "-o", lambda head: GENERATOR in head, "a page")
    title = f"prmtool view: {', '.join(inputs)}"
    data = page_data(
        frame, title=title, color=color_column, compare=pair, threshold=threshold, page_size=page_size, quiet=quiet
    )
    page = render_page(data)
    # a whole file under the final name, or none; a link, FIFO or device there is refused
    replace_atomically(output, lambda handle: handle.write(page.encode("utf-8")), "-o")
    RunStats("view", quiet=quiet).log(f"wrote {output} ({frame.height:,} responses, {len(page.encode()) / 1e6:.1f} MB)")
