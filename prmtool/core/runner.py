"""The shard runners: what every stage's `run` hands its per-frame core to.

- `run_map_stage`, for stages that map each input shard to one output shard (generate, verify,
  label, score, intervene): the stage supplies a pure `transform(frame) -> frame` (rows in,
  rows out); this module does the rest once for all of them: validation of every input before
  any work, resume, atomic writes, provenance, the manifest, and the guarantee that no input
  row or column is lost.
- `whole_output`, for stages whose output depends on all their input at once (import and
  export re-shard it, filter decides whole groups): the lock and the resume decision around
  the stage's own writing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

from prmtool.core import outputs, shards
from prmtool.core.errors import InputError, StageError
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Tracker
from prmtool.core.schema import cast_to_contract, check_columns


@dataclass
class MapStage:
    name: str
    transform: Callable[[pl.DataFrame, Tracker], pl.DataFrame]  # advances the tracker by input rows
    arguments: dict  # every option that changes the output: goes into provenance and resume checks
    required: tuple[str, ...]
    unique_column: str | None = "response_id"
    rows_per_input: int | None = 1  # generate writes n rows per problem
    # None: any number of rows (intervene writes one per kept intervention); the stage's
    # side_output then writes every input row the main output does not account for.
    extra_checks: list[Callable[[shards.InputShard], None]] = field(default_factory=list)
    # Writes a second, per-shard output (label's OmegaPRM tree) from the input frame. It runs
    # before the main shard is written, so a finished main shard implies a finished side one.
    side_output: Callable[[shards.InputShard, pl.DataFrame, Tracker], None] | None = None
    # The directories side_output writes, by option (`--tree-output`, `--rejects`): checked
    # against the inputs and -o, and locked, as -o is.
    side_directories: dict[str, Path | None] = field(default_factory=dict)


def validate_inputs(stage: MapStage, inputs: list[str] | tuple[str, ...], output: Path) -> list[shards.InputShard]:
    """Every check that can fail on input runs here, before any output is written."""
    found = shards.open_inputs(inputs)
    for shard in found:
        check_columns(shard.schema, str(shard.path), stage.required)
        for check in stage.extra_checks:
            check(shard)
    if stage.unique_column:
        shards.check_unique_ids(found, stage.unique_column)
    shards.check_output_dir(output, found, inputs, stage.side_directories)
    shards.check_distinct_names(found)
    return found


def run_map_stage(
    stage: MapStage,
    inputs: list[str] | tuple[str, ...],
    output: Path,
    overwrite: bool,
    stats: RunStats,
    partition: Partition = shards.WHOLE,
) -> None:
    """Run `stage` over its inputs, or over one partition of them (`--shard-index`): every
    input is validated either way, so all partitions agree on what the run is."""
    found = validate_inputs(stage, inputs, output)
    directories = [output, *(d for d in stage.side_directories.values() if d is not None)]
    described = [s.describe() for s in found]
    key = outputs.run_key(stage.name, stage.arguments, described, partition.count)
    sides = {f"{stage.name}{option.removeprefix('-')}": d for option, d in stage.side_directories.items() if d}
    with outputs.output_lock(directories, key, slot=partition.label):
        # A rerun of a complete run only reads (its shards are all skipped): it writes no
        # journal or manifest, so it runs where the folder is read-only too.
        complete = not overwrite and all(
            shards.prepare_whole_output(directory, name, stage.arguments, described, False, partition)
            for name, directory in [(stage.name, output), *sides.items()]
        )
        mine = [s.name for s in partition.take_shards(found)]
        for side, directory in sides.items() if not complete else ():
            shards.claim_output(directory, side, stage.arguments, described, partition, mine, overwrite)
        _run_locked(stage, found, output, overwrite, stats, partition, complete)
        for side, directory in sides.items() if not complete else ():
            # a manifest like -o's: a later stage or `make` sees it complete
            listing = _listing(directory, found, partition)
            shards.write_manifest(directory, side, stage.arguments, described, listing, partition)


def _listing(directory: Path, found: list[shards.InputShard], partition: Partition) -> dict[str, int]:
    import pyarrow.parquet as pq

    names = [s.name for s in partition.take_shards(found) if (directory / s.name).exists()]
    return {name: pq.ParquetFile(directory / name).metadata.num_rows for name in names}


def _run_locked(
    stage: MapStage,
    found: list[shards.InputShard],
    output: Path,
    overwrite: bool,
    stats: RunStats,
    partition: Partition,
    complete: bool = False,
) -> None:
    mine = partition.take_shards(found)
    plan = _plan(stage, mine, output, overwrite)
    described = [s.describe() for s in found]
    # With --overwrite, the earlier runs' listed files go (a re-import into fewer shards
    # leaves none of its old ones to be read beside the new); without it, a folder holding
    # another run, or other partitions that ran with other options, is refused.
    names = [s.name for s in mine]
    if not complete:
        shards.claim_output(output, stage.name, stage.arguments, described, partition, names, overwrite)
    if not partition.whole:
        stats.log(f"partition {partition.index} of {partition.count}: {len(mine)} of {len(found)} input shards")

    written: dict[str, int] = {}
    with stats.progress(stage.name, total=sum(s.rows for s in mine)) as tracker:
        for shard, todo in plan:
            target = output / shard.name
            stats.rows_in += shard.rows
            if not todo:
                stats.shards_skipped += 1
                done = pl.read_parquet(target, columns=["problem_id"])["problem_id"]  # its rows, not the input's
                written[shard.name] = done.len()
                stats.rows_out += done.len()
                stats.problem_ids.update(done.to_list())
                tracker.skip(shard.rows)
                continue
            frame = shards.read_shard(shard)
            result = cast_to_contract(stage.transform(frame, tracker))
            _check_nothing_lost(frame, result, shard, stage.rows_per_input)
            if stage.side_output is not None:
                stage.side_output(shard, frame, tracker)
            shards.write_shard(result, target, shards.provenance(stage.name, stage.arguments, shard))
            written[shard.name] = result.height
            stats.rows_out += result.height
            stats.shards_written += 1
            stats.problem_ids.update(result["problem_id"].to_list())
    if not complete:
        shards.write_manifest(output, stage.name, stage.arguments, described, written, partition)
    if partition.whole:  # a partition's directory also holds the other partitions' shards
        _warn_stale(output, set(written), stats)


def _plan(
    stage: MapStage, found: list[shards.InputShard], output: Path, overwrite: bool
) -> list[tuple[shards.InputShard, bool]]:
    """Which shards need work. A finished shard from the same command on the same input is
    kept (resume); one from a different command or input is refused without --overwrite."""
    plan = []
    for shard in found:
        target = output / shard.name
        if overwrite or not target.exists():
            plan.append((shard, True))
            continue
        expected = shards.provenance(stage.name, stage.arguments, shard)
        if shards.read_provenance(target) != expected:
            raise InputError(
                f"{target}: exists from a different run (other stage, options or input); "
                "pass --overwrite to recompute it"
            )
        plan.append((shard, False))
    return plan


def _check_nothing_lost(
    before: pl.DataFrame, after: pl.DataFrame, shard: shards.InputShard, rows_per_input: int | None
) -> None:
    if rows_per_input is not None and after.height != before.height * rows_per_input:
        raise StageError(f"{shard.path}: internal error: {before.height} rows in, {after.height} out")
    missing = [c for c in before.columns if c not in after.columns]
    if missing:
        raise StageError(f"{shard.path}: internal error: columns lost: {', '.join(missing)}")


def _warn_stale(output: Path, written: set[str], stats: RunStats) -> None:
    stale = sorted(
        f.name for f in output.glob("*.parquet") if not f.name.startswith((".", "_")) and f.name not in written
    )
    if stale:
        stats.warn(f"{output} also holds shards this run did not write: {', '.join(stale[:5])}")


@contextmanager
def whole_output(
    stage: str,
    output: Path,
    arguments: dict,
    sources: list[dict],
    overwrite: bool,
    partition: Partition,
    stats: RunStats,
    names: list[str],
    beside: list[Path] = (),
):
    """Lock `output` for this run and yield whether there is work to do: an output already
    complete for the same stage, arguments and sources is kept (resume) and said so; else the
    folder is made ready for the files `names` (relative paths) the run may write
    (`shards.prepare_whole_output`)."""
    with outputs.output_lock([output], outputs.run_key(stage, arguments, sources, partition.count), partition.label):
        if shards.prepare_whole_output(output, stage, arguments, sources, overwrite, partition, names, beside):
            scope = "" if partition.whole else f"partition {partition.index} of {partition.count}: "
            stats.log(f"{scope}{output} is already complete for these inputs and options; --overwrite recomputes it")
            yield False
        else:
            yield True
