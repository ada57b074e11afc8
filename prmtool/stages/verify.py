"""`prmtool verify`: is each response's final answer mathematically equal to the reference?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core.errors import InputError
from prmtool.core.options import ThinkTags, WorkerSettings, positive, worker_count
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.stage import Stage
from prmtool.methods.thinking import parse_think_tags
from prmtool.methods.verification import EXTRACT_MODES, verify_rows

REQUIRED = ("problem_id", "response_id", "response", "reference_answer")


EXAMPLES = """\b
Examples:
  prmtool verify data_samples/gsm8k/responses -o work/verified
  prmtool verify 'shards/*.parquet' -o work/verified-shards --timeout 2 --workers 8
  prmtool verify work/traces -o work/traces-verified --think-tags '<seed:think>,</seed:think>'
"""


@dataclass(kw_only=True)
class VerifySettings(WorkerSettings):
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds allowed for one comparison (at most an hour); then verify_status = timeout.",
            callback=positive,
            max=3600,
        ),
    ] = 5.0
    extract: Annotated[
        str,
        typer.Option(
            help=(
                "cascade: the boxed answer, else an answer phrase, else the final sentence's math or number "
                "(answer_source says which); strict: boxed and answer phrases only."
            )
        ),
    ] = "cascade"
    think_tags: ThinkTags = None


def check_extract(settings: VerifySettings) -> None:
    if settings.extract not in EXTRACT_MODES:
        raise InputError(f"--extract {settings.extract!r}: expected one of {', '.join(EXTRACT_MODES)}")
    parse_think_tags(settings.think_tags)


def verify_frame(frame: pl.DataFrame, settings: VerifySettings | None = None, *, tracker=None) -> pl.DataFrame:
    """The per-frame core: adds `pred_answer`, `correct` and `verify_status`; every input row
    and column stays. `tracker` (a `Tracker`, or anything with `advance(rows)`) sees progress."""
    settings = settings or VerifySettings()
    check_extract(settings)
    return verify_rows(
        frame,
        extract=settings.extract,
        tags=parse_think_tags(settings.think_tags),
        timeout=settings.timeout,
        workers=worker_count(settings.workers),
        on_progress=None if tracker is None else tracker.advance,
    )


def run(
    inputs: list[str], output: Path, settings: VerifySettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Check each response's final answer against `reference_answer` by mathematical
    equivalence (Math-Verify), writing `pred_answer`, `answer_source`, `correct` and
    `verify_status`."""
    check_extract(settings)
    stats = RunStats("verify", quiet=quiet)
    worker_count(settings.workers, stats.warn)  # says so when --workers is capped

    given_tags = parse_think_tags(settings.think_tags)[0] if settings.think_tags is not None else None

    def transform(frame: pl.DataFrame, tracker) -> pl.DataFrame:
        if given_tags is not None:  # tags that never occur leave every trace's answer unread
            for tag in (given_tags.open, given_tags.close):
                stats.counts["responses_with_the_think_tags"] += int(
                    frame["response"].str.contains(tag, literal=True).fill_null(False).sum()
                )
        result = verify_frame(frame, settings, tracker=tracker)
        stats.counts.update(f"status_{s}" for s in result["verify_status"])
        stats.counts.update(f"answer_from_{s}" for s in result["answer_source"] if s is not None)
        stats.counts["correct"] += int(result["correct"].sum())
        return result

    # `extract` is in the provenance: an output of the strict reading is not resumed as a cascade one.
    arguments = {"timeout": settings.timeout, "extract": settings.extract}
    if settings.think_tags is not None:
        arguments["think_tags"] = settings.think_tags
    stage = MapStage("verify", transform, arguments, REQUIRED)
    run_map_stage(stage, inputs, output, overwrite, stats, partition)
    if given_tags is not None and stats.rows_in and not stats.counts["responses_with_the_think_tags"]:
        stats.warn(
            f"--think-tags {settings.think_tags!r}: neither tag occurs in any of the {stats.rows_in:,} responses; "
            "check the tags (without --think-tags the known pairs are tried)"
        )
    return stats.finish()


STAGE = Stage("verify", VerifySettings, run, EXAMPLES, REQUIRED)
