"""`prmtool export`: training-ready datasets in the formats TRL, Math-Shepherd and verl read."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import (
    template,
)
from prmtool.core.outputs import naming_the_path, plain_name
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary
from prmtool.core.runner import whole_output
from prmtool.core.schema import check_columns
from prmtool.core.stage import Stage
from prmtool.core.where import check_where, where_filter
from prmtool.methods.formats import FORMATS, MATH_SHEPHERD_TAG, check_values

MAX_HOLDOUT_SPLITS = 100


def parse_split(spec: str | None) -> dict[str, float]:
    """`test=0.05` or `test=0.05,valid=0.05`; whatever remains goes to `train`."""
    if not spec:
        return {}
    parts = spec.split(",")
    if len(parts) > MAX_HOLDOUT_SPLITS:  # each is a folder with at least one shard: thousands would take minutes
        raise InputError(f"--holdout: {len(parts):,} splits; at most {MAX_HOLDOUT_SPLITS} may be held out")
    fractions: dict[str, float] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name.strip() or not 0 <= fraction <= 1:
            raise InputError(f"--holdout {spec!r}: expected NAME=FRACTION[,NAME=FRACTION] with fractions in [0, 1]")
        fractions[plain_name(name.strip(), "--holdout: the split name")] = fraction  # it names a folder
    if "train" in fractions:
        raise InputError(f"--holdout {spec!r}: name the held-out splits only; the rest goes to train")
    if sum(fractions.values()) > 1:
        raise InputError(f"--holdout {spec!r}: fractions add up to more than 1")
    return fractions


def assign_splits(problem_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Split by problem, never by response: every response of a problem lands in one split.
    A problem's split comes from a hash of the seed and its own id (a point in [0, 1) against
    the cumulative fractions), so it never depends on which other problems are present:
    exports of two stages of one run, or of overlapping subsets, put a shared problem on the
    same side. Split sizes are the fractions in expectation, not exactly."""
    assignment = {}
    for problem_id in set(problem_ids):
        digest = hashlib.sha256(f"{seed}\x1f{problem_id}".encode()).digest()
        point, start = int.from_bytes(digest[:8], "big") / 2**64, 0.0
        assignment[problem_id] = "train"
        for name, fraction in fractions.items():
            if start <= point < start + fraction:
                assignment[problem_id] = name
                break
            start += fraction
    return assignment


def export_rows(
    frame: pl.DataFrame,
    format_name: str,
    split_of: dict[str, str] | None = None,
    start_index: dict[str, int] | None = None,
    **options,
) -> tuple[dict[str, pl.DataFrame], Counter]:
    """Pure core: contract rows in, one frame of the format per split out, plus skip counts.
    `start_index` numbers verl's extra_info.index on from where the previous shard stopped."""
    fmt = FORMATS[format_name]
    start_index = start_index or {}
    frame = frame.with_columns(
        _split=pl.col("problem_id").replace_strict(split_of, default="train") if split_of else pl.lit("train")
    )
    results, counts = {}, Counter()
    for (split_name,), part in frame.group_by("_split", maintain_order=True):
        converted, skipped = fmt.convert(
            part.drop("_split"), split_name=split_name, start_index=start_index.get(split_name, 0), **options
        )
        results[split_name] = converted
        counts.update(skipped)
    return results, counts


EXAMPLES = """\b
Examples:
  prmtool export work/verified -o work/sft --format sft-messages --where correct
  prmtool export work/labeled -o work/prm --format trl-stepwise --holdout test=0.05 --seed 0
  prmtool export work/problems -o work/verl --format verl --hf-dataset work/verl_hf
  prmtool export work/interventions -o work/int_sft --format sft-messages --open-turn
"""


@dataclass(kw_only=True)
class ExportSettings:
    format: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")]
    where: Annotated[str | None, typer.Option(help="Keep rows where this SQL expression holds, e.g. 'correct'.")] = None
    holdout: Annotated[
        str | None,
        typer.Option(
            "--holdout",
            "--split",
            help="Held-out splits by problem (a hash of --seed and problem_id), e.g. test=0.05; the rest is train. "
            "(--split: the old spelling, still accepted.)",
        ),
    ] = None
    seed: Annotated[int, typer.Option(help="Seed of the problem split.", min=0)] = 0
    prompt_template: Annotated[
        str, typer.Option(help="User message; {problem} is replaced by the problem.", callback=template)
    ] = "{problem}"
    system_prompt: Annotated[
        str | None, typer.Option(help="A system message first (sft-messages, verl; qwen-prm has its own by default).")
    ] = None
    data_source: Annotated[
        str,
        typer.Option(
            help=(
                "verl's data_source column; verl's built-in reward scores lighteval/MATH by the last \\boxed{}. "
                "prmtool's own reward ignores it (README, verl)."
            )
        ),
    ] = "lighteval/MATH"
    step_tag: Annotated[
        str,
        typer.Option(
            help="math-shepherd, math-shepherd-soft: the tag after each step of `input` (one token of your tokenizer)."
        ),
    ] = MATH_SHEPHERD_TAG
    open_turn: Annotated[
        bool,
        typer.Option(
            "--open-turn",
            help=(
                "sft formats: leave the assistant turn open (no end-of-turn), as InT trains on guided responses; "
                "adds continue_final_message."
            ),
        ),
    ] = False
    hf_dataset: Annotated[
        Path | None,
        typer.Option(help="Also save a datasets DatasetDict folder here (not with --num-shards: it needs every row)."),
    ] = None


def format_options(settings: ExportSettings) -> dict:
    """What the format's converter takes from the settings."""
    return {
        "prompt_template": settings.prompt_template,
        "system_prompt": settings.system_prompt,
        "data_source": settings.data_source,
        "open_turn": settings.open_turn,
        "step_tag": settings.step_tag,
    }


def check_format(settings: ExportSettings):
    """The format named by --format, checked against --open-turn."""
    if settings.format not in FORMATS:
        raise InputError(f"--format {settings.format!r}: expected one of {', '.join(FORMATS)}")
    fmt = FORMATS[settings.format]
    if settings.step_tag != MATH_SHEPHERD_TAG and not fmt.step_tag:
        with_tag = ", ".join(f.name for f in FORMATS.values() if f.step_tag)
        raise InputError(f"--step-tag is for --format {with_tag}, not {settings.format}")
    if not settings.step_tag.strip():
        raise InputError("--step-tag: must not be blank")
    if settings.system_prompt is not None and not fmt.system_turn:
        with_turn = ", ".join(f.name for f in FORMATS.values() if f.system_turn)
        raise InputError(f"--system-prompt: {settings.format} has no system turn (formats with one: {with_turn})")
    if settings.open_turn and not fmt.open_turn:
        raise InputError(
            f"--open-turn: only for {', '.join(f.name for f in FORMATS.values() if f.open_turn)}, not {settings.format}"
        )
    return fmt


def export_frame(frame: pl.DataFrame, settings: ExportSettings) -> dict[str, pl.DataFrame]:
    """The per-frame core: contract rows in, the format's rows out, one frame per split
    (`train`, and those named by `settings.holdout`, assigned by problem). The format is
    documented in prmtool/methods/formats.py and `prmtool export --help`."""
    fmt = check_format(settings)
    check_columns(frame.schema, "frame", ("problem_id",) + fmt.required)
    check_values(frame, fmt.required)
    condition = where_filter(settings.where)
    if condition is not None:
        frame = frame.filter(condition)
    if fmt.per_problem:
        frame = frame.unique("problem_id", keep="first", maintain_order=True)
    fractions = parse_split(settings.holdout)
    split_of = assign_splits(frame["problem_id"].to_list(), fractions, settings.seed) if fractions else None
    converted, _ = export_rows(frame, settings.format, split_of, **format_options(settings))
    return converted


@dataclass
class ExportPlan:
    """What a run will do, decided from every input before anything is written."""

    fmt: object  # the format (prmtool.methods.formats)
    found: list[shards.InputShard]
    condition: pl.Expr | None  # --where
    split_of: dict[str, str] | None  # problem_id -> split, over every input's problems
    arguments: dict  # provenance: the options that decide the output


def open_checked_inputs(inputs: list[str], settings: ExportSettings, fmt) -> tuple[list, pl.Expr | None]:
    """The input shards, each checked for the format's columns and for --where; and --where."""
    condition = where_filter(settings.where)
    found = shards.open_inputs(inputs)
    for shard in found:
        check_columns(shard.schema, str(shard.path), ("problem_id",) + fmt.required)
        if condition is not None:
            check_where(condition, settings.where, shard)
        # Every value the format would write, before any is written (rows --where drops aside)
        scan = pl.scan_parquet(shard.path).with_row_index("row_in_file")
        needed = [c for c in (*fmt.required, "guided_response") if c in shard.schema]
        rows = (scan if condition is None else scan.filter(condition)).select("row_in_file", *needed).collect()
        check_values(rows, fmt.required, str(shard.path), rows["row_in_file"])
    return found, condition


def plan_export(inputs: list[str], output: Path, settings: ExportSettings, overwrite: bool) -> ExportPlan:
    """Every check on the options and inputs, and the split of the problems."""
    fmt = check_format(settings)
    if settings.format == "jsonl":
        raise InputError("--format jsonl writes JSON lines to standard output: give -o -")
    fractions = parse_split(settings.holdout)
    found, condition = open_checked_inputs(inputs, settings, fmt)
    shards.check_output_dir(output, found, inputs, {"--hf-dataset": settings.hf_dataset})
    shards.check_distinct_names(found)
    split_of = None
    if fractions:  # from every input's problems, so that each partition splits as the whole run does
        problem_ids = pl.concat([pl.scan_parquet(s.path).select("problem_id") for s in found]).collect()["problem_id"]
        split_of = assign_splits(problem_ids.to_list(), fractions, settings.seed)
    arguments = {
        "format": settings.format,
        "where": settings.where,
        "split": settings.holdout,
        "seed": settings.seed,
        "prompt_template": settings.prompt_template,
        "system_prompt": settings.system_prompt,
        "data_source": settings.data_source,
    }
    if settings.open_turn:  # only when given: earlier complete outputs keep their arguments
        arguments["open_turn"] = True
    if settings.step_tag != MATH_SHEPHERD_TAG:
        arguments["step_tag"] = settings.step_tag
    if settings.hf_dataset is not None:
        check_hf_dataset(output, settings.hf_dataset, arguments, [s.describe() for s in found], overwrite)
    return ExportPlan(fmt, found, condition, split_of, arguments)


def check_hf_dataset(output: Path, target: Path, arguments: dict, inputs: list[dict], overwrite: bool) -> None:
    """An existing --hf-dataset folder is replaced only if an export into `output` wrote it and
    it is still as written (a file added or changed there, or another export's folder put in
    its place, is someone else's): by this same command resuming, or with --overwrite."""
    if not (target.exists() or target.is_symlink()):
        return
    if shards.prepare_whole_output(output, "export", arguments, inputs, overwrite):
        return  # this very export is complete: nothing is written
    if not (target / "dataset_dict.json").exists():
        raise InputError(f"{target}: --hf-dataset exists and is not a datasets folder; --overwrite replaces only those")
    digest = shards.folder_digest(target)  # a dataset may be gigabytes: read once
    if shards.wrote_beside(output, target, run=("export", arguments, inputs), digest=digest):
        return  # this same command, stopped after the folder and before its manifest
    if not shards.wrote_beside(output, target, digest=digest):
        raise InputError(
            f"{target}: --hf-dataset exists and no earlier export into {output} wrote it as it is now; --overwrite "
            "replaces only what a run wrote itself: move it away or choose another --hf-dataset"
        )
    if not overwrite:
        raise InputError(f"{target}: exists; pass --overwrite to replace it")


def export_to_stdout(inputs: list[str], settings: ExportSettings, partition: Partition, quiet: bool) -> Summary:
    """`-o -`: the format's rows as JSON lines on standard output, shard after shard, for shell
    pipelines; the summary stays on stderr. Nothing is written to disk, so there is no split."""
    import sys

    for flag, given in [("--holdout", settings.holdout), ("--hf-dataset", settings.hf_dataset)]:
        if given is not None:
            raise InputError(f"{flag}: not with -o - (standard output holds one stream of rows)")
    if not partition.whole:
        raise InputError("--num-shards: not with -o - (give each partition its own -o DIR)")
    fmt = check_format(settings)
    found, condition = open_checked_inputs(inputs, settings, fmt)
    stats = RunStats("export", quiet=quiet)
    seen: set[str] = set()  # per-problem formats keep each problem's first row, across shards
    for shard in found:
        frame = shards.read_shard(shard)
        stats.rows_in += frame.height
        if fmt.per_problem:
            frame = frame.filter(~pl.col("problem_id").is_in(list(seen)))
        rows = export_frame(frame, replace(settings, holdout=None)).get("train") if frame.height else None
        if rows is None or not rows.height:
            continue
        if fmt.per_problem:
            seen.update(frame["problem_id"].to_list())
        # the problems of the rows --where kept, as the export to a directory counts them
        kept = frame if condition is None else frame.filter(condition)
        stats.problem_ids.update(kept["problem_id"].to_list())
        try:
            sys.stdout.write(rows.write_ndjson())
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has all it wants
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            break
        stats.rows_out += rows.height
    return stats.finish()


def run(
    inputs: list[str], output: Path, settings: ExportSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Write training data: TRL stepwise supervision, Math-Shepherd, SFT or verl RL parquet,
    as OUTPUT/SPLIT/SHARD.parquet for each split (train, and those named by --holdout); verl
    also as OUTPUT/SPLIT.parquet, one file per split. With
    --num-shards, partitions are sets of whole problems, split as the whole run splits them."""
    if str(output) == "-":
        return export_to_stdout(inputs, settings, partition, quiet)
    if settings.hf_dataset is not None and not partition.whole:
        raise InputError(
            "--hf-dataset needs every partition's rows in one process: export without --num-shards, "
            "or load the output's Parquet shards with datasets.load_dataset('parquet', data_files=...)"
        )
    stats = RunStats("export", quiet=quiet)
    plan = plan_export(inputs, output, settings, overwrite)
    described = [s.describe() for s in plan.found]
    splits = ["train", *parse_split(settings.holdout)]
    names = [f"{split}/{partition.shard_name(s.name)}" for split in splits for s in plan.found]
    if settings.format == "verl" and partition.whole:
        names += [f"{split}.parquet" for split in splits]
    beside = [settings.hf_dataset] if settings.hf_dataset is not None else []
    with whole_output(
        "export", output, plan.arguments, described, overwrite, partition, stats, names, beside
    ) as work_to_do:
        if not work_to_do:
            return stats.summary()
        _export(plan, output, settings, partition, overwrite, quiet, stats)
    return stats.finish()


def _export(
    plan: ExportPlan,
    output: Path,
    settings: ExportSettings,
    partition: Partition,
    overwrite: bool,
    quiet: bool,
    stats: RunStats,
) -> None:
    """Convert and write every input shard, then the datasets folder, then the manifest."""
    found, fmt, condition, where, split_of = plan.found, plan.fmt, plan.condition, settings.where, plan.split_of
    arguments, options, hf_dataset = plan.arguments, format_options(settings), settings.hf_dataset
    # verl numbers its rows (extra_info.index) over the whole run; a partition, which sees only
    # its own problems, takes each problem's number from a narrow pass over every input.
    numbers = _problem_numbers(found, condition, where, split_of) if fmt.per_problem and not partition.whole else None

    written: dict[str, int] = {}
    try:
        _convert_shards(plan, output, settings, partition, stats, numbers, written)
    except InputError:
        # a row the format cannot hold, found mid-run: nothing of this run stays behind
        for relative in written:
            (output / relative).unlink(missing_ok=True)
        for split_folder in {(output / relative).parent for relative in written}:
            if split_folder != output and not any(split_folder.iterdir()):
                split_folder.rmdir()
        (output / partition.journal_name()).unlink(missing_ok=True)
        raise
    # A split that got no rows still gets one shard, with no rows and the format's columns:
    # a loader given the directory then finds data (`datasets` fails on a folder of none).
    for split_name in ["train", *parse_split(settings.holdout)]:
        if found and not any(name.startswith(f"{split_name}/") for name in written):
            no_rows = pl.DataFrame(schema=found[0].schema)  # the input's columns, from its footer
            converted, _ = fmt.convert(no_rows, split_name=split_name, start_index=0, **options)
            relative = f"{split_name}/{partition.shard_name(found[0].name)}"
            shards.write_shard(converted, output / relative, shards.provenance("export", arguments, found[0]))
            written[relative] = 0
    if not stats.rows_out:
        stats.warn(
            f"{output}: no rows to export{_why_no_rows(settings.format, stats.counts)}; each split holds one shard of "
            "no rows with the format's columns (polars and pyarrow read it; datasets.load_dataset refuses an empty "
            "split)"
        )
    split_files = []
    if settings.format == "verl" and partition.whole:  # before the manifest, as the datasets folder
        for split_name, path in write_split_files(output, written, shards.provenance("export", arguments, found[0])):
            stats.log(f"{split_name}: {path} (for verl's data.{'train' if split_name == 'train' else 'val'}_files)")
            split_files.append(path.name)
    if hf_dataset is not None:  # before the manifest: a failure here leaves the export incomplete
        save_hf_dataset(output, written, hf_dataset, overwrite, quiet)
        stats.log(f"datasets folder: {hf_dataset}")
    beside = [hf_dataset] if hf_dataset is not None else []
    shards.write_manifest(
        output, "export", arguments, [s.describe() for s in found], written, partition, also=split_files, beside=beside
    )


def _why_no_rows(format_name: str, counts) -> str:
    """Where every row was skipped as unlabeled: which column the format reads, and what writes it."""
    skipped = counts.get("skipped_unlabeled", 0)
    if not skipped:
        return ""
    if format_name.endswith("-soft"):
        return (
            f" (all {skipped:,} were skipped: {format_name} reads step_mc, which none had at its first step; "
            "label --method mc, or --label soft, writes it)"
        )
    return (
        f" (all {skipped:,} were skipped: {format_name} reads step_labels up to the first unlabeled step, and "
        "none had a label at its first step; label --steps solution leaves the thinking unlabeled)"
    )


def _convert_shards(
    plan: ExportPlan,
    output: Path,
    settings: ExportSettings,
    partition: Partition,
    stats: RunStats,
    numbers: dict | None,
    written: dict[str, int],
) -> None:
    """Convert each input shard and write its rows, split by split; `written` gains each file."""
    found, fmt, condition, where, split_of = plan.found, plan.fmt, plan.condition, settings.where, plan.split_of
    arguments, options = plan.arguments, format_options(settings)
    seen_problems: set[str] = set()  # per-problem formats keep each problem's first row, across shards
    next_index: dict[str, int] = {}
    with stats.progress("export", total=sum(s.rows for s in found)) as tracker:
        for shard in found:
            frame = shards.read_shard(shard)
            if not partition.whole:  # a problem's rows are all in one partition, in input order
                frame = frame.filter(partition.owns_problems(frame["problem_id"]))
            stats.rows_in += frame.height
            if condition is not None:
                try:
                    kept = frame.filter(condition)
                except Exception as exc:
                    raise InputError(f"{shard.path}: --where {where!r}: {shards._one_line(exc)}") from None
                stats.counts["removed_by_where"] += frame.height - kept.height
                frame = kept
            if fmt.per_problem:
                first = frame.unique("problem_id", keep="first", maintain_order=True).filter(
                    ~pl.col("problem_id").is_in(list(seen_problems))
                )
                stats.counts["merged_responses_of_one_problem"] += frame.height - first.height
                seen_problems.update(first["problem_id"].to_list())
                frame = first
            stats.problem_ids.update(frame["problem_id"].to_list())
            try:
                converted, skipped = export_rows(frame, settings.format, split_of, next_index, **options)
            except InputError as exc:  # a row the format cannot hold: name its file
                raise InputError(f"{shard.path}: {exc}") from None
            stats.counts.update(skipped)
            for split_name, part in converted.items():
                next_index[split_name] = next_index.get(split_name, 0) + part.height
                if numbers is not None:
                    part = _renumber(part, numbers)
                if part.height:
                    relative = f"{split_name}/{partition.shard_name(shard.name)}"
                    shards.write_shard(part, output / relative, shards.provenance("export", arguments, shard))
                    written[relative] = part.height
                    stats.counts[f"rows_{split_name}"] += part.height
                    stats.rows_out += part.height
                    stats.shards_written += 1
            tracker.advance(shard.rows)


def write_split_files(output: Path, written: dict[str, int], record: dict) -> list[tuple[str, Path]]:
    """One file per split, OUTPUT/SPLIT.parquet, with the rows of the split's shards in order:
    verl's data.train_files and data.val_files take files, not folders."""
    by_split: dict[str, list[Path]] = {}
    for relative in written:
        split_name, _ = relative.split("/", 1)
        by_split.setdefault(split_name, []).append(output / relative)
    files = []
    for split_name, paths in by_split.items():
        frame = pl.concat([pl.read_parquet(path) for path in sorted(paths)], how="vertical")
        shards.write_shard(frame, output / f"{split_name}.parquet", record)
        files.append((split_name, output / f"{split_name}.parquet"))
    return files


def _problem_numbers(
    found: list[shards.InputShard], condition: pl.Expr | None, where: str | None, split_of: dict[str, str] | None
) -> dict[str, int]:
    """Each problem's extra_info.index in the whole run: the number of problems of its split
    whose first row (after --where) comes before its own, over the inputs in order."""
    frames = []
    for shard in found:
        scan = pl.scan_parquet(shard.path)
        if condition is not None:
            scan = scan.filter(condition)
        try:
            frames.append(scan.select("problem_id").collect())
        except Exception as exc:
            raise InputError(f"{shard.path}: --where {where!r}: {shards._one_line(exc)}") from None
    first_rows = pl.concat(frames).unique("problem_id", keep="first", maintain_order=True)
    split = pl.col("problem_id").replace_strict(split_of, default="train") if split_of else pl.lit("train")
    numbered = first_rows.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over(split).alias("index"))
    return dict(numbered.iter_rows())


def _renumber(part: pl.DataFrame, numbers: dict[str, int]) -> pl.DataFrame:
    """Set verl's extra_info.index to the whole run's number of the row's problem."""
    index = pl.field("problem_id").replace_strict(numbers, return_dtype=pl.Int64).alias("index")
    return part.with_columns(pl.col("extra_info").struct.with_fields(index))


def save_hf_dataset(output: Path, written: dict[str, int], target: Path, overwrite: bool, quiet: bool = False) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_split: dict[str, list[str]] = {}
    for relative in sorted(written):
        by_split.setdefault(relative.split("/")[0], []).append(str(output / relative))
    # Read the shards with pyarrow, not polars: the folder keeps the shards' plain string and
    # list types, so it has the same features as the Parquet files.
    dataset = datasets.DatasetDict(
        {name: datasets.Dataset(pa.concat_tables(pq.read_table(f) for f in files)) for name, files in by_split.items()}
    )
    import shutil
    import tempfile

    # A new folder of our own beside the target (mkdtemp: a name no one else has), so that
    # no existing folder, an input with a name like ours included, is ever removed.
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    bars_were_enabled = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        with naming_the_path(target):  # a full disk names the folder it could not write
            dataset.save_to_disk(str(temporary))
        # the journal holds the folder's digest before it takes its place: a rerun of this
        # command finds it as this run wrote it, and replaces it
        shards.record_beside(output, target, shards.folder_digest(temporary))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # a full disk leaves no half-written folder
        raise
    finally:
        if quiet and bars_were_enabled:
            datasets.enable_progress_bars()
    if target.exists():  # check_hf_dataset made sure an export into `output` wrote it, as it is
        shutil.rmtree(target)
    temporary.rename(target)


def check_settings(settings: ExportSettings) -> None:
    check_format(settings)
    parse_split(settings.holdout)


STAGE = Stage(
    "export",
    ExportSettings,
    run,
    EXAMPLES,
    required=("problem_id",),
    check=check_settings,
    streams_to_stdout=True,
    output_option=Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output directory: OUTPUT/train/SHARD.parquet, and OUTPUT/NAME/ for each --holdout split, one "
            "shard per input shard; - with --format jsonl writes JSON lines to standard output.",
        ),
    ],
)


def example_rows_markdown(frame: pl.DataFrame, longest: int = 60) -> str:
    """One example row of every format, exported from `frame`'s first labeled row, as JSON with
    long texts shortened: README.md's "Example rows" (a test keeps the two in sync)."""
    import json

    def shortened(value):
        if isinstance(value, str) and len(value) > longest:  # its start and its end (the step tags)
            return value[: longest // 2 - 2] + " … " + value[-(longest // 2 - 1) :]
        if isinstance(value, list):
            return [shortened(item) for item in value]
        if isinstance(value, dict):
            return {key: shortened(item) for key, item in value.items()}
        return value

    labeled = frame.filter(pl.col("first_error") >= 0).head(1)
    parts = []
    for name in FORMATS:
        if not set(FORMATS[name].required) <= set(labeled.columns):  # math-shepherd-soft needs step_mc
            continue
        rows = export_frame(labeled, ExportSettings(format=name))["train"]
        parts.append(f"`{name}`:\n```json\n{json.dumps(shortened(rows.row(0, named=True)), ensure_ascii=False)}\n```")
    return "\n".join(parts)
