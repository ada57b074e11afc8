"""Shared fixtures: run the CLI in-process, and small shard sets written the way users write them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from prmtool.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples" / "gsm8k"


def pytest_configure(config):
    """GGUF models (the embedded one) are converted once per test session, into a folder of the
    session's own, never the user's cache; set before collection, so that environments test
    modules copy at import (for subprocesses) carry it too."""
    os.environ["PRMTOOL_MODEL_CACHE"] = tempfile.mkdtemp(prefix="prmtool-test-models-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("PRMTOOL_MODEL_CACHE", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Recipe runs remember their throughput (for --dry-run) in PRMTOOL_CACHE_DIR: a test's own
    folder, never the user's cache."""
    monkeypatch.setenv("PRMTOOL_CACHE_DIR", str(tmp_path / "prmtool-cache"))


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def prmtool(capsys):
    """`prmtool("verify", "in", "-o", "out")` runs the CLI as a user would and returns
    its exit code and output."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows: list[dict], name: str = "input.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


@pytest.fixture
def responses_dir(tmp_path) -> Path:
    """A shard set of responses in the row contract: the GSM8K sample's 48 responses."""
    target = tmp_path / "responses"
    target.mkdir()
    pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet").write_parquet(target / "part-00000.parquet")
    return target


def sigint_as_in_a_terminal() -> None:
    """A child's preexec_fn: SIGINT at its default, as a terminal's foreground command has it.
    A test run started as a shell's background job (`pytest &`) has SIGINT ignored and would
    hand that on, and a command rightly keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def files_under(path: Path) -> list[str]:
    """The files a shard set holds, less the locks each output directory keeps (`.lock`, `.lock-SLOT`)."""
    return (
        sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".lock"))
        if path.exists()
        else []
    )


def write_shards(directory: Path, frame: pl.DataFrame, sizes: list[int]) -> Path:
    """`frame` cut into Parquet shards of these sizes, part-00000.parquet and on."""
    assert sum(sizes) == frame.height
    directory.mkdir(parents=True)
    start = 0
    for index, size in enumerate(sizes):
        frame.slice(start, size).write_parquet(directory / f"part-{index:05d}.parquet")
        start += size
    return directory


from tests.engine_fixtures import *  # noqa: E402,F403  (tiny_model_dir, tiny_engine)
