"""Ctrl-C stops a run at once, wherever it waits: on the engine, on label's rounds, on the
verifier's worker processes. Tested with a real SIGINT to a real `prmtool label` process, and
nothing it was writing is left half-written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, SAMPLES, sigint_as_in_a_terminal


def start(arguments: list[str], tmp_path: Path) -> subprocess.Popen:
    """`python -m prmtool ARGUMENTS` with stderr to a file (not a terminal: progress lines come
    every 0.2 s)."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PRMTOOL_PROGRESS_SECONDS": "0.2",
    }
    log = (tmp_path / "stderr.txt").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "prmtool", *arguments],
        stderr=log,
        stdout=subprocess.DEVNULL,
        env=environment,
        preexec_fn=sigint_as_in_a_terminal,
    )


def wait_for_line(tmp_path: Path, process: subprocess.Popen, pattern: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if re.search(pattern, (tmp_path / "stderr.txt").read_text()):
            return
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no {pattern!r} in {(tmp_path / 'stderr.txt').read_text()!r}")


@pytest.fixture
def wrong_responses(tmp_path) -> Path:
    """12 of the GSM8K sample's responses with 4 steps or more, marked wrong: every row runs a
    first-error search of several rounds."""
    frame = pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet")
    frame = frame.filter(pl.col("steps").list.len() >= 4).head(12).with_columns(correct=pl.lit(False))
    (tmp_path / "verified").mkdir()
    frame.write_parquet(tmp_path / "verified" / "part-00000.parquet")
    return tmp_path / "verified"


@pytest.mark.parametrize("rounds", ["lockstep", "continuous"])
def test_ctrl_c_stops_label_mid_rounds_and_leaves_nothing_half_written(
    tmp_path, tiny_model_dir, wrong_responses, rounds
):
    output = tmp_path / "labeled"
    process = start(
        ["label", str(wrong_responses), "-o", str(output), "--model", str(tiny_model_dir), "--k", "8"]
        + ["--max-tokens", "32", "--workers", "1", "--rounds", rounds, "--device", "cpu"],
        tmp_path,
    )
    wait_for_line(tmp_path, process, r" [1-9][\d,]* rollouts, ")  # a progress line: rollouts are under way
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("label ignored Ctrl-C for 30 s") from None
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 130, stderr
    assert "interrupted; rerun the same command to resume where it stopped" in stderr
    assert time.monotonic() - interrupted < 30
    left = [p.name for p in output.rglob("*")] if output.exists() else []
    assert not [name for name in left if name != ".lock"], left  # no shard, no temporary file, no _SUCCESS


def test_ctrl_c_that_library_code_turned_into_another_error_still_exits_as_interrupted(monkeypatch, capsys):
    """numpy catches an exception raised inside an array comparison and raises a TypeError in
    its place: a Ctrl-C arriving there must still end the command as interrupted (exit 130)."""
    from prmtool.cli import commands

    def comparing_arrays(**kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise TypeError("Cannot compare structured arrays unless they have a common dtype") from None

    def failing(**kwargs):
        raise TypeError("a real bug")

    # As a terminal starts it: a shell's background job (`pytest &`) starts with SIGINT ignored,
    # where Ctrl-C never reaches the command, and main leaves it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(commands, "app", comparing_arrays)
        assert commands.main(["label"]) == 130
        assert "interrupted; rerun the same command" in capsys.readouterr().err

        monkeypatch.setattr(commands, "app", failing)  # no Ctrl-C: the error is the error
        with pytest.raises(TypeError, match="a real bug"):
            commands.main(["label"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main put Python's handler back
    finally:
        signal.signal(signal.SIGINT, previous)
