"""A Ray cluster of two nodes on this machine, as a user starts one with `ray start`: a head and
a second node with its own resources and temporary folder. A stage run with `--executor ray`
through RAY_ADDRESS spreads its partitions over both nodes and writes the whole run's output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.conftest import ROOT, SAMPLES

pytest.importorskip("ray")
RAY = shutil.which("ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# One machine, no token: Ray's CLI and its drivers must agree on the authentication mode.
ENVIRONMENT = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def ray(*args: str, temp_dir: str) -> None:
    result = subprocess.run(
        [RAY, *args, "--temp-dir", temp_dir, "--disable-usage-stats"],
        capture_output=True,
        text=True,
        timeout=180,
        env=ENVIRONMENT,
    )
    assert result.returncode == 0, f"ray {' '.join(args)}:\n{result.stderr[-2000:]}"


@contextlib.contextmanager
def two_node_cluster():
    """`ray start --head` and a second node joining it, each with its own temporary folder;
    yields (address, the second node's folder). Only these two are stopped afterwards."""
    if RAY is None:
        pytest.fail("the ray command is missing (pip install 'prmtool[ray]')")
    # short folders: Ray's socket paths must stay under the 107 characters Unix allows
    head_dir, second_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rs", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0"]
    common += ["--object-store-memory", str(200 * 2**20)]
    try:
        ray("start", "--head", "--port", str(port), "--include-dashboard", "false", *common, temp_dir=head_dir)
        second = ["--address", address, *common, "--resources", json.dumps({"second_node": 1})]
        ray("start", *second, temp_dir=second_dir)
        yield address, second_dir
    finally:
        stop_nodes(head_dir, second_dir)


@pytest.fixture(scope="module")
def two_nodes():
    with two_node_cluster() as (address, _):
        yield address


def prmtool(*args, address: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prmtool", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENVIRONMENT, "RAY_ADDRESS": address},
        timeout=600,
    )


def test_a_stage_runs_across_two_ray_nodes_through_ray_address(two_nodes, tmp_path):
    inputs = tmp_path / "responses"  # two shards: one partition for each node
    inputs.mkdir()
    rows = pl.read_parquet(SAMPLES / "responses" / "*.parquet")
    half = rows.height // 2
    rows.head(half).write_parquet(inputs / "part-00000.parquet")
    rows.tail(rows.height - half).write_parquet(inputs / "part-00001.parquet")
    on_cluster = prmtool(
        "verify", inputs, "-o", tmp_path / "cluster", "--workers", "1", "--executor", "ray", address=two_nodes
    )
    assert on_cluster.returncode == 0, on_cluster.stderr
    assert "ray: 2 tasks (0 GPU, 1 CPU each) on 2 CPUs" in on_cluster.stderr  # one per node
    assert "all 2 partitions done" in on_cluster.stderr
    whole = prmtool("verify", inputs, "-o", tmp_path / "whole", "--workers", "1", "-q", address=two_nodes)
    assert whole.returncode == 0, whole.stderr
    read = lambda folder: pl.read_parquet(folder / "*.parquet").sort("response_id")  # noqa: E731
    assert_frame_equal(read(tmp_path / "cluster"), read(tmp_path / "whole"))


def node_processes(temp_dir: str) -> list[int]:
    """The process ids of the node started with `temp_dir`: those whose command line names it
    (its raylet and the rest) and all their descendants. Ray's workers and agents rename
    themselves (`ray::verify`), so only their parent ties them to the node."""
    parents: dict[int, int] = {}
    named = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            # /proc/PID/stat: "pid (name) state ppid ...", and the name may hold spaces
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                named.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found = set(named)
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return sorted(found)
        found |= children


def stop_nodes(*temp_dirs: str) -> None:
    """Kill these nodes' processes alone (`ray stop` would stop every Ray on the machine), then
    remove their folders."""
    for temp_dir in temp_dirs:
        for pid in node_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_partition_on_a_lost_node_is_reported_and_a_rerun_finishes_only_the_rest(tmp_path):
    """The second node dies while its partition runs: the run says which partition failed and
    exits 1, the output is incomplete but holds only whole shards, and the rerun (on the head
    alone) redoes only what is missing."""
    import time

    inputs = tmp_path / "responses"
    inputs.mkdir()
    rows = pl.read_parquet(SAMPLES / "responses" / "*.parquet")
    many = pl.concat([rows] * 4000).with_columns(response_id=pl.format("r{}", pl.int_range(pl.len())))
    for number in range(4):  # 4 shards, 2 partitions: each partition verifies two shards in turn
        many.gather_every(4, offset=number).write_parquet(inputs / f"part-{number:05d}.parquet")
    with two_node_cluster() as (address, second_dir):
        command = [sys.executable, "-m", "prmtool", "verify", str(inputs), "-o", str(tmp_path / "out")]
        command += ["--workers", "1", "--executor", "ray", "--num-shards", "2"]
        run = subprocess.Popen(
            command, cwd=ROOT, env={**ENVIRONMENT, "RAY_ADDRESS": address}, stderr=subprocess.PIPE, text=True
        )
        started = time.monotonic()
        while not list((tmp_path / "out").glob("*.parquet")) and time.monotonic() - started < 300:
            time.sleep(0.2)  # until the first shard is written: both partitions are running
        stop_nodes(second_dir)  # the node is lost
        _, stderr = run.communicate(timeout=600)
        if "all 2 partitions done" in stderr:
            pytest.fail(f"both partitions finished before the second node was killed; make the input larger\n{stderr}")
        assert run.returncode == 1, stderr
        assert "its Ray task died" in stderr and "rerun the same command to redo only the failed partitions" in stderr
        assert not (tmp_path / "out" / "_SUCCESS").exists()
        for shard in (tmp_path / "out").glob("*.parquet"):  # whatever was written is whole
            assert pl.read_parquet(shard).height == many.height // 4
        again = subprocess.run(
            command, cwd=ROOT, env={**ENVIRONMENT, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600
        )
        assert again.returncode == 0, again.stderr
        assert pl.read_parquet(tmp_path / "out" / "*.parquet").height == many.height
