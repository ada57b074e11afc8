"""`prmtool review`: the `view` page served on this machine, where clicking a step sets the
response's `human_first_error`.

The corrections are a stage output like any other: OUT holds one shard per input shard, every
input column kept, with `human_first_error`, `review_note` and `reviewed_at` for each response
and `step_labels` redrawn from the person's first error on the rows they reviewed, and its
`_SUCCESS` manifest; each correction rewrites its shard atomically, so `prmtool eval` and
`export` can read OUT at any moment. Reopening the same inputs into the same OUT picks up
where the last session stopped.

The server is the standard library's, on 127.0.0.1 unless --host says otherwise. Any web page
the reviewer visits can send requests to 127.0.0.1, so every request needs the token printed
with the address (a new one per run), and a Host header naming this server (DNS rebinding).
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sys
import threading
import time
from contextlib import ExitStack
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import polars as pl
import typer

from prmtool.cli import view
from prmtool.core import outputs, shards
from prmtool.core.errors import InputError
from prmtool.core.options import Inputs, Quiet
from prmtool.core.report import RunStats
from prmtool.core.schema import check_columns

STAGE = "review"
ARGUMENTS: dict = {}  # nothing in the output depends on the options: they only shape the page
ORDERS = ("input", "disagreement", "threshold")
TOKEN_HEADER = "X-Prmtool-Token"


def labels_from_first_error(first_error: int, steps: int) -> list[int | None]:
    """The step labels a first error implies, as binary-search labelling writes them: good
    before it, bad at it, unlabelled after it; -1 (no error): every step good."""
    if first_error < 0:
        return [1] * steps
    return [1] * first_error + [0] + [None] * (steps - first_error - 1)


class Reviews:
    """The corrections of one session and the output shard set they are saved in."""

    def __init__(self, found: list[shards.InputShard], frame: pl.DataFrame, output: Path, overwrite: bool):
        self.found = {shard.name: shard for shard in found}
        self.frame = frame  # the input rows, as read; never changed
        self.output = output
        self.sources = [shard.describe() for shard in found]
        self.row_of = {response_id: row for row, response_id in enumerate(frame["response_id"].to_list())}
        self.steps = frame["steps"].list.len().to_list()
        self.shard_of = frame["_shard"].to_list()
        # response_id -> {human_first_error, review_note, reviewed_at}
        self.saved: dict[str, dict] = {}
        self.lock = threading.Lock()
        if shards.prepare_whole_output(output, STAGE, ARGUMENTS, self.sources, overwrite, names=list(self.found)):
            self._load()
            self._write_manifest()  # a session stopped between a shard and its manifest left them apart
        else:
            for name in self.found:
                self._write_shard(name)
            self._write_manifest()

    def _load(self) -> None:
        """The reviews an earlier session of the same inputs saved in the output."""
        for path in sorted(self.output.glob("*.parquet")):
            if path.name.startswith((".", "_")):
                continue
            try:
                done = pl.read_parquet(path, columns=["response_id", "human_first_error", "review_note", "reviewed_at"])
            except Exception as exc:
                raise InputError(f"{path}: cannot read the reviews saved here ({shards._one_line(exc)})") from None
            for response_id, first_error, note, at in done.filter(pl.col("reviewed_at").is_not_null()).iter_rows():
                if response_id in self.row_of:
                    self.saved[response_id] = {"human_first_error": first_error, "review_note": note, "reviewed_at": at}

    def row(self, response_id: str) -> dict:
        """The review columns of one response as the output holds them (the input's where it is not reviewed)."""
        row = self.row_of[response_id]
        saved = self.saved.get(response_id)
        if saved is None:
            first_error = self.frame["human_first_error"][row] if "human_first_error" in self.frame.columns else None
            labels = self.frame["step_labels"][row] if "step_labels" in self.frame.columns else None
            return {
                "human_first_error": first_error,
                "review_note": None,
                "reviewed_at": None,
                "step_labels": labels.to_list() if labels is not None else None,
            }
        return {**saved, "step_labels": labels_from_first_error(saved["human_first_error"], self.steps[row])}

    def set(self, response_id: str, first_error: int, note: str) -> dict:
        row = self._row(response_id)
        if not isinstance(first_error, int) or isinstance(first_error, bool) or not -1 <= first_error < self.steps[row]:
            raise InputError(f"human_first_error {first_error!r}: expected -1 or a step of 0 to {self.steps[row] - 1}")
        if not isinstance(note, str) or len(note) > 10_000:
            raise InputError("note: expected text of at most 10,000 characters")
        review = {"human_first_error": first_error, "review_note": note, "reviewed_at": time.strftime("%FT%T%z")}
        self._change(response_id, review)
        return self.row(response_id)

    def clear(self, response_id: str) -> dict:
        self._row(response_id)  # an unknown id is an error, not a no-op
        if response_id in self.saved:
            self._change(response_id, None)
        return self.row(response_id)

    def _change(self, response_id: str, review: dict | None) -> None:
        """Set (or, with None, remove) one review and save its shard; memory and disk stay alike
        when the save fails."""
        row = self._row(response_id)
        with self.lock:
            before = self.saved.get(response_id)
            self._put(response_id, review)
            try:
                self._save(row)
            except BaseException:
                self._put(response_id, before)
                raise

    def _put(self, response_id: str, review: dict | None) -> None:
        if review is None:
            self.saved.pop(response_id, None)
        else:
            self.saved[response_id] = review

    def _row(self, response_id) -> int:
        if response_id not in self.row_of:
            raise InputError(f"response_id {response_id!r}: no such response in the input")
        return self.row_of[response_id]

    def _save(self, row: int) -> None:
        self._write_shard(self.shard_of[row])
        self._write_manifest()

    def _write_shard(self, name: str) -> None:
        part = self.frame.filter(pl.col("_shard") == name).drop("_shard")
        blank = [None] * part.height
        first_errors = part["human_first_error"].to_list() if "human_first_error" in part.columns else list(blank)
        labels = part["step_labels"].to_list() if "step_labels" in part.columns else list(blank)
        notes, times = list(blank), list(blank)
        for number, response_id in enumerate(part["response_id"].to_list()):
            saved = self.saved.get(response_id)
            if saved is not None:
                first_errors[number] = saved["human_first_error"]
                notes[number], times[number] = saved["review_note"], saved["reviewed_at"]
                labels[number] = labels_from_first_error(saved["human_first_error"], len(part["steps"][number]))
        review = pl.DataFrame(
            {"human_first_error": first_errors, "review_note": notes, "reviewed_at": times, "step_labels": labels},
            schema={
                "human_first_error": pl.Int32,
                "review_note": pl.String,
                "reviewed_at": pl.String,
                "step_labels": pl.List(pl.Int8),
            },
        )
        part = part.drop(review.columns, strict=False).hstack(review)
        record = shards.provenance(STAGE, ARGUMENTS, self.found[name])
        shards.write_shard(part, self.output / name, record)

    def _write_manifest(self) -> None:
        rows = {name: shard.rows for name, shard in self.found.items()}
        # the inputs were read whole when the session opened: no save rereads them to hash them
        shards.write_manifest(self.output, STAGE, ARGUMENTS, self.sources, rows, check_inputs=False)


class ReviewServer(ThreadingHTTPServer):
    """The page at `/?token=...`, and `POST /api/review` that saves one correction."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], data: dict):
        super().__init__(address, ReviewHandler)
        self.data = data
        self.closing = ExitStack()  # the output's lock, released when the server closes
        self.token = secrets.token_urlsafe(24)
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/?token={self.token}"
        self.hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", shown)}
        # Bound to another address (--host), the page is reached by names this server cannot
        # know: the token alone guards it there.
        self.loopback = host in ("127.0.0.1", "::1", "localhost")
        data["review"] = {
            "token": self.token,
            "endpoint": "/api/review",
            "reviewed": 0,
            "output": "",
            "order": data["review"]["order"] if data.get("review") else "input",
        }

    def attach(self, reviews: Reviews) -> None:
        """Serve `reviews`: the page shows what they already hold."""
        self.reviews = reviews
        self.data["review"]["output"] = str(reviews.output)
        for response_id in reviews.saved:
            self._sync(response_id)
        self.data["review"]["reviewed"] = len(reviews.saved)

    def server_close(self) -> None:
        super().server_close()
        self.closing.close()

    def _sync(self, response_id: str) -> dict:
        """Put one response's review columns into the page's rows; returns them."""
        values = self.reviews.row(response_id)
        row = self.reviews.row_of[response_id]
        columns = self.data["rows"]["columns"]
        for column, value in values.items():
            columns.setdefault(column, [None] * self.data["rows"]["count"])[row] = value
        if "human_first_error" not in self.data["first_error_columns"]:
            self.data["first_error_columns"].append("human_first_error")
        self.data["review"]["reviewed"] = len(self.reviews.saved)
        return values

    def page(self) -> bytes:
        with self.reviews.lock:
            return view.render_page(self.data).encode()


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # the terminal shows the address and saves, not every request
        pass

    def _allowed(self, token: str | None) -> bool:
        """This server's own Host (not a rebound name), no foreign Origin, and the run's token."""
        if self.server.loopback and self.headers.get("Host") not in self.server.hosts:
            self._reply(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
            return False
        origin = self.headers.get("Origin")
        if origin is not None and origin.removeprefix("http://") not in {*self.server.hosts, self.headers.get("Host")}:
            self._reply(HTTPStatus.FORBIDDEN, {"error": "requests from other sites are refused"})
            return False
        if token is None or not hmac.compare_digest(token.encode(), self.server.token.encode()):
            self._reply(
                HTTPStatus.FORBIDDEN, {"error": "missing or wrong token: open the address prmtool review printed"}
            )
            return False
        return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        token = parse_qs(url.query).get("token", [None])[0] or self.headers.get(TOKEN_HEADER)
        if url.path not in ("/", "/api/reviews"):
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"{url.path}: not found"})
            return
        if not self._allowed(token):
            return
        if url.path == "/":
            self._send(HTTPStatus.OK, self.server.page(), "text/html; charset=utf-8")
        else:
            with self.server.reviews.lock:
                saved = dict(self.server.reviews.saved)
            self._reply(HTTPStatus.OK, {"reviewed": len(saved), "reviews": saved})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/api/review":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: not found"})
            return
        if not self._allowed(self.headers.get(TOKEN_HEADER)):
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= 1_000_000:
                raise ValueError("expected a JSON body of at most 1 MB")
            change = json.loads(self.rfile.read(length))
            if not isinstance(change, dict) or not isinstance(change.get("response_id"), str):
                raise ValueError("expected {response_id, human_first_error, note} or {response_id, clear: true}")
            reviews = self.server.reviews
            if change.get("clear"):
                reviews.clear(change["response_id"])
            else:
                reviews.set(change["response_id"], change.get("human_first_error"), change.get("note") or "")
        except (ValueError, InputError) as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except OSError as exc:  # a full or read-only disk: the page says the correction was not saved
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"cannot write {exc.filename}: {exc.strerror}"})
            return
        with reviews.lock:
            values = self.server._sync(change["response_id"])
        self._reply(HTTPStatus.OK, {"row": values, "reviewed": len(reviews.saved)})

    def _reply(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, json.dumps(body, default=str).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)


def start(
    inputs: list[str],
    output: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    color: str | None = None,
    compare: str | None = None,
    threshold: float = 0.5,
    page_size: int = 20,
    order: str = "input",
    overwrite: bool = False,
    quiet: bool = True,
) -> ReviewServer:
    """Check the inputs, write or reopen OUT, and bind the server (not yet serving: call
    `serve_forever`, in a thread for a test). Port 0 takes any free port; `.url` says which."""
    if order not in ORDERS:
        raise InputError(f"--order {order!r}: expected one of {', '.join(ORDERS)}")
    pair = view.parse_compare(compare)
    found, frame, color_column = view.open_frame(inputs, color, pair)
    for shard in found:
        check_columns(shard.schema, str(shard.path), required=("response_id", "steps"))
    shards.check_unique_ids(found)
    shards.check_distinct_names(found)
    shards.check_output_dir(output, found, inputs)
    data = view.page_data(
        frame,
        title=f"prmtool review: {', '.join(inputs)}",
        color=color_column,
        compare=pair,
        threshold=threshold,
        page_size=page_size,
        quiet=quiet,
    )
    data["review"] = {"order": order}
    try:
        server = ReviewServer((host, port), data)
    except OSError as exc:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    try:  # one session per output: a second `prmtool review` into it fails at once
        sources = [shard.describe() for shard in found]
        server.closing.enter_context(outputs.output_lock([output], outputs.run_key(STAGE, server.token, sources)))
        server.attach(Reviews(found, frame, output, overwrite))
    except BaseException:
        server.server_close()
        raise
    return server


def _has_display() -> bool:
    """A browser can be opened here: not a headless Linux machine (no X or Wayland display)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


EXAMPLES = """\b
Examples:
  prmtool review data_samples/gsm8k/labeled -o work/reviewed
  prmtool review work/pb-labeled -o work/pb-reviewed --order disagreement --compare first_error,human_first_error
  prmtool review work/labeled -o work/reviewed --order threshold --threshold 0.5 --port 8800
  prmtool eval work/reviewed --truth human_first_error --pred first_error
  prmtool export work/reviewed -o work/prm --format trl-stepwise
"""


def command(
    inputs: Inputs,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output directory: the input's shards with the corrections.")
    ],
    port: Annotated[int, typer.Option(help="Port to serve on (0: any free port).", min=0, max=65535)] = 8765,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; anything but 127.0.0.1 lets other machines reach the page."),
    ] = "127.0.0.1",
    order: Annotated[
        str,
        typer.Option(
            help="Which responses come first: input (as stored), disagreement (where the first-error columns "
            "differ; with --compare, where that pair does) or threshold (a step MC value closest to --threshold)."
        ),
    ] = "input",
    color: view.Color = None,
    compare: view.Compare = None,
    threshold: view.Threshold = 0.5,
    page_size: view.PageSize = 20,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser (never opened without a display).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Start over: replace what OUT holds, the reviews saved there included."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Serve the view page on this machine to correct first errors by hand: click the first
    wrong step of a response (or 'no error'), add a note, save. Each correction goes at once
    into OUT, a shard set with every input column plus human_first_error, review_note,
    reviewed_at, and step_labels redrawn from the person's first error on the reviewed rows;
    run it again to carry on. Ctrl-C stops the server."""
    server = start(
        inputs,
        output,
        host=host,
        port=port,
        color=color,
        compare=compare,
        threshold=threshold,
        page_size=page_size,
        order=order,
        overwrite=overwrite,
        quiet=quiet,
    )
    log = RunStats("review", quiet=False)
    rows, reviewed = len(server.reviews.row_of), len(server.reviews.saved)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warn(f"listening on {host}: anyone who can reach it and has the token can change {output}")
    with server:
        log.log(f"reviewing {rows:,} responses ({reviewed:,} already reviewed); corrections go to {output}")
        log.log(f"open {server.url}")
        log.log("Ctrl-C stops the server")
        if not no_browser and _has_display():
            import webbrowser

            webbrowser.open(server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    log.log(f"stopped: {len(server.reviews.saved):,} of {rows:,} responses reviewed, saved in {output}")
