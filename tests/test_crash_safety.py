"""Crash safety: a stage killed at any moment is finished by running the same command again.

Every kill here is real: the stage runs in a process of its own (a small launcher that calls
`prmtool.cli.main`) and is killed with SIGKILL, so none of prmtool's cleanup code runs. The
kill points:

- at a rename: the launcher replaces `os.replace` (the rename that puts a finished shard, or
  the `_SUCCESS` manifest, under its final name) with one that kills the process just before,
  or just after, its N-th call; or just before it with the temporary file cut to half, as if
  the process died while writing it;
- at a random moment: a timer in the process kills it after a seeded random delay, spread
  over the time the uninterrupted run took (its whole run, or the part where it wrote files).

After each kill, nothing partial is visible: every file under a shard's final name is whole
(it holds the same rows as the uninterrupted run's shard of that name), and `_SUCCESS` is
there only if the run got that far. Running the same command again, without --overwrite,
finishes the job. Its output equals the uninterrupted run's, file for file and row for row
(only the `finished` time in `_SUCCESS` differs). `verify` (a map stage: one output shard per
input shard) leaves the shards finished before the kill untouched. `import`, `filter` and
`export` write their whole output in one go, so the rerun recomputes it.

Ctrl-C (SIGINT) stops a run with exit code 130 and a message saying how to resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from prmtool.cli import main
from prmtool.core import outputs, shards
from tests.conftest import ROOT, SAMPLES

RESPONSES_JSONL = SAMPLES / "responses.jsonl"  # 48 responses to 12 problems
STAGES = ("import", "verify", "filter", "export")
OUTPUT_DIRS = {  # each stage's output directories, in the order their manifests are written
    "import": ("out",),
    "verify": ("out",),
    "filter": ("rejected", "kept"),
    "export": ("out",),
}
RESUME_HINT = "rerun the same command to resume"

# `python -c RUN_PRMTOOL MOMENT SIGNAL ARGS...` runs `prmtool.cli.main(ARGS)` in this process
# and sends the process SIGNAL at MOMENT; stderr ends with when main() renamed files and how
# long it ran. MOMENT is `before:N` or `after:N` (just before or just after the N-th
# `os.replace`: the rename that puts a finished shard, or `_SUCCESS`, under its final name),
# `writing:N` (as `before:N`, with the temporary file cut to half its size, as if the process
# died while writing it), `at:SECONDS` (after main() starts) or `never`.
RUN_PRMTOOL = """
import os, signal, sys, threading, time

moment, signal_name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
when, _, value = moment.partition(":")

def die():
    os.kill(os.getpid(), signal.Signals[signal_name])

number = int(value) if when in ("before", "writing", "after") else None
real_replace, renamed_at, counting = os.replace, [], threading.Lock()

def replace(source, target, *rest, **options):
    with counting:  # a stage may write shards from several threads
        renamed_at.append(time.perf_counter() - started)
        this_one = len(renamed_at)
    if when == "writing" and this_one == number:
        os.truncate(source, os.path.getsize(source) // 2)
    if when in ("before", "writing") and this_one == number:
        die()
    real_replace(source, target, *rest, **options)
    if when == "after" and this_one == number:
        die()

os.replace = replace

from prmtool.cli import main

started = time.perf_counter()
if when == "at":
    timer = threading.Timer(float(value), die)
    timer.daemon = True  # a run that ends first exits
    timer.start()
code = main(args)
print("renames at", *(f"{t:.3f}" for t in renamed_at), "s", file=sys.stderr)
print(f"main() ran for {time.perf_counter() - started:.3f} s", file=sys.stderr)
sys.exit(code)
"""

TEMPORARY = re.compile(r"^\.(?P<final>.+)\.tmp-\d+$")  # the names write_shard and write_json_atomic write first


# --- running a stage as a process -------------------------------------------------------------


@dataclass
class Finished:
    returncode: int  # negative: killed by that signal
    stderr: str

    @property
    def main_seconds(self) -> float:
        return float(re.search(r"^main\(\) ran for ([\d.]+) s$", self.stderr, re.MULTILINE)[1])

    @property
    def renamed_at(self) -> list[float]:
        """When main() renamed each file into place, in seconds from its start."""
        return [float(t) for t in re.search(r"^renames at(.*) s$", self.stderr, re.MULTILINE)[1].split()]


def start_stage(command: list[str], log: Path, moment: str = "never", signal_name: str = "SIGKILL") -> subprocess.Popen:
    """`prmtool COMMAND` in a process of its own, started from the repository root, in a
    process group of its own (with its verify workers), stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_PRMTOOL, moment, signal_name, *command],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def finish_stage(process: subprocess.Popen, log: Path) -> Finished:
    """Wait for the stage to end; then end whatever is left of its process group (orphaned
    verify workers)."""
    try:
        process.wait(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return Finished(process.returncode, log.read_text())


def run_stage(command: list[str], log: Path, moment: str = "never", signal_name: str = "SIGKILL") -> Finished:
    return finish_stage(start_stage(command, log, moment, signal_name), log)


def rerun(command: list[str], capsys) -> str:
    """The same command again, as the user types it after the crash; returns its stderr."""
    capsys.readouterr()
    code = main(command)
    stderr = capsys.readouterr().err
    assert code == 0, f"the rerun failed with exit code {code}:\n{stderr}"
    return stderr


# --- the uninterrupted runs every killed one is compared with -----------------------------------


@dataclass
class Pipeline:
    """import -> verify -> filter and export, each run once without interruption. A killed run
    reads the same inputs as its reference run, so their outputs must be identical."""

    references: dict[str, Path]  # stage -> the directory its uninterrupted run wrote into
    seconds: dict[str, float]  # stage -> how long that run's main() took
    writing: dict[str, tuple[float, float]]  # stage -> when that run's main() renamed its first and last file

    def command(self, stage: str, run: Path) -> list[str]:
        """The stage's command, writing under `run`."""
        if stage == "import":
            command = ["import", RESPONSES_JSONL, "--shard-rows", "6", "-o", run / "out"]  # 8 shards
        elif stage == "verify":
            command = ["verify", self.references["import"] / "out", "-o", run / "out", "--workers", "1"]
        elif stage == "filter":
            command = [
                "filter",
                self.references["verify"] / "out",
                "-o",
                run / "kept",
                "--rejects",
                run / "rejected",
                "--method",
                "accuracy-band",
                "--where",
                "verify_status = 'ok'",
            ]
        else:
            command = [
                "export",
                self.references["verify"] / "out",
                "-o",
                run / "out",
                "--format",
                "sft-messages",
                "--split",
                "test=0.25",
            ]
        return [str(part) for part in command]

    def renames(self, stage: str) -> int:
        """How many renames a run of the stage makes: one per output file, and per output
        directory its journal (before its first shard) and its manifest."""
        return sum(len(shard_files(self.references[stage] / d)) + 2 for d in OUTPUT_DIRS[stage])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("uninterrupted")
    made = Pipeline(references={}, seconds={}, writing={})
    for stage in STAGES:
        run = root / stage
        made.references[stage] = run
        finished = run_stage(made.command(stage, run), run / "stderr.txt")
        assert finished.returncode == 0, finished.stderr
        made.seconds[stage] = finished.main_seconds
        made.writing[stage] = (finished.renamed_at[0], finished.renamed_at[-1])
    assert len(shard_files(made.references["import"] / "out")) == 8
    rejected = shard_files(made.references["filter"] / "rejected").values()
    assert sum(pl.read_parquet(p).height for p in rejected) > 0, "the filter removes some rows"
    assert {name.split("/")[0] for name in shard_files(made.references["export"] / "out")} == {"train", "test"}
    return made


# --- what a directory holds ----------------------------------------------------------------------


def shard_files(directory: Path) -> dict[str, Path]:
    """The files a reader takes as shards (what the next stage reads), by relative path."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p
        for p in sorted(directory.rglob("*.parquet"))
        if not p.name.startswith((".", "_"))
    }


def leftover_temporaries(directory: Path) -> list[Path]:
    """Hidden files other than the output locks, which stay (an flock goes with its process)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.rglob(".*") if p.is_file() and not p.name.startswith(outputs.LOCK))


def manifest_without_time(directory: Path) -> dict:
    manifest = json.loads((directory / shards.MANIFEST).read_text())
    manifest.pop("finished")
    return manifest


def marked_complete(stage: str, run: Path) -> bool:
    return all((run / d / shards.MANIFEST).exists() for d in OUTPUT_DIRS[stage])


def identities(stage: str, run: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of each shard in place: rewriting a shard changes both."""
    found = {}
    for d in OUTPUT_DIRS[stage]:
        for name, path in shard_files(run / d).items():
            status = path.stat()
            found[f"{d}/{name}"] = (status.st_ino, status.st_mtime_ns)
    return found


# --- the checks ------------------------------------------------------------------------------------


def assert_same_shard(path: Path, reference: Path) -> None:
    """Whole and identical: readable to the end, the same rows and columns in the same order,
    and the same provenance."""
    rows = pq.ParquetFile(path).metadata.num_rows
    expected = pl.read_parquet(reference)
    assert rows == expected.height, f"{path}: {rows} rows, the uninterrupted run wrote {expected.height}"
    assert pl.read_parquet(path).equals(expected), f"{path} differs from {reference}"
    assert shards.read_provenance(path) == shards.read_provenance(reference)


def assert_nothing_partial_is_visible(stage: str, run: Path, pipeline: Pipeline) -> None:
    """What a kill may leave: whole shards under their final names, hidden temporaries, and a
    manifest only beside a complete set of shards."""
    for d in OUTPUT_DIRS[stage]:
        output, reference = run / d, pipeline.references[stage] / d
        visible, expected = shard_files(output), shard_files(reference)
        assert set(visible) <= set(expected), f"unexpected shards in {output}: {sorted(set(visible) - set(expected))}"
        for name, path in visible.items():
            assert_same_shard(path, expected[name])
        for leftover in leftover_temporaries(output):
            match = TEMPORARY.match(leftover.name)
            assert match and match["final"] in {Path(n).name for n in expected} | {shards.MANIFEST, shards.JOURNAL}, (
                leftover
            )
        others = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file() and not p.name.startswith(".")}
        assert others - set(visible) <= {shards.MANIFEST, shards.JOURNAL}, (
            f"unexpected files in {output}: {sorted(others - set(visible))}"
        )
        if (output / shards.MANIFEST).exists():
            assert set(visible) == set(expected), f"{output}: _SUCCESS is there but shards are missing"
            assert manifest_without_time(output) == manifest_without_time(reference)


def assert_same_output_as_uninterrupted(stage: str, run: Path, pipeline: Pipeline) -> None:
    for d in OUTPUT_DIRS[stage]:
        output, reference = run / d, pipeline.references[stage] / d
        visible, expected = shard_files(output), shard_files(reference)
        assert sorted(visible) == sorted(expected)
        for name in expected:
            assert_same_shard(visible[name], expected[name])
        assert manifest_without_time(output) == manifest_without_time(reference)
        # Temporaries a kill left behind are not shards: the next stage does not read them.
        for directory in {p.parent for p in visible.values()}:
            read_by_next_stage = sorted(s.name for s in shards.open_inputs([str(directory)]))
            assert read_by_next_stage == sorted(p.name for p in visible.values() if p.parent == directory)


def resume_and_check(stage: str, run: Path, pipeline: Pipeline, capsys) -> None:
    """After a kill: nothing partial is visible; the same command finishes the job, and (in a
    map stage) rewrites no shard that was already in place."""
    assert_nothing_partial_is_visible(stage, run, pipeline)
    in_place = identities(stage, run)
    rerun(pipeline.command(stage, run), capsys)
    assert_same_output_as_uninterrupted(stage, run, pipeline)
    if stage == "verify":
        after = identities(stage, run)
        redone = sorted(name for name, identity in in_place.items() if after[name] != identity)
        assert not redone, f"the rerun rewrote shards finished before the kill: {redone}"


# --- the kill points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL at a rename (just `before` it, `writing` its file or just `after` it; a positive
    number counts the shards' renames, after the journals'; a negative number counts from the
    end, -1 being the last manifest's), or at a `fraction` of a span of
    the uninterrupted run: its main() from start to end (`of_span="run"`), or the time it
    spent writing, from its first rename to its last (`of_span="writing"`)."""

    stage: str
    rename: int | None = None
    moment: str | None = None
    fraction: float | None = None
    of_span: str | None = None

    @property
    def id(self) -> str:
        if self.fraction is not None:
            return f"{self.stage}-at-{self.fraction:.0%}-of-{self.of_span}"
        return f"{self.stage}-{self.moment}-rename-{self.rename}"

    def delay(self, pipeline: Pipeline) -> float:
        start, end = (0.0, pipeline.seconds[self.stage]) if self.of_span == "run" else pipeline.writing[self.stage]
        return start + self.fraction * (end - start)

    def rename_number(self, pipeline: Pipeline) -> int:
        # A positive number counts shards: the output directories' journals are renamed first.
        first_shard = len(OUTPUT_DIRS[self.stage]) + 1
        return self.rename + first_shard - 1 if self.rename > 0 else pipeline.renames(self.stage) + 1 + self.rename

    def kill(self, pipeline: Pipeline, run: Path) -> Finished:
        command, log = pipeline.command(self.stage, run), run / "stderr.txt"
        if self.fraction is not None:
            return run_stage(command, log, f"at:{self.delay(pipeline):.3f}")
        return run_stage(command, log, f"{self.moment}:{self.rename_number(pipeline)}")


KILLS_AT_RENAMES = [
    KillPoint("import", 1, "before"),  # the first shard written under its temporary name
    KillPoint("import", 2, "writing"),  # one shard in place, the second half written
    KillPoint("import", 4, "after"),  # four shards in place
    KillPoint("import", -1, "before"),  # every shard in place, no _SUCCESS yet
    KillPoint("verify", 1, "before"),
    KillPoint("verify", 1, "after"),
    KillPoint("verify", 4, "writing"),
    KillPoint("verify", 5, "after"),
    KillPoint("verify", -2, "after"),  # the last shard in place
    KillPoint("verify", -1, "before"),  # _SUCCESS written but not renamed
    KillPoint("verify", -1, "after"),  # complete, killed on its way out
    KillPoint("filter", 1, "before"),  # filter writes each input shard's rejected and kept rows
    KillPoint("filter", 2, "after"),
    KillPoint("filter", 9, "writing"),
    KillPoint("filter", -2, "after"),  # --rejects complete, -o not yet
    KillPoint("filter", -1, "before"),
    KillPoint("export", 1, "before"),
    KillPoint("export", 2, "writing"),
    KillPoint("export", 4, "after"),
    KillPoint("export", -1, "before"),
]


def random_moments(count: int, seed: int) -> list[float]:
    """`count` fractions of a span, one drawn at random in each of `count` equal slices of it."""
    rng = random.Random(seed)
    return [round((i + rng.random()) / count, 3) for i in range(count)]


KILLS_AT_RANDOM_MOMENTS = [
    *(KillPoint("verify", fraction=f, of_span="run") for f in random_moments(1, seed=0)),
    *(KillPoint("filter", fraction=f, of_span="run") for f in random_moments(1, seed=1)),
    *(KillPoint("export", fraction=f, of_span="run") for f in random_moments(1, seed=2)),
    *(KillPoint("import", fraction=f, of_span="writing") for f in random_moments(1, seed=3)),
    *(KillPoint("verify", fraction=f, of_span="writing") for f in random_moments(2, seed=4)),
]


def test_the_kill_points_cover_three_stages_and_every_side_of_a_rename():
    points = KILLS_AT_RENAMES + KILLS_AT_RANDOM_MOMENTS
    assert len(points) >= 20
    assert len({p.stage for p in points}) >= 3
    assert {p.moment for p in KILLS_AT_RENAMES} == {"before", "writing", "after"}


@pytest.fixture(scope="module")
def killed_runs(pipeline, tmp_path_factory):
    """Every kill point's run, killed. They start up front, two at a time (the machine has two
    cores), so that the tests' checks and reruns overlap the kills still to come."""
    root = tmp_path_factory.mktemp("killed")
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs: dict[KillPoint, tuple[Path, Future]] = {}
        for point in KILLS_AT_RENAMES + KILLS_AT_RANDOM_MOMENTS:
            run = root / point.id
            runs[point] = (run, pool.submit(point.kill, pipeline, run))
        yield {point: (run, future) for point, (run, future) in runs.items()}


# --- SIGKILL -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", KILLS_AT_RENAMES, ids=lambda p: p.id)
def test_a_stage_killed_at_a_rename_resumes_to_the_uninterrupted_output(pipeline, killed_runs, capsys, point):
    run, future = killed_runs[point]
    killed = future.result()
    number, total = point.rename_number(pipeline), pipeline.renames(point.stage)

    assert killed.returncode == -signal.SIGKILL, f"not killed at rename {number} of {total}:\n{killed.stderr}"
    assert marked_complete(point.stage, run) == (number == total and point.moment == "after")
    resume_and_check(point.stage, run, pipeline, capsys)


@pytest.mark.parametrize("point", KILLS_AT_RANDOM_MOMENTS, ids=lambda p: p.id)
def test_a_stage_killed_at_a_random_moment_resumes_to_the_uninterrupted_output(pipeline, killed_runs, capsys, point):
    run, future = killed_runs[point]
    killed = future.result()

    # A kill late in the last slice may come after the run ended: then there is nothing to resume.
    assert killed.returncode in (-signal.SIGKILL, 0), killed.stderr
    resume_and_check(point.stage, run, pipeline, capsys)


# --- Ctrl-C ----------------------------------------------------------------------------------------------


def test_ctrl_c_stops_a_run_cleanly_and_says_how_to_resume(pipeline, tmp_path, capsys):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the stage and
    its verify workers. Here it comes once the first shard is in place."""
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    process = start_stage(pipeline.command("verify", run), log)
    while not shard_files(run / "out") and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    interrupted = finish_stage(process, log)

    assert interrupted.returncode == 130, interrupted.stderr
    assert RESUME_HINT in interrupted.stderr
    assert "Traceback" not in interrupted.stderr, interrupted.stderr
    assert not marked_complete("verify", run)
    resume_and_check("verify", run, pipeline, capsys)


@pytest.mark.parametrize("moment", ["before", "after"])
def test_ctrl_c_at_a_rename_stops_cleanly(pipeline, tmp_path, capsys, moment):
    run = tmp_path / "run"

    third_shard = KillPoint("verify", 3).rename_number(pipeline)  # after the journal's rename
    interrupted = run_stage(
        pipeline.command("verify", run), tmp_path / "stderr.txt", f"{moment}:{third_shard}", "SIGINT"
    )

    assert interrupted.returncode == 130, interrupted.stderr
    assert RESUME_HINT in interrupted.stderr
    assert "Traceback" not in interrupted.stderr, interrupted.stderr
    assert len(shard_files(run / "out")) == (2 if moment == "before" else 3)
    assert leftover_temporaries(run / "out") == [], "an interrupted run removes its temporary file"
    resume_and_check("verify", run, pipeline, capsys)
