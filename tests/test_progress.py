"""Progress where stderr is not a terminal (a log file, nohup, make): a plain line every
PRMTOOL_PROGRESS_SECONDS (30 s by default) with rows, work, rates and time left; and label's
progress counted in rollouts, not only in finished rows."""

from __future__ import annotations

import re

import polars as pl

from prmtool.core.report import PlainProgress, Tracker
from tests.conftest import SAMPLES


def test_rows_in_progress_count_by_the_share_of_their_work_done():
    tracker = Tracker(total=48)
    tracker.skip(16)  # rows that needed no search: done at once
    tracker.expect_work(rows=32, amount=1_000, unit="rollouts")
    assert tracker.completed() == 16
    tracker.advance(0, tokens=5_000, work=250)  # a quarter of the rollouts, no row finished yet
    assert tracker.completed() == 16 + 32 * 0.25
    tracker.advance(8, work=250)
    assert tracker.completed() == 24 + 24 * 0.5
    left, upper_bound = tracker.seconds_left(elapsed=60.0)
    # the rate is that of the 20 rows' worth of searching done in 60 s, not of 36 rows
    assert left == (48 - 36) * 60.0 / 20 and not upper_bound


def test_time_left_from_tokens_leaves_out_the_rows_resumed_from_an_earlier_run():
    tracker = Tracker(total=100)
    tracker.skip(50)  # a resumed shard: its rows sample nothing now
    tracker.expect_tokens_per_row(1_000)
    tracker.advance(10, tokens=10_000)
    left, upper_bound = tracker.seconds_left(elapsed=10.0)
    assert left == 40.0 and upper_bound  # 40 rows of at most 1,000 tokens at 1,000 tokens/s


def test_a_plain_line_says_rows_work_rates_and_time_left(capsys):
    from rich.console import Console

    tracker = Tracker(total=48)
    tracker.started -= 120.0  # two minutes in
    tracker.skip(16)
    tracker.expect_work(rows=32, amount=1_000, unit="rollouts")
    tracker.advance(0, tokens=24_000, work=500)  # half the searching: 16 rows' worth in 2 minutes
    line = PlainProgress(Console(stderr=True), "label", tracker, "rows", interval=30).line()
    assert line == (
        "label: 16/48 rows, 500 rollouts, 0.1 rows/s, 24,000 tokens (200 tok/s), 0:02:00 elapsed, 0:02:00 left"
    )


def test_label_prints_plain_progress_lines_when_stderr_is_not_a_terminal(
    prmtool, tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("PRMTOOL_PROGRESS_SECONDS", "0.05")
    frame = pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet")
    frame.filter(pl.col("steps").list.len() >= 4).head(6).with_columns(correct=pl.lit(False)).write_parquet(
        tmp_path / "verified.parquet"
    )
    result = prmtool(
        "label", tmp_path / "verified.parquet", "-o", tmp_path / "labeled", "--model", tiny_model_dir,
        "--k", "2", "--max-tokens", "8", "--workers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("label: ")]
    assert lines, result.stderr
    plain = r"label: \d+/6 rows, (\d+ rollouts, )?.*\d+:\d\d:\d\d elapsed(, .* left)?"
    assert all(re.fullmatch(plain, line) for line in lines)
    assert any(re.search(r" [1-9]\d* rollouts, ", line) for line in lines)  # counted before rows finish
