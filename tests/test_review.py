"""`prmtool review`: the view page served on 127.0.0.1, where a click on a step sets the
response's `human_first_error`; the corrections are a shard set that `eval` and `export` read."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pytest

from prmtool.cli import review
from tests.browser import Browser, browser_test
from tests.conftest import ROOT, sigint_as_in_a_terminal
from tests.test_hostile_inputs import TARGETS, snapshot
from tests.test_view import digests, labelled  # noqa: F401  (the labelled shard set fixture)


@contextmanager
def serving(inputs: Path, output: Path, **options):
    """`prmtool review INPUTS -o OUTPUT` on a free port, served from a thread."""
    server = review.start([str(inputs)], output, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def post(server, change: dict, token: str | None = "the run's", headers: dict | None = None) -> tuple[int, dict]:
    """POST a correction as the page does; returns the status and the JSON reply."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    body = json.dumps(change).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent[review.TOKEN_HEADER] = server.token if token == "the run's" else token
    connection.request("POST", "/api/review", body=body, headers=sent)
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_correction_is_saved_reloaded_and_read_by_eval_and_export(prmtool, labelled, tmp_path):  # noqa: F811
    before = digests(labelled)
    reviewed = tmp_path / "reviewed"
    with serving(labelled, reviewed) as server:
        assert server.url.startswith("http://127.0.0.1:")
        # nothing without the run's token, from another Host (DNS rebinding) or from another site's page
        root = server.url.split("?")[0]
        assert status_of(root) == 403 and status_of(root + "?token=guess") == 403
        assert status_of(server.url) == 200
        assert post(server, {"response_id": "ducks-early", "human_first_error": 1}, token=None)[0] == 403
        assert post(server, {"response_id": "ducks-early", "human_first_error": 1}, token="guess")[0] == 403
        assert (
            post(server, {"response_id": "ducks-early", "human_first_error": 1}, headers={"Host": "evil.example"})[0]
            == 403
        )
        assert (
            post(
                server,
                {"response_id": "ducks-early", "human_first_error": 1},
                headers={"Origin": "http://evil.example"},
            )[0]
            == 403
        )
        # OUT is a complete stage output before the first correction
        assert (reviewed / "_SUCCESS").exists() and server.reviews.saved == {}

        status, reply = post(server, {"response_id": "ducks-early", "human_first_error": 1, "note": "16 - 3 is right"})
        assert status == 200, reply
        assert reply["row"]["step_labels"] == [1, 0, None] and reply["reviewed"] == 1
        assert post(server, {"response_id": "robe-markup", "human_first_error": -1})[0] == 200
        status, reply = post(server, {"response_id": "ducks-early", "human_first_error": 3})
        assert status == 400 and reply["error"] == "human_first_error 3: expected -1 or a step of 0 to 2"
        assert post(server, {"response_id": "nobody", "human_first_error": 0})[0] == 400
        assert post(server, {"response_id": "nobody", "clear": True})[0] == 400

    rows = pl.read_parquet(reviewed / "*.parquet").sort("response_id")
    by_id = {row["response_id"]: row for row in rows.iter_rows(named=True)}
    assert by_id["ducks-early"]["human_first_error"] == 1 and by_id["ducks-early"]["review_note"] == "16 - 3 is right"
    assert by_id["robe-markup"]["human_first_error"] == -1 and by_id["robe-markup"]["step_labels"] == [1, 1]
    assert by_id["ducks-wrong"]["human_first_error"] == 1 and by_id["ducks-wrong"]["reviewed_at"] is None  # the input's
    assert by_id["ducks-wrong"]["step_labels"] == [1, 0, 0]  # the input's, not redrawn
    assert sorted(p.name for p in reviewed.glob("*.parquet")) == sorted(before)  # one shard per input shard
    assert json.loads((reviewed / "_SUCCESS").read_text())["stage"] == "review"
    assert digests(labelled) == before  # the input untouched

    # reopened: what was reviewed is there, in the server and on the page
    with serving(labelled, reviewed) as server:
        assert sorted(server.reviews.saved) == ["ducks-early", "robe-markup"]
        with urllib.request.urlopen(server.url, timeout=10) as reply:
            page = reply.read().decode()
        assert '"reviewed":2' in page and "16 - 3 is right" in page

    result = prmtool("eval", reviewed, "--truth", "human_first_error", "--pred", "first_error")
    assert result.exit_code == 0, result.stderr
    result = prmtool("export", reviewed, "-o", tmp_path / "prm", "--format", "trl-stepwise", "-q")
    assert result.exit_code == 0, result.stderr
    exported = pl.read_parquet(tmp_path / "prm" / "train" / "*.parquet")
    labels = {tuple(row["completions"]): row["labels"] for row in exported.iter_rows(named=True)}
    early = tuple(by_id["ducks-early"]["steps"][:2])
    assert labels[early] == [True, False]  # step 1 bad, the steps after it unlabelled, left out


def test_undo_restores_the_input_label(labelled, tmp_path):  # noqa: F811
    reviewed = tmp_path / "reviewed"
    with serving(labelled, reviewed) as server:
        assert post(server, {"response_id": "ducks-early", "human_first_error": 2})[0] == 200
        status, reply = post(server, {"response_id": "ducks-early", "clear": True})
        assert status == 200 and reply["row"]["human_first_error"] == 0 and reply["reviewed"] == 0
    rows = pl.read_parquet(reviewed / "*.parquet").filter(pl.col("response_id") == "ducks-early")
    assert rows["human_first_error"].to_list() == [0] and rows["reviewed_at"].to_list() == [None]


def test_a_session_stopped_between_a_shard_and_its_manifest_is_mended_when_reopened(
    prmtool,
    labelled,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    reviewed = tmp_path / "reviewed"
    with serving(labelled, reviewed):
        pass
    with monkeypatch.context() as patch:
        patch.setattr(review.Reviews, "_write_manifest", lambda self: None)  # as if killed before it
        with serving(labelled, reviewed) as server:
            assert post(server, {"response_id": "ducks-early", "human_first_error": 2})[0] == 200
    assert prmtool("stats", reviewed).exit_code == 2  # the shard is not the one _SUCCESS lists
    with serving(labelled, reviewed):
        pass
    assert prmtool("stats", reviewed).exit_code == 0
    rows = pl.read_parquet(reviewed / "*.parquet").filter(pl.col("response_id") == "ducks-early")
    assert rows["human_first_error"].to_list() == [2]


def test_one_session_per_output_and_no_other_run_overwritten(prmtool, labelled, tmp_path):  # noqa: F811
    reviewed = tmp_path / "reviewed"
    with serving(labelled, reviewed):
        result = prmtool("review", labelled, "-o", reviewed, "--port", "0")
        assert result.exit_code == 2 and "another prmtool run" in result.stderr
    other = tmp_path / "other"
    other.mkdir()
    pl.read_parquet(labelled / "part-00000.parquet").write_parquet(other / "part-00000.parquet")
    result = prmtool("review", other, "-o", reviewed, "--port", "0")
    assert result.exit_code == 2 and "holds the output of a different run; pass --overwrite" in result.stderr
    result = prmtool("review", labelled, "-o", tmp_path / "r2", "--port", "0", "--color", "nope")
    assert result.exit_code == 2 and "--color nope: no such column" in result.stderr
    result = prmtool("review", labelled, "-o", tmp_path / "r3", "--port", "0", "--order", "random")
    assert result.exit_code == 2 and "--order 'random': expected one of input, disagreement, threshold" in result.stderr
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_the_command_serves_until_interrupted(labelled, tmp_path):  # noqa: F811
    """As a person runs it on a headless machine: the address printed, no browser opened, Ctrl-C stops it."""
    environment = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environment["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "prmtool", "review", str(labelled), "-o", str(tmp_path / "out"), "--port", "0"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=environment, preexec_fn=sigint_as_in_a_terminal
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("Ctrl-C")):
            lines.append(process.stderr.readline().strip())
            assert lines[-1] or process.poll() is None, lines
        url = re.search(r"open (http://127\.0\.0\.1:\d+/\?token=\S+)", "\n".join(lines)).group(1)
        assert status_of(url) == 200
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[1]
    assert process.returncode == 0, rest
    assert any(line.startswith("reviewing 6 responses (0 already reviewed)") for line in lines), lines
    assert "stopped: 0 of 6 responses reviewed" in rest


@browser_test
def test_clicking_a_step_saves_the_correction(labelled, tmp_path):  # noqa: F811
    with serving(labelled, tmp_path / "reviewed", order="disagreement") as server, Browser() as browser:
        browser.goto(server.url)
        browser.wait_until("document.querySelectorAll('article.response').length > 0")
        order = browser.evaluate("[...document.querySelectorAll('article.response')].map(a => a.dataset.responseId)")
        assert order[:3] == ["ducks-wrong", "ducks-early", "robe-thinking"]  # where the label columns disagree

        browser.click("article[data-response-id='ducks-early'] .step[data-step='0']")
        browser.wait_until("document.querySelector('.review-form input') === document.activeElement")
        browser.type_text("13 eggs: breakfast only")
        browser.click(".review-form .save")
        browser.wait_until("document.querySelector(\"article[data-response-id='ducks-early'] .review-bar .done\")")
        assert server.reviews.saved["ducks-early"]["human_first_error"] == 0
        assert server.reviews.saved["ducks-early"]["review_note"] == "13 eggs: breakfast only"
        assert browser.evaluate("document.getElementById('review-progress').textContent").startswith("1 of 6 reviewed")

        browser.click("article[data-response-id='robe-right'] .no-error")
        browser.click("article[data-response-id='robe-right'] .review-form .save")
        browser.wait_until("document.querySelector(\"article[data-response-id='robe-right'] .review-bar .done\")")
        assert server.reviews.saved["robe-right"]["human_first_error"] == -1
        assert browser.console_errors == []


@pytest.mark.parametrize("command", ["view", "review"])
@pytest.mark.parametrize("target", TARGETS)
def test_neither_command_writes_into_over_or_above_its_input(prmtool, labelled, command, target):  # noqa: F811
    before = snapshot(labelled)
    result = prmtool(
        command, labelled, "-o", TARGETS[target](labelled), "-q", *(["--port", "0"] * (command == "review"))
    )
    assert result.exit_code == 2 and "-o" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(labelled) == before
