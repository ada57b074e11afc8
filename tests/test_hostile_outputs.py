"""Hostile outputs: a command deletes or replaces only files it wrote itself, and a stage reads
only what a run completed.

- A run journals the files it may write before its first one (`_JOURNAL`); its `_SUCCESS`
  then lists each file with its size and hash. `--overwrite` removes the earlier runs' listed
  files, still as written, and nothing else: never a subfolder, never a file no run listed.
- A stage reads a folder with `_SUCCESS` exactly as it lists it, and refuses a folder a
  prmtool run left without one (killed, still running, partitions missing or mixed) unless
  --allow-incomplete.
- Partitions refuse to join a folder whose other partitions ran with other settings.
- `prmtool run` holds one lock on its workdir; one command writes one output slot at a time.
- Every file is written into a new hidden file and renamed into place: a symbolic link, a FIFO
  or a device where a file goes is refused, never replaced or written through.

Two runs at once are real processes started together. Every refusal is exit 2 with one line
that names the path at fault, and every input and every other run's file keeps its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from prmtool.core import outputs, shards
from tests.conftest import ROOT, SAMPLES

RESPONSES_JSONL = SAMPLES / "responses.jsonl"  # 48 responses to 12 problems


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) by the hash of its bytes, links by their
    target; less the empty lock files a command leaves in a directory it may write."""
    if path.is_symlink() or path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith(outputs.LOCK)
        )
    return {
        str(f): f"-> {os.readlink(f)}" if f.is_symlink() else hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    }


def one_line_error(result, *named: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name in named:
        assert str(name) in result.stderr, f"{name!r} not in {result.stderr!r}"
    return lines[0]


def listed_rows(directory: Path) -> int:
    return sum(entry["rows"] for entry in shards.read_manifest(directory)["outputs"])


@pytest.fixture
def imported(prmtool, tmp_path) -> Path:
    """The sample's 48 responses imported into 4 shards (a complete prmtool output)."""
    out = tmp_path / "imported"
    assert prmtool("import", RESPONSES_JSONL, "-o", out, "--shard-rows", "12", "-q").exit_code == 0
    return out


@pytest.fixture
def verified(prmtool, imported, tmp_path) -> Path:
    out = tmp_path / "verified"
    assert prmtool("verify", imported, "-o", out, "--workers", "1", "-q").exit_code == 0
    return out


# --- 1. two runs at once -----------------------------------------------------------------------

RECIPE = """\
workdir: {workdir}
input: {input}
stages:
  - stage: import
    shard-rows: 2
  - stage: verify
    workers: 1
  - stage: export
    format: sft-messages
"""


def start(*args: str | Path) -> subprocess.Popen:
    """`python -m prmtool ARGS` in a process of its own, from the repository root."""
    return subprocess.Popen(
        [sys.executable, "-m", "prmtool", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


@pytest.mark.parametrize("trial", range(2))
def test_two_runs_of_one_recipe_and_workdir_at_once_give_the_whole_output_or_a_refusal(tmp_path, trial):
    workdir = tmp_path / "work"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(workdir=workdir, input=RESPONSES_JSONL))
    first, second = start("run", recipe, "-q"), start("run", recipe, "-q")
    ended = [finish(first), finish(second)]
    assert 0 in [code for code, _ in ended], ended
    for code, stderr in ended:
        if code:  # refused at once: one line naming the workdir, nothing touched
            assert code == 2, stderr
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and str(workdir) in lines[0] and "another `prmtool run`" in lines[0], stderr
    imported, verified, exported = (workdir / name for name in ("01-import", "02-verify", "03-export"))
    assert len(shards.read_manifest(verified)["outputs"]) == 24, "verify's _SUCCESS lists every shard"
    assert listed_rows(imported) == listed_rows(verified) == listed_rows(exported) == 48
    assert pl.read_parquet(exported / "train" / "*.parquet").height == 48
    code, stderr = finish(start("run", recipe))
    assert code == 0 and stderr.count(" skip ") == 3, stderr


def test_a_second_run_while_one_holds_the_workdir_fails_at_once_touching_nothing(prmtool, tmp_path):
    workdir = tmp_path / "work"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(workdir=workdir, input=RESPONSES_JSONL))
    assert prmtool("run", recipe, "-q", "--until", "import").exit_code == 0
    before = snapshot(workdir)
    with outputs.exclusive_lock(workdir, "`prmtool run`"):  # as a run in another process holds it
        one_line_error(prmtool("run", recipe, "-q"), str(workdir), "another `prmtool run`")
    assert snapshot(workdir) == before
    assert prmtool("run", recipe, "--dry-run").exit_code == 0  # a plan needs no lock


@pytest.mark.parametrize("trial", range(2))
def test_the_same_stage_command_twice_at_once_never_leaves_a_short_output(tmp_path, trial):
    out = tmp_path / "out"
    command = ["import", RESPONSES_JSONL, "-o", out, "--shard-rows", "2", "-q"]
    ended = [finish(process) for process in [start(*command), start(*command)]]
    assert 0 in [code for code, _ in ended], ended
    for code, stderr in ended:
        if code:
            assert code == 2 and len(stderr.strip().splitlines()) == 1 and str(out) in stderr, stderr
            assert "already writing here" in stderr or "another prmtool run" in stderr, stderr
    assert len(shards.read_manifest(out)["outputs"]) == 24
    assert pl.read_parquet(out / "*.parquet").height == 48


def test_a_stage_reading_a_folder_another_process_is_writing_refuses_it(prmtool, imported, tmp_path):
    out = tmp_path / "verified"
    assert prmtool("verify", imported, "-o", out, "--workers", "1", "-q").exit_code == 0
    # the state a writer in another process leaves mid-run: its journal, some shards, no _SUCCESS
    (out / shards.MANIFEST).unlink()
    shards.write_json_atomic({"stage": "verify", "files": ["part-00000.parquet"]}, out / shards.JOURNAL)
    one_line_error(prmtool("stats", out), str(out), "_SUCCESS", "--allow-incomplete")


# --- 2. --overwrite removes the previous run's listed files, and nothing else --------------------


@pytest.mark.parametrize(
    "command",
    [
        ["import", RESPONSES_JSONL, "-o", "W", "--shard-rows", "12"],
        ["export", "VERIFIED", "-o", "W", "--format", "sft-messages"],
        ["filter", "VERIFIED", "-o", "W", "--rejects", "REJECTS", "--method", "accuracy-band"],
        ["verify", "IMPORTED", "-o", "W", "--workers", "1"],
    ],
    ids=lambda command: command[0],
)
def test_overwrite_leaves_another_runs_subfolder_intact(prmtool, imported, verified, tmp_path, command):
    work = tmp_path / "W"
    assert prmtool("verify", imported, "-o", work / "verified", "--workers", "1", "-q").exit_code == 0
    kept = snapshot(work / "verified")
    names = {"W": work, "VERIFIED": verified, "IMPORTED": imported, "REJECTS": tmp_path / "rejects"}
    argv = [names.get(str(a), a) for a in command]
    assert prmtool(*argv, "-q", "--overwrite").exit_code == 0
    assert prmtool(*argv, "-q", "--overwrite").exit_code == 0  # twice: the second removes the first's files
    assert snapshot(work / "verified") == kept
    assert prmtool("stats", work / "verified").exit_code == 0


def test_export_never_writes_into_a_split_folder_that_is_another_runs_output(prmtool, imported, verified, tmp_path):
    """OUTPUT/train of an export is where a verify run wrote (its own -o): its shards carry
    prmtool's provenance, but they are that run's, on a resume or with --overwrite."""
    work = tmp_path / "W"
    export = ["export", verified, "-o", work, "--format", "sft-messages"]
    assert prmtool(*export, "-q").exit_code == 0
    # the export as if killed after its journal: the journal its run wrote first, no shards yet
    record = shards.read_manifest(work)
    journal = {key: record[key] for key in ("stage", "arguments", "inputs")}
    journal.update(partitions=1, files=[entry["file"] for entry in record["outputs"]])
    shards.write_json_atomic(journal, work / shards.JOURNAL)
    (work / shards.MANIFEST).unlink()
    shutil.rmtree(work / "train")
    assert prmtool("verify", imported, "-o", work / "train", "--workers", "1", "-q").exit_code == 0
    kept = snapshot(work / "train")
    one_line_error(prmtool(*export), str(work / "train"), "another run's output")
    one_line_error(prmtool(*export, "--overwrite"), str(work / "train"), "another run's output")
    assert snapshot(work / "train") == kept
    assert prmtool("stats", work / "train").exit_code == 0


def test_overwrite_removes_every_file_the_previous_run_listed(prmtool, tmp_path):
    out = tmp_path / "out"
    assert prmtool("import", RESPONSES_JSONL, "-o", out, "--shard-rows", "5", "-q").exit_code == 0
    assert len(list(out.glob("*.parquet"))) == 10
    assert prmtool("import", RESPONSES_JSONL, "-o", out, "--shard-rows", "24", "-q", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(out.glob("_JOURNAL*")), "the manifest replaces the journal"


def test_overwrite_refuses_a_file_no_run_wrote_at_a_name_it_writes(prmtool, imported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "part-00000.parquet"
    pl.DataFrame({"x": [1, 2]}).write_parquet(theirs)
    before = snapshot(out)
    line = one_line_error(prmtool("verify", imported, "-o", out, "--workers", "1", "--overwrite"), str(theirs))
    assert "no earlier prmtool run here lists it" in line
    assert snapshot(out) == before


def test_a_folder_of_parquet_files_no_run_wrote_is_named_as_such(prmtool, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    pl.DataFrame({"a": [1]}).write_parquet(out / "part-00000.parquet")
    before = snapshot(out)
    line = one_line_error(prmtool("import", RESPONSES_JSONL, "-o", out), str(out), "part-00000.parquet")
    assert "no prmtool run wrote" in line and "--overwrite" not in line
    assert snapshot(out) == before


def test_overwrite_keeps_a_listed_file_that_was_changed_since(prmtool, tmp_path):
    """A file the previous run listed, edited after it (a user's own fix), no longer is that run's file."""
    out = tmp_path / "out"
    assert prmtool("import", RESPONSES_JSONL, "-o", out, "--shard-rows", "12", "-q").exit_code == 0
    edited = out / "part-00003.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(edited)
    before = snapshot(edited)
    assert prmtool("import", RESPONSES_JSONL, "-o", out, "--shard-rows", "24", "-q", "--overwrite").exit_code == 0
    assert snapshot(edited) == before


def test_a_shard_name_that_is_a_symbolic_link_is_never_written_through(prmtool, imported, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").symlink_to(victim)
    for extra in ([], ["--overwrite"]):
        one_line_error(prmtool("verify", imported, "-o", out, "--workers", "1", *extra), "part-00000.parquet")
        one_line_error(prmtool("import", RESPONSES_JSONL, "-o", out, *extra), str(out))
    assert victim.read_text() == "precious" and (out / "part-00000.parquet").is_symlink()


# --- 3. temporary names cannot be inputs ---------------------------------------------------------


def test_export_hf_dataset_never_removes_an_input_named_like_its_temporary(prmtool, verified, tmp_path):
    lookalike = tmp_path / ".ds.tmp"  # the name export's temporary folder had
    shutil.copytree(verified, lookalike)
    before = snapshot(lookalike)
    result = prmtool("export", lookalike, "-o", tmp_path / "out", "--format", "sft-messages", "--hf-dataset",
                     tmp_path / "ds", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert snapshot(lookalike) == before
    assert (tmp_path / "ds" / "dataset_dict.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp-")], "its own temporary is gone"


def test_overwrite_replaces_only_a_datasets_folder_an_export_into_the_same_output_wrote(prmtool, verified, tmp_path):
    export = ["export", verified, "--format", "sft-messages", "--hf-dataset", tmp_path / "ds", "-q"]
    assert prmtool(*export, "-o", tmp_path / "a").exit_code == 0
    before = snapshot(tmp_path / "ds")
    line = one_line_error(prmtool(*export, "-o", tmp_path / "b", "--overwrite"), str(tmp_path / "ds"))
    assert "no earlier export into" in line and snapshot(tmp_path / "ds") == before
    assert prmtool(*export, "-o", tmp_path / "a", "--overwrite", "--holdout", "test=0.25").exit_code == 0
    assert (tmp_path / "ds" / "test").is_dir()


def test_overwrite_never_replaces_a_datasets_folder_changed_since_its_export(prmtool, verified, tmp_path):
    """A note added to the folder, or another export's folder put in its place: no longer what
    the export into this output wrote, so --overwrite refuses it. A plain rerun of the complete
    export does nothing."""
    export = ["export", verified, "--format", "sft-messages", "--hf-dataset", tmp_path / "ds", "-q"]
    assert prmtool(*export, "-o", tmp_path / "a").exit_code == 0
    assert prmtool(*export, "-o", tmp_path / "a").exit_code == 0  # complete: skipped, the folder kept
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "ds")
    one_line_error(prmtool(*export, "-o", tmp_path / "a", "--seed", "1", "--overwrite"), str(tmp_path / "ds"))
    assert snapshot(tmp_path / "ds") == before
    shutil.rmtree(tmp_path / "ds")
    other = [*export, "--holdout", "test=0.25"]
    assert prmtool(*other, "-o", tmp_path / "b").exit_code == 0
    before = snapshot(tmp_path / "ds")
    one_line_error(prmtool(*export, "-o", tmp_path / "a", "--overwrite"), str(tmp_path / "ds"))
    assert snapshot(tmp_path / "ds") == before


def test_an_export_stopped_after_its_datasets_folder_resumes(prmtool, verified, tmp_path, monkeypatch):
    from prmtool.stages import export as export_stage

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill between the datasets folder and the manifest

    out, ds = tmp_path / "out", tmp_path / "ds"
    argv = ["export", verified, "-o", out, "--format", "sft-messages", "--hf-dataset", ds, "-q"]
    with monkeypatch.context() as patch:
        patch.setattr(export_stage.shards, "write_manifest", stop)
        assert prmtool(*argv).exit_code != 0
    assert (ds / "dataset_dict.json").exists() and not (out / shards.MANIFEST).exists()
    result = prmtool(*argv)
    assert result.exit_code == 0, result.stderr
    assert (out / shards.MANIFEST).exists() and (ds / "dataset_dict.json").exists()


def test_an_export_that_meets_a_bad_row_midway_leaves_nothing_and_a_fixed_rerun_runs(prmtool, tmp_path):
    labeled = pl.read_parquet(SAMPLES / "labeled" / "part-00000.parquet")
    folder = tmp_path / "labeled"
    folder.mkdir()
    half = labeled.height // 2
    labeled.head(half).write_parquet(folder / "part-00000.parquet")
    second = labeled.tail(labeled.height - half).with_row_index()
    bad = second.filter(pl.col("steps").list.len() > 1)["index"][0]
    broken = second.with_columns(
        step_labels=pl.when(pl.col("index") == bad).then(pl.lit([1])).otherwise(pl.col("step_labels"))
    ).drop("index")
    broken.write_parquet(folder / "part-00001.parquet")
    out = tmp_path / "out"
    one_line_error(prmtool("export", folder, "-o", out, "--format", "trl-stepwise"), "part-00001.parquet")
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    second.drop("index").write_parquet(folder / "part-00001.parquet")
    assert prmtool("export", folder, "-o", out, "--format", "trl-stepwise", "-q").exit_code == 0


# --- 4. --json, --report, --plot: regular files only ---------------------------------------------


def special_files(tmp_path: Path) -> dict[str, Path]:
    """A symbolic link to a file, a dangling one, a FIFO, and (as root) a device node."""
    target = tmp_path / "target.json"
    target.write_text("{}")
    made = {"link": tmp_path / "link.json", "dangling link": tmp_path / "dangling.json", "fifo": tmp_path / "fifo"}
    made["link"].symlink_to(target)
    made["dangling link"].symlink_to(tmp_path / "nowhere")
    os.mkfifo(made["fifo"])
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made["device"] = tmp_path / "null"
    except (PermissionError, OSError):
        pass
    return made


def kind_of(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return "link" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "char" if stat.S_ISCHR(mode) else "file"


def test_json_and_report_refuse_a_link_a_fifo_or_a_device(prmtool, verified, tmp_path):
    labeled = tmp_path / "labeled"
    labeled.mkdir()
    frame = pl.read_parquet(SAMPLES / "labeled" / "part-00000.parquet")
    frame.with_columns(correct=pl.col("first_error") < 0).write_parquet(labeled / "part-00000.parquet")
    for kind, path in special_files(tmp_path).items():
        before, was = snapshot(path) if kind != "fifo" and kind != "device" else {}, kind_of(path)
        eval_argv = ["eval", labeled, "--truth", "first_error", "--pred", "first_error", "--json", path]
        one_line_error(prmtool(*eval_argv), str(path), "not a regular file")
        filter_argv = ["filter", verified, "-o", tmp_path / f"kept-{kind}", "--rejects", tmp_path / f"rej-{kind}",
                       "--method", "accuracy-band", "--report", path]  # fmt: skip
        one_line_error(prmtool(*filter_argv), str(path), "--report", "not a regular file")
        assert kind_of(path) == was and (snapshot(path) if before else {}) == before, kind
        assert not (tmp_path / f"kept-{kind}").exists(), "refused before anything is written"


def test_json_dash_prints_to_standard_output_and_dev_stdout_is_refused(prmtool, tmp_path):
    labeled = tmp_path / "labeled"
    labeled.mkdir()
    pl.read_parquet(SAMPLES / "labeled" / "part-00000.parquet").write_parquet(labeled / "part-00000.parquet")
    result = prmtool("eval", labeled, "--truth", "first_error", "--pred", "first_error", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["group"] == "all", "stdout holds the JSON alone"
    if Path("/dev/stdout").is_symlink():
        line = one_line_error(
            prmtool("eval", labeled, "--truth", "first_error", "--pred", "first_error", "--json", "/dev/stdout"),
            "/dev/stdout",
        )
        assert "give - to print to standard output" in line


def test_plot_refuses_a_link_or_fifo_where_a_plot_goes(prmtool, verified, tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (plots / "accuracy_per_problem.png").symlink_to(victim)
    one_line_error(prmtool("stats", verified, "--plot", plots), "accuracy_per_problem.png", "symbolic link")
    assert victim.read_bytes() == b"precious" and (plots / "accuracy_per_problem.png").is_symlink()
    (plots / "accuracy_per_problem.png").unlink()
    os.mkfifo(plots / "filter_reasons.png")
    one_line_error(prmtool("stats", verified, "--plot", plots), "filter_reasons.png", "FIFO")
    assert kind_of(plots / "filter_reasons.png") == "fifo"


def test_a_single_file_output_replaces_only_what_an_earlier_run_wrote_there(prmtool, verified, tmp_path):
    """--report, --json, view's -o and --plot's images: a rerun replaces its own file; a file
    that is not one (a script, notes, another tool's JSON) is refused and left as it was."""
    labeled = tmp_path / "labeled"
    labeled.mkdir()
    frame = pl.read_parquet(SAMPLES / "labeled" / "part-00000.parquet")
    frame.with_columns(correct=pl.col("first_error") < 0).write_parquet(labeled / "part-00000.parquet")
    commands = {
        "--report": ["filter", verified, "-o", tmp_path / "kept", "--rejects", tmp_path / "rejects",
                     "--method", "accuracy-band", "--report"],
        "--json": ["eval", labeled, "--truth", "first_error", "--pred", "first_error", "--json"],
        "-o": ["view", labeled, "-o"],
    }  # fmt: skip
    for option, argv in commands.items():
        theirs = tmp_path / f"theirs{option}.json"
        theirs.write_text('{"learning_rate": 0.0001}\n')
        one_line_error(prmtool(*argv, theirs), str(theirs), option, "is not", "move it away or give another path")
        assert theirs.read_text() == '{"learning_rate": 0.0001}\n'
        ours = tmp_path / f"ours{option}"
        for run in ("first", "rerun"):
            result = prmtool(*argv, ours)
            assert result.exit_code == 0, (option, run, result.stderr)
    plots = tmp_path / "plots"
    assert prmtool("stats", verified, "--plot", plots).exit_code == 0
    assert prmtool("stats", verified, "--plot", plots).exit_code == 0, "its own images are replaced"
    (plots / "mc_values.png").write_text("notes, not an image")
    one_line_error(prmtool("stats", verified, "--plot", plots), "mc_values.png", "not a PNG image")
    assert (plots / "mc_values.png").read_text() == "notes, not an image"


def on_a_read_only_mount(folder: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """`python -m prmtool ARGS` with `folder` mounted read-only (a user and mount namespace of
    its own: no privileges needed where the kernel allows them)."""
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    command = ["unshare", "-rm", "sh", "-c", mount, str(folder), sys.executable, "-m", "prmtool", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_complete_output_on_a_read_only_mount_is_skipped_and_anything_else_is_refused(prmtool, imported, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"workdir: {work}\ninput: {imported}\nstages:\n  - stage: verify\n    workers: 1\n"
        f"  - stage: filter\n    method: none\n    rejects: {work / 'rejects'}\n"
    )
    assert prmtool("run", recipe).exit_code == 0
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unprivileged mount namespaces here")
    before = snapshot(work)
    again = on_a_read_only_mount(work, "run", recipe)
    assert again.returncode == 0 and again.stderr.count("skip") == 2, again.stderr
    verify = on_a_read_only_mount(work, "verify", imported, "-o", work / "01-verify", "--workers", 1)
    assert verify.returncode == 0 and re.search(r"shards written\s*│\s*0\b", verify.stderr), verify.stderr
    filtered = [work / "01-verify", "-o", work / "02-filter", "--rejects", work / "rejects", "--method", "none"]
    assert "already complete" in on_a_read_only_mount(work, "filter", *filtered).stderr
    report = on_a_read_only_mount(work, "filter", *filtered, "--report", work / "report.json")
    assert report.returncode == 2 and f"{work / 'report.json'}: cannot write the --report file" in report.stderr
    changed = on_a_read_only_mount(work, "verify", imported, "-o", work / "01-verify", "--timeout", 3)
    assert changed.returncode == 2 and "exists from a different run" in changed.stderr
    assert snapshot(work) == before


@pytest.mark.parametrize("lock", [outputs.LOCK, f"{outputs.LOCK}-run"])
def test_a_lock_file_that_is_a_link_or_a_device_is_refused_never_written_through(prmtool, imported, tmp_path, lock):
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    out = tmp_path / "out"
    out.mkdir()
    (out / lock).symlink_to(notes)
    if lock == outputs.LOCK:
        one_line_error(prmtool("verify", imported, "-o", out, "--workers", "1"), str(out / lock), "symbolic link")
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"workdir: {out}\ninput: {imported}\nstages:\n  - stage: verify\n    workers: 1\n")
        one_line_error(prmtool("run", recipe), str(out / lock), "symbolic link")
    assert notes.read_text() == "my precious notes" and (out / lock).is_symlink()
    (out / lock).unlink()
    os.mkfifo(out / lock)
    one_line_error(prmtool("verify", imported, "-o", out, "--workers", "1") if lock == outputs.LOCK
                   else prmtool("run", tmp_path / "r.yaml"), str(out / lock), "not a regular file")  # fmt: skip
    assert kind_of(out / lock) == "fifo"


def test_a_stale_temporary_of_the_same_name_is_never_opened(tmp_path):
    """A file or link already at the temporary's name (a killed process of this pid, or a
    planted link) is left alone: the write takes the next name."""
    target = tmp_path / "report.json"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / f".report.json.tmp-{os.getpid()}").symlink_to(victim)
    shards.write_json_atomic({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1} and victim.read_text() == "precious"


# --- 5. recipes whose stages would write over each other -----------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    "rejects",
    ["{workdir}/04-export", "{workdir}/02-verify", "{workdir}/04-export/inside", "{workdir}/03-filter"],
)
def test_a_recipe_whose_rejects_is_another_stages_folder_is_refused(prmtool, tmp_path, rejects, dry_run):
    workdir = tmp_path / "work"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"workdir: {workdir}\ninput: {RESPONSES_JSONL}\nstages:\n  - stage: import\n  - stage: verify\n"
        f'    workers: 1\n  - stage: filter\n    method: accuracy-band\n    rejects: "{rejects}"\n'
        "  - stage: export\n    format: sft-messages\n"
    )
    line = one_line_error(prmtool("run", recipe, *(["--dry-run"] if dry_run else [])), str(recipe), "--rejects")
    assert "separate paths" in line
    assert not workdir.exists()


def test_a_recipe_whose_rejects_is_its_input_is_refused(prmtool, imported, tmp_path):
    before = snapshot(imported)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"workdir: {tmp_path / 'work'}\ninput: {imported}\nstages:\n  - stage: verify\n    workers: 1\n"
        f"  - stage: filter\n    method: accuracy-band\n    rejects: {imported}\n"
    )
    one_line_error(prmtool("run", recipe, "--dry-run"), str(imported), "--rejects")
    one_line_error(prmtool("run", recipe), str(imported), "--rejects")
    assert snapshot(imported) == before


def test_a_rerun_never_overwrites_another_runs_output_its_changed_rejects_names(prmtool, imported, tmp_path):
    """A recipe reruns a changed stage with --overwrite: its new rejects path, another run's
    output, is refused (in --dry-run too), and an unchanged one is its own to replace."""
    other = tmp_path / "other"
    assert prmtool("verify", imported, "-o", other, "--workers", "1", "-q").exit_code == 0
    kept = snapshot(other)
    workdir = tmp_path / "work"
    recipe = tmp_path / "recipe.yaml"
    text = (
        f"workdir: {workdir}\ninput: {imported}\nstages:\n  - stage: verify\n    workers: 1\n"
        '  - stage: filter\n    method: accuracy-band\n    rejects: "REJECTS"\n'
    )
    recipe.write_text(text.replace("REJECTS", "{workdir}/rejected"))
    assert prmtool("run", recipe, "-q").exit_code == 0
    recipe.write_text(text.replace("REJECTS", str(other)))
    for extra in (["--dry-run"], []):
        result = prmtool("run", recipe, *extra)
        assert str(other) in result.stderr and "--rejects" in result.stderr, result.stderr
        assert result.exit_code == (0 if extra else 2)
    assert snapshot(other) == kept
    recipe.write_text(text.replace("REJECTS", "{workdir}/rejected").replace("accuracy-band", "none"))
    assert prmtool("run", recipe, "-q").exit_code == 0  # its own earlier rejects: rerun, replaced


def test_a_later_stage_may_read_an_earlier_stages_rejects(prmtool, tmp_path):
    workdir = tmp_path / "work"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"workdir: {workdir}\ninput: {RESPONSES_JSONL}\nstages:\n  - stage: import\n  - stage: verify\n"
        '    workers: 1\n  - stage: filter\n    method: accuracy-band\n    rejects: "{workdir}/rejected"\n'
        f"  - stage: export\n    name: export-rejects\n    input: {workdir}/rejected\n    format: sft-messages\n"
    )
    assert prmtool("run", recipe, "-q").exit_code == 0
    assert listed_rows(workdir / "03-filter") + listed_rows(workdir / "04-export-rejects") == 48


# --- 6. only complete folders are read; partitions of one run only -------------------------------


def test_partitions_with_other_options_refuse_to_join_a_folder(prmtool, imported, tmp_path):
    out = tmp_path / "out"
    first = prmtool("verify", imported, "-o", out, "--workers", "1", "--shard-index", "0", "--num-shards", "2", "-q")
    assert first.exit_code == 0
    before = snapshot(out)
    other = ["verify", imported, "-o", out, "--workers", "1", "--shard-index", "1", "--num-shards", "2"]
    one_line_error(prmtool(*other, "--timeout", "3"), str(out), "_SUCCESS-00000-of-00002", "different run")
    one_line_error(prmtool(*other[:-1], "3", "--shard-index", "1"), str(out), "different run")  # other count
    assert snapshot(out) == before
    one_line_error(prmtool("stats", out), str(out), "--allow-incomplete")  # one partition of two is not the run
    assert prmtool(*other, "-q").exit_code == 0  # the same options complete the run
    assert listed_rows(out) == 48 and len(shards.read_manifest(out)["outputs"]) == 4


def test_filter_partitions_with_other_options_refuse_to_join(prmtool, verified, tmp_path):
    kept, rejected = tmp_path / "kept", tmp_path / "rejected"
    base = ["filter", verified, "-o", kept, "--rejects", rejected, "--method", "accuracy-band", "--num-shards", "2"]
    assert prmtool(*base, "--shard-index", "0", "-q").exit_code == 0
    before = snapshot(kept), snapshot(rejected)
    one_line_error(prmtool(*base, "--shard-index", "1", "--band", "0.1,0.9"), "different run")
    assert (snapshot(kept), snapshot(rejected)) == before


def test_overwrite_lets_a_new_set_of_partitions_replace_an_old_one(prmtool, imported, tmp_path):
    out = tmp_path / "out"
    old = ["verify", imported, "-o", out, "--workers", "1", "--num-shards", "2", "-q"]
    for index in ("0", "1"):
        assert prmtool(*old, "--shard-index", index).exit_code == 0
    for index in ("0", "1"):
        assert prmtool(*old, "--shard-index", index, "--timeout", "3", "--overwrite").exit_code == 0
    manifest = shards.read_manifest(out)
    assert manifest["arguments"]["timeout"] == 3.0 and len(manifest["outputs"]) == 4
    assert sorted(p.name for p in out.glob("_*")) == ["_SUCCESS", "_SUCCESS-00000-of-00002", "_SUCCESS-00001-of-00002"]


def test_an_input_rewritten_while_a_stage_reads_it_leaves_the_output_incomplete(
    prmtool, imported, tmp_path, monkeypatch
):
    """Another command rewrites an input shard between this run's start and its manifest (an
    import --overwrite of the folder it reads): the output is refused as a mix of two inputs."""
    finish_run = shards.write_manifest

    def rewritten_meanwhile(*args, **kwargs):
        shard = imported / "part-00003.parquet"
        frame = pl.read_parquet(shard)
        frame.with_columns(response=pl.lit("MODIFIED ") + pl.col("response")).write_parquet(shard)
        return finish_run(*args, **kwargs)

    monkeypatch.setattr(shards, "write_manifest", rewritten_meanwhile)
    out = tmp_path / "out"
    result = prmtool("verify", imported, "-o", out, "--workers", "1")
    one_line_error(result, imported / "part-00003.parquet", "changed while this run read it", "--overwrite")
    assert not (out / shards.MANIFEST).exists()


def test_a_folder_a_killed_run_left_is_refused_and_allow_incomplete_reads_it(prmtool, imported, tmp_path):
    out = tmp_path / "verified"
    assert prmtool("verify", imported, "-o", out, "--workers", "1", "-q").exit_code == 0
    (out / shards.MANIFEST).unlink()  # as a run killed before its manifest leaves it
    (out / "part-00003.parquet").unlink()
    for argv in (
        ["export", out, "-o", tmp_path / "exported", "--format", "sft-messages"],
        ["filter", out, "-o", tmp_path / "kept", "--rejects", tmp_path / "rej", "--method", "accuracy-band"],
        ["verify", out, "-o", tmp_path / "again", "--workers", "1"],
        ["stats", out],
        ["stats", str(tmp_path / "verifi*")],  # a glob that matches the folder
        ["eval", out, "--truth", "correct", "--pred", "correct"],
    ):
        one_line_error(prmtool(*argv), str(out), "has no _SUCCESS", "--allow-incomplete")
    assert not [p for p in tmp_path.iterdir() if p.name in ("exported", "kept", "rej", "again")]
    result = prmtool("export", out, "-o", tmp_path / "exported", "--format", "sft-messages", "--allow-incomplete", "-q")
    assert result.exit_code == 0, result.stderr
    assert listed_rows(tmp_path / "exported") == 36  # three shards of 12, as they are
    stats = prmtool("stats", out, "--allow-incomplete", "--json")
    assert json.loads(stats.stdout)["rows"] == 36


def test_a_folder_a_run_left_before_its_first_shard_says_so(prmtool, tmp_path):
    out = tmp_path / "labeled"
    out.mkdir()
    shards.write_json_atomic({"stage": "label", "files": ["part-00000.parquet"]}, out / shards.JOURNAL)
    line = one_line_error(prmtool("stats", out), str(out), "has no _SUCCESS", shards.JOURNAL)
    assert "no Parquet file" not in line


def test_a_folder_a_sigkilled_run_left_is_refused_by_the_next_stage(prmtool, tmp_path):
    imported = tmp_path / "imported"
    assert prmtool("import", RESPONSES_JSONL, "-o", imported, "--shard-rows", "2", "-q").exit_code == 0
    out = tmp_path / "verified"
    writer = start("verify", imported, "-o", out, "--workers", "1", "-q")
    deadline = time.monotonic() + 120
    while not (out / shards.JOURNAL).exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(writer.pid, signal.SIGKILL)  # with its verify workers
    writer.wait()
    assert not (out / shards.MANIFEST).exists(), "killed before its manifest"
    one_line_error(prmtool("export", out, "-o", tmp_path / "exported", "--format", "sft-messages"), str(out))
    assert not (tmp_path / "exported").exists()
    assert prmtool("verify", imported, "-o", out, "--workers", "1", "-q").exit_code == 0  # the same command resumes
    assert listed_rows(out) == 48 and len(shards.read_manifest(out)["outputs"]) == 24


def test_a_completed_folder_is_read_exactly_as_its_manifest_lists_it(prmtool, verified, tmp_path):
    stranger = verified / "zz-extra.parquet"
    pl.read_parquet(verified / "part-00000.parquet").write_parquet(stranger)  # dropped in later: not the run's
    stats = prmtool("stats", verified, "--json")
    assert stats.exit_code == 0 and json.loads(stats.stdout)["rows"] == 48 and json.loads(stats.stdout)["shards"] == 4
    stranger.unlink()

    shard = verified / "part-00001.parquet"
    original = shard.read_bytes()
    pl.read_parquet(shard).head(3).write_parquet(shard)  # changed after the run completed
    one_line_error(prmtool("stats", verified), str(shard), "_SUCCESS", "changed after its run completed")
    shard.unlink()  # gone
    one_line_error(prmtool("export", verified, "-o", tmp_path / "x", "--format", "sft-messages"), str(shard), "missing")
    shard.write_bytes(original)
    assert prmtool("stats", verified, "-q").exit_code == 0


def test_a_split_folder_of_a_complete_export_is_read_as_its_manifest_lists_it(prmtool, verified, tmp_path):
    exported = tmp_path / "exported"
    argv = ["export", verified, "-o", exported, "--format", "sft-messages", "--holdout", "test=0.25", "-q"]
    assert prmtool(*argv).exit_code == 0
    train = json.loads(prmtool("stats", exported / "train", "--json").stdout)["rows"]
    test = json.loads(prmtool("stats", exported / "test", "--json").stdout)["rows"]
    assert train + test == json.loads(prmtool("stats", exported, "--json").stdout)["rows"] == 48


def test_parquet_files_prmtool_never_wrote_are_read_whole(prmtool, tmp_path):
    """A user's own folder of Parquet files has no manifest and needs none."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    frame = pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet")
    frame.head(20).write_parquet(theirs / "a.parquet")
    frame.tail(28).write_parquet(theirs / "b.parquet")
    assert json.loads(prmtool("stats", theirs, "--json").stdout)["rows"] == 48
    assert prmtool("verify", theirs, "-o", tmp_path / "out", "--workers", "1", "-q").exit_code == 0
    assert listed_rows(tmp_path / "out") == 48


def test_allow_incomplete_in_python(imported, tmp_path):
    from prmtool.stages import stage

    (imported / shards.MANIFEST).unlink()
    with pytest.raises(Exception, match="--allow-incomplete"):
        stage("verify")(imported, tmp_path / "out", workers=1, quiet=True)
    summary = stage("verify")(imported, tmp_path / "out", workers=1, quiet=True, allow_incomplete=True)
    assert summary.rows_out == 48
    assert shards.READ_INCOMPLETE.get() is False, "the setting ends with the run"
