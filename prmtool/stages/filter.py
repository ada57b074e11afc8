"""`prmtool filter`: keep the training responses whose process and outcome agree.

The decisions (PROF, consensus, accuracy band, --where) are pure functions in
`prmtool.methods.filtering`, whose docstring defines them exactly; this module reads the
features every decision needs from all shards, decides every group at once, and writes the
kept and rejected rows and the report.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core import outputs, shards
from prmtool.core.errors import InputError
from prmtool.core.options import (
    Steps,
    finite,
)
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary
from prmtool.core.schema import check_columns
from prmtool.core.stage import Stage, default_of
from prmtool.core.where import check_where, where_filter
from prmtool.methods.filtering import (
    APPLIES,
    METHODS,
    FilterConfig,
    decide,
    feature_expressions,
    parse_band,
    row_features,
    split_rows,
    summarize,
)

# --- the command ----------------------------------------------------------------------------


EXAMPLES = """\b
Examples:
  prmtool filter work/scored -o work/prof --rejects work/prof_rejects
  prmtool filter work/scored -o work/prof4 --rejects work/prof4_rejects --keep 4 --mode correct --value step_values
  prmtool filter work/scored -o work/agree --rejects work/disagree --method consensus --value step_mc --threshold 0.5
  prmtool filter work/verified -o work/band --rejects work/rest --method accuracy-band --band 0.2,0.8 --report r.json
  prmtool filter work/verified -o work/ok --rejects work/not_ok --method none --where "verify_status = 'ok'"
"""


@dataclass(kw_only=True)
class FilterSettings:
    rejects: Annotated[
        Path,
        typer.Option(
            "--rejects",
            help="Directory for the removed rows, with a filter_reason column: nothing is lost.",
            show_default=False,
        ),
    ]
    method: Annotated[
        str,
        typer.Option(
            help=(
                "prof (PROF consistency filter), consensus (MC and PRM agree on the first error), accuracy-band or "
                "none (only --where)."
            )
        ),
    ] = "prof"
    remove: Annotated[
        int | None, typer.Option(help="prof: responses to remove per problem (default 4).", min=0, show_default=False)
    ] = None
    keep: Annotated[
        int | None,
        typer.Option(help="prof: responses to keep per problem, instead of --remove.", min=0, show_default=False),
    ] = None
    mode: Annotated[
        str | None,
        typer.Option(
            help="prof: both (default), correct (remove only correct ones) or incorrect (only wrong ones).",
            show_default=False,
        ),
    ] = None
    value: Annotated[
        str | None,
        typer.Option(
            help=(
                "prof, consensus: step_rewards (default), step_values, step_mc or prm_score (prof only); lists are "
                "averaged over steps."
            ),
            show_default=False,
        ),
    ] = None
    min_steps: Annotated[
        int | None, typer.Option(help="prof: fewer steps are removed first (default 2).", min=0, show_default=False)
    ] = None
    max_steps: Annotated[
        int | None, typer.Option(help="prof: more steps are removed first (default 30).", min=1, show_default=False)
    ] = None
    threshold: Annotated[
        float | None,
        typer.Option(
            help="consensus: a step below this is the PRM's error (default 0.5 for step_mc, else 0).",
            callback=finite,
            show_default=False,
        ),
    ] = None
    band: Annotated[
        str | None, typer.Option(help="accuracy-band: LOW,HIGH, inclusive (default 0.2,0.8).", show_default=False)
    ] = None
    where: Annotated[
        str | None,
        typer.Option(
            help="Also keep only rows where this SQL expression holds (applied first), e.g. \"verify_status = 'ok'\"."
        ),
    ] = None
    steps: Steps = "all"
    report: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Also write the summary as JSON to this file. With --shard-index, the partition's summary, to "
                "FILE's name with the partition in it (prof.00001-of-00004.json)."
            )
        ),
    ] = None


# The settings that decide which rows go (--rejects and --report say where they are written).
DECISION_SETTINGS = (
    "method",
    "remove",
    "keep",
    "mode",
    "value",
    "min_steps",
    "max_steps",
    "threshold",
    "band",
    "where",
    "steps",
)


def filter_config(settings: FilterSettings) -> FilterConfig:
    """The decision's parameters, from the stage's settings (each checked against --method)."""
    return _options(*(getattr(settings, name) for name in DECISION_SETTINGS))


def filter_frame(frame: pl.DataFrame, **settings) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The per-frame core: one frame holding whole problem groups in; (kept, rejected) out,
    `rejected` with a filter_reason, kept + rejected = the input rows. `settings` are the
    stage's decision settings by name, valued as on the command line: `filter_frame(rows,
    keep=2)`, `filter_frame(rows, method="accuracy-band", band="0.2,0.8")`."""
    unknown = sorted(set(settings) - set(DECISION_SETTINGS))
    if unknown:
        raise InputError(f"filter: unknown setting {unknown[0]!r} (settings: {', '.join(DECISION_SETTINGS)})")
    defaults = {f.name: default_of(f) for f in dataclasses.fields(FilterSettings) if f.name in DECISION_SETTINGS}
    config = _options(*({**defaults, **settings}[name] for name in DECISION_SETTINGS))
    return split_rows(frame, decide(row_features(frame, config), config))


def run(
    inputs: list[str], output: Path, settings: FilterSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Keep the responses whose process and outcome agree (PROF by default); the removed
    rows go to --rejects with a filter_reason. Groups are problems, over all input shards;
    with --num-shards, partitions are sets of whole problems."""
    stats = RunStats("filter", quiet=quiet)
    options = filter_config(settings)
    condition = where_filter(settings.where)
    found = shards.open_inputs(inputs)
    for shard in found:
        if options.value in options.required and options.value not in shard.schema:
            raise InputError(
                f"{shard.path}: missing value column '{options.value}' (--value {options.value}); "
                f"`prmtool score` writes step_rewards, step_values and prm_score, `prmtool label` step_mc"
            )
        check_columns(shard.schema, str(shard.path), options.required)
        if condition is not None:
            check_where(condition, settings.where, shard)  # an unknown column or a non-boolean result
    report_file = (
        settings.report
        if settings.report is None or partition.whole
        else settings.report.with_name(partition.shard_name(settings.report.name))
    )
    shards.check_output_dir(output, found, inputs, {"--rejects": settings.rejects}, files={"--report": report_file})
    if report_file is not None:
        outputs.check_replaceable(report_file, "--report", lambda head: b'"stage": "filter"' in head, "a filter report")
    shards.check_distinct_names(found)

    arguments = options.arguments()
    described = [s.describe() for s in found]
    parts = {"kept": output, "rejected": settings.rejects}
    done = f"{output} and {settings.rejects} are already complete for these inputs and options"
    if not partition.whole:
        done = f"partition {partition.index} of {partition.count}: {done}"
    # Without --overwrite: is there anything to do? (A directory holding another run is refused
    # here.) With it, the old outputs are cleared only after the ids have been checked, below.
    key = outputs.run_key("filter", arguments, described, partition.count)
    with outputs.output_lock([output, settings.rejects], key, partition.label):
        return _filter(found, options, arguments, described, parts, partition, overwrite, report_file, done, stats)


def _filter(found, options, arguments, described, parts, partition, overwrite, report, done, stats) -> Summary:
    """Decide every group, then write the kept and rejected rows and the report."""
    complete = not overwrite and all(
        [
            shards.prepare_whole_output(d, "filter", {**arguments, "part": part}, described, False, partition)
            for part, d in parts.items()
        ]
    )
    names = [partition.shard_name(shard.name) for shard in found]
    if complete and report is None:
        stats.log(f"{done}; --overwrite recomputes them")
        return stats.summary()

    def claim_outputs() -> None:  # a folder of another run is refused; with --overwrite, its files go
        for part, directory in parts.items():
            shards.prepare_whole_output(
                directory, "filter", {**arguments, "part": part}, described, overwrite, partition, names
            )

    if not complete and not overwrite:
        claim_outputs()  # before any work

    features = pl.concat([_read_features(shard, options) for shard in found], how="diagonal_relaxed")
    if features["problem_id"].null_count():  # groups are problems: a row without one has no group
        row = int(features["problem_id"].is_null().arg_true()[0])
        raise InputError(
            f"{found[bisect.bisect_right(list(itertools.accumulate(s.rows for s in found)), row)].path}: "
            "column 'problem_id' has null values"
        )
    if options.method == "prof":
        _check_unique_response_ids(features, found)  # ties are broken by it
    # Every partition reads every shard's features but decides only its own problems' groups:
    # whole groups, so their decisions are the whole run's.
    owned = None if partition.whole else partition.owns_problems(features["problem_id"])
    if owned is not None:
        features = features.filter(owned)
        stats.log(f"partition {partition.index} of {partition.count}: {features.height} of {owned.len()} rows")
    reasons = decide(features, options)
    summary = summarize(features, reasons, options)
    if complete:
        stats.log(f"{done}; writing only the report")
    else:
        if overwrite:  # only now that the ids are checked
            claim_outputs()
        _write(found, owned, reasons, parts, arguments, partition, stats)
    stats.rows_in, stats.rows_out = summary["rows_in"], summary["kept"]
    stats.problem_ids.update(features.filter(reasons.is_null())["problem_id"].unique().to_list())
    stats.counts.update(_summary_counts(summary))
    _warn(summary, options, stats)
    if report is not None:
        shards.write_json_atomic({"stage": "filter", "arguments": arguments, **summary}, report, "--report")
    return stats.finish()


def _options(method, remove, keep, mode, value, min_steps, max_steps, threshold, band, where, steps) -> FilterConfig:
    given = {"--remove": remove, "--keep": keep, "--mode": mode, "--min-steps": min_steps, "--max-steps": max_steps,
             "--value": value, "--threshold": threshold, "--band": band,
             "--steps": None if steps == "all" else steps}  # fmt: skip
    if method in METHODS:
        for flag, setting in given.items():
            if setting is not None and method not in APPLIES[flag]:
                raise InputError(f"{flag} applies to --method {' and '.join(APPLIES[flag])}, not {method}")
    chosen = {"remove": remove, "keep": keep, "mode": mode, "value": value, "min_steps": min_steps,
              "max_steps": max_steps, "threshold": threshold, "band": parse_band(band) if band else None}  # fmt: skip
    return FilterConfig(method=method, where=where, steps=steps, **{k: v for k, v in chosen.items() if v is not None})


def _read_features(shard: shards.InputShard, options: FilterConfig) -> pl.DataFrame:
    """Only the columns the decision reads, and list columns reduced to a count or a mean as
    they are read (a lazy scan), so the whole set's decision fits in memory as a few narrow
    columns."""
    names = set(options.required) | ({"correct"} & set(shard.schema))
    if options.where:
        names |= set(where_filter(options.where).meta.root_names()) & set(shard.schema)
    try:
        return (
            pl.scan_parquet(shard.path)
            .select(feature_expressions([c for c in shard.schema if c in names], options))
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as exc:  # a --where that fails on the data, a damaged file
        raise InputError(f"{shard.path}: {shards._one_line(exc)}") from None


def _check_unique_response_ids(features: pl.DataFrame, found: list[shards.InputShard]) -> None:
    """shards.check_unique_ids' rule and messages, on the ids the features already hold: the
    column is not read a second time."""
    ids = features["response_id"]
    starts = list(itertools.accumulate(shard.rows for shard in found))

    def file_of(row: int) -> str:
        return str(found[bisect.bisect_right(starts, row)].path)

    duplicated = ids.is_duplicated()
    if duplicated.any():
        rows = duplicated.arg_true().head(2).to_list()
        files = sorted({file_of(row) for row in rows})
        raise InputError(f"{', '.join(files)}: duplicate response_id {ids[rows[0]]!r}")
    if ids.null_count():
        raise InputError(f"{file_of(int(ids.is_null().arg_true()[0]))}: column 'response_id' has null values")


def _write(
    found: list[shards.InputShard],
    owned: pl.Series | None,
    reasons: pl.Series,
    parts: dict[str, Path],
    arguments: dict,
    partition: Partition,
    stats: RunStats,
) -> None:
    """One kept and one rejected shard per input shard (empty ones too), named after it
    (with a partition: `partition.shard_name`, and only its problems' rows), then the
    manifests: rejects first, the kept output's last.

    Two threads write, so that one shard's Parquet encoding and fsync (single-threaded, and
    waiting on the disk) overlap the next shard's read and split."""
    written: dict[str, dict[str, int]] = {part: {} for part in parts}
    input_offset = decided_offset = 0
    in_flight: list[Future] = []
    with (
        ThreadPoolExecutor(max_workers=2) as writers,
        stats.progress("filter", total=sum(s.rows for s in found)) as tracker,
    ):
        for shard in found:
            frame = shards.read_shard(shard)
            if owned is not None:
                frame = frame.filter(owned.slice(input_offset, shard.rows))
            input_offset += shard.rows
            kept, rejected = split_rows(frame, reasons.slice(decided_offset, frame.height))
            decided_offset += frame.height
            for future in in_flight:  # the previous shard's pieces: at most two shards in memory
                future.result()
            in_flight = []
            name = partition.shard_name(shard.name)
            for part, rows in (("rejected", rejected), ("kept", kept)):
                record = shards.provenance("filter", {**arguments, "part": part}, shard)
                in_flight.append(writers.submit(shards.write_shard, rows, parts[part] / name, record))
                written[part][name] = rows.height
                stats.shards_written += 1
            tracker.advance(shard.rows)
        for future in in_flight:
            future.result()
    described = [s.describe() for s in found]
    for part in ("rejected", "kept"):
        shards.write_manifest(parts[part], "filter", {**arguments, "part": part}, described, written[part], partition)


def _summary_counts(summary: dict) -> dict[str, int]:
    counts = {"groups": summary["groups"], "groups_emptied": summary["groups_emptied"]}
    counts.update({f"removed_{reason}": n for reason, n in summary["removed_by_reason"].items()})
    if "balance" in summary:
        for when in ("before", "after"):
            counts[f"positives_{when}"] = summary["balance"][when]["positive"]
            counts[f"negatives_{when}"] = summary["balance"][when]["negative"]
    if summary.get("values_missing"):
        counts["values_missing"] = summary["values_missing"]
    return counts


def _warn(summary: dict, options: FilterConfig, stats: RunStats) -> None:
    removed = summary["removed_by_reason"]
    if removed.get("group_too_small"):
        stats.warn(
            f"{removed['group_too_small']} responses are in groups of at most --remove {options.k} and were all "
            f"removed; --keep M keeps M per group instead"
        )
    if removed.get("no_outcome"):
        stats.warn(f"{removed['no_outcome']} responses have no `correct` value and were removed (no_outcome)")
    if summary.get("values_missing"):
        fate = "ranked as the worst of their side" if options.method == "prof" else "removed (no_value)"
        stats.warn(f"{summary['values_missing']} responses have no {options.value} value (null, empty or NaN): {fate}")
    if summary["rows_in"] and not summary["kept"]:
        stats.warn("every row was removed")


STAGE = Stage("filter", FilterSettings, run, EXAMPLES, required=("problem_id", "response_id"), check=filter_config)
