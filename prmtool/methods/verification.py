"""Outcome verification: extract a response's final answer (`prmtool.methods.answers`) and
compare it with the gold answer by mathematical equivalence (Math-Verify), never by string
equality; when the plain forms differ, once more in the forms a grader reads (units, percent,
`x = 5`, intervals) and, for a reference that lists several answers, as sets.

Math-Verify's own timeouts use SIGALRM, which works only in a process's main thread, and some
inputs hang in C code where no signal reaches. So comparisons run in worker processes (pebble),
in chunks for speed; a chunk that overruns is killed and its items are retried one by one,
each under its own hard timeout, so one hanging answer costs one timeout and stalls nothing.
"""

from __future__ import annotations

import atexit
import re
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_for
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

import polars as pl

from prmtool.methods.answers import (
    EXTRACT_MODES,
    Answer,
    answer_list,
    equivalent_forms,
    extract_answer,
    find_answer,
    last_boxed,
    split_top_level,
)
from prmtool.methods.thinking import KNOWN_TAGS, ThinkTags, solution_text

__all__ = ["EXTRACT_MODES", "Verdict", "compare", "extract_answer", "last_boxed", "verify_answers", "verify_responses"]


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: str  # ok | no_answer | no_reference | timeout | error


@lru_cache(maxsize=65536)
def _parsed(answer: str, timeout: int):
    from math_verify import parse

    return parse(f"${answer}$", parsing_timeout=timeout or None, raise_on_error=True)  # 0: no alarm


def compare(gold: str, pred: str, timeout: int = 5) -> Verdict:
    """Gold first, prediction second: Math-Verify is asymmetric. Runs in the calling process.
    The plain forms first; when they differ, the forms a grader reads; a reference listing
    several answers matches a prediction holding the same answers in any order."""
    golds = answer_list(gold)
    if golds is not None:
        preds = split_top_level(pred)
        if len(preds) != len(golds):
            return Verdict(False, "ok")
        unmatched = list(preds)
        for item in golds:
            match = next((p for p in unmatched if _equal(item, p, timeout).correct), None)
            if match is None:
                return Verdict(False, "ok")
            unmatched.remove(match)
        return Verdict(True, "ok")
    return _equal(gold, pred, timeout)


def _equal(gold: str, pred: str, timeout: int) -> Verdict:
    verdict = _math_verify(gold, pred, timeout)
    if verdict.correct or verdict.status == "timeout":
        return verdict
    gold_form, pred_form = equivalent_forms(gold), equivalent_forms(pred)
    if (gold_form, pred_form) == (gold.strip(), pred.strip()):
        return verdict
    again = _math_verify(gold_form, pred_form, timeout)
    return again if again.correct or verdict.status != "ok" else verdict


def _math_verify(gold: str, pred: str, timeout: int) -> Verdict:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if gold.strip() == pred.strip():
        return Verdict(True, "ok")  # identical text is equal; saves a sympy round trip
    try:
        return Verdict(
            bool(
                verify(
                    _parsed(gold, timeout), _parsed(pred, timeout), timeout_seconds=timeout or None, raise_on_error=True
                )
            ),
            "ok",
        )
    except TimeoutException:
        return Verdict(False, "timeout")
    except Exception:
        return Verdict(False, "error")


def _verdict(gold: str | None, pred: str | None, timeout: int) -> Verdict:
    if gold is None or not str(gold).strip():
        return Verdict(False, "no_reference")  # a problem imported without its answer
    if pred is None:
        return Verdict(False, "no_answer")
    return compare(gold, pred, timeout)


def _compare_chunk(
    pairs: list[tuple[str | None, str | None]], timeout: int, extract: str | None = None
) -> list[tuple[Answer, Verdict]]:
    """(answer, verdict) for each (gold, pred) pair; with `extract` (a mode of EXTRACT_MODES),
    each pair holds a whole response and its answer is extracted here, inside the worker's
    timeout."""
    results = []
    for gold, text in pairs:
        answer = find_answer(text, gold, extract) if extract else Answer(text, None)
        if extract == "cascade" and answer.text is None and gold is not None and str(gold).strip():
            found = _math_verify_reading(gold, text, timeout)
            if found is not None:
                results.append(found)
                continue
        results.append((answer, _verdict(gold, answer.text, timeout)))
    return results


_ENDS_AS_WRITTEN = re.compile(r"(?:[.!?]|\$|\\\]|\\\))[*\s]*$")


def _math_verify_reading(gold: str, text: str, timeout: int) -> tuple[Answer, Verdict] | None:
    """The cascade's last resort, when it found no answer: Math-Verify's own extraction over the
    whole text (its last LaTeX or plain expression), taken only when Math-Verify finds it equal
    to the reference, and only from a text that ends as a sentence or a formula ends: a
    response cut off mid-computation ("He sprints 3*3=9 times") states no answer and stays
    `no_answer`, and no wrong answer is read into one that stated none. None otherwise."""
    from math_verify import parse, verify

    if not _ENDS_AS_WRITTEN.search(text):
        return None
    try:
        parsed = parse(text, parsing_timeout=timeout or None, raise_on_error=True)
        if len(parsed) < 2 or not str(parsed[1]).strip():
            return None
        right = verify(_parsed(gold, timeout), parsed, timeout_seconds=timeout or None, raise_on_error=True)
    except Exception:  # a timeout or a parse error: nothing read
        return None
    return (Answer(str(parsed[1]).strip(), "math_verify"), Verdict(True, "ok")) if right else None


def verify_answers(
    pairs: list[tuple[str | None, str | None]],
    timeout: float = 5.0,
    workers: int = 2,
    chunk_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> list[Verdict]:
    """Verdicts for (gold, pred) pairs, in order. A missing pred is `no_answer`, a missing
    gold is `no_reference`; everything else goes through Math-Verify in worker processes."""
    return [verdict for _, verdict in _in_workers(pairs, None, timeout, workers, chunk_size, on_progress)]


def _in_workers(
    pairs: list[tuple[str | None, str | None]],
    extract: str | None,
    timeout: float,
    workers: int,
    chunk_size: int,
    on_progress: Callable[[int], None] | None,
) -> list[tuple[Answer, Verdict]]:
    results: list[tuple[Answer, Verdict] | None] = [None] * len(pairs)
    todo: list[int] = []
    for index, (gold, text) in enumerate(pairs):
        if text is None or (extract and not text.strip()):
            results[index] = (Answer(None, None), Verdict(False, "no_answer"))
        elif not extract and (gold is None or not str(gold).strip() or gold.strip() == text.strip()):
            results[index] = (Answer(text, None), _verdict(gold, text, 1))  # decided without Math-Verify
        else:
            todo.append(index)
    if on_progress:
        on_progress(len(pairs) - len(todo))
    if not todo:
        return results  # type: ignore[return-value]

    signal_timeout = max(1, int(round(timeout)))  # SIGALRM counts whole seconds
    hard_timeout = timeout + 2.0  # the backstop for hangs no signal interrupts
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    pool = _shared_pool(max(1, workers))
    futures = [
        pool.schedule(
            _compare_chunk,
            args=([pairs[i] for i in chunk], signal_timeout, extract),
            timeout=hard_timeout + 0.05 * len(chunk),
        )
        for chunk in chunks
    ]
    try:
        return _collect(pairs, extract, results, chunks, futures, pool, signal_timeout, hard_timeout, on_progress)
    except BaseException:  # Ctrl-C, or the waits abandoned: the workers drop this call's comparisons
        for future in futures:
            future.cancel()
        raise


def _collect(pairs, extract, results, chunks, futures, pool, signal_timeout, hard_timeout, on_progress):
    """The chunks' results as they come; a chunk that failed is retried item by item."""
    retry: list[int] = []
    for chunk, future in zip(chunks, futures):
        try:
            for index, result in zip(chunk, _outcome(future)):
                results[index] = result
            if on_progress:
                on_progress(len(chunk))
        except Exception:  # the chunk overran or its worker died: retry its items alone
            retry.extend(chunk)
    singles = [
        (i, pool.schedule(_compare_chunk, args=([pairs[i]], signal_timeout, extract), timeout=hard_timeout))
        for i in retry
    ]
    for index, future in singles:
        unread = Answer(None if extract else pairs[index][1], None)
        try:
            results[index] = _outcome(future)[0]
        except FutureTimeout:
            results[index] = (unread, Verdict(False, "timeout"))
        except Exception:
            results[index] = (unread, Verdict(False, "error"))
        if on_progress:
            on_progress(1)
    return results  # type: ignore[return-value]


# Set while a run unwinds after Ctrl-C or an error: threads waiting on comparisons (label's
# continuous rounds verify on threads) stop waiting, so the run ends at once.
_ABANDONED = threading.Event()
WAIT_SLICE = 0.25  # seconds between looks at _ABANDONED while waiting on a comparison


def _outcome(future):
    """`future.result()`, waited for in slices: a wait in any thread ends when the waits are
    abandoned (KeyboardInterrupt there too), and a Ctrl-C in the main thread ends it at once."""
    while not future.done():
        if _ABANDONED.is_set():
            raise KeyboardInterrupt("verification abandoned")
        wait_for([future], timeout=WAIT_SLICE)
    return future.result()


@contextmanager
def waits_abandoned():
    """Inside: every wait on a comparison, in any thread, gives up (`_outcome`)."""
    _ABANDONED.set()
    try:
        yield
    finally:
        _ABANDONED.clear()


_POOLS: dict[int, object] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(workers: int):
    """One worker pool per size for the whole process: labeling verifies rollouts every round,
    and starting processes (and re-parsing gold answers in fresh caches) each time would cost
    more than the comparisons. A worker killed on a timeout is replaced by pebble."""
    from pebble import ProcessPool

    with _POOLS_LOCK:  # continuous labeling verifies from several threads at once
        if workers not in _POOLS:
            # Each worker loads Math-Verify (and sympy) before its first task: pebble's timeouts
            # count from a task's start, and an import that a busy machine stretches past the
            # timeout would otherwise turn a fresh worker's first comparisons into `timeout`.
            pool = ProcessPool(max_workers=workers, initializer=_start_worker)
            atexit.register(_stop_pool, pool)
            _start_in_a_lasting_thread(pool)
            _POOLS[workers] = pool
        return _POOLS[workers]


def _start_in_a_lasting_thread(pool) -> None:
    """Start the pool's first workers from a thread that lasts as long as the process: a worker
    dies with the thread that forked it (PR_SET_PDEATHSIG), and pebble forks the first ones in
    whichever thread schedules first (later ones in its own manager thread, which lasts as
    long as the pool)."""
    started = threading.Event()

    def start_and_stay() -> None:
        pool.schedule(_no_work)
        started.set()
        threading.Event().wait()

    threading.Thread(target=start_and_stay, name="prmtool-verify-workers", daemon=True).start()
    started.wait()


def _no_work() -> None:
    pass


def _start_worker() -> None:
    """A worker's first acts: die with its parent, and ignore Ctrl-C, which the terminal sends
    to the whole process group: the run's own process handles it (cancelling what it asked of
    the workers), and a comparison cut short in a worker would otherwise read as an `error`
    verdict. Then it loads Math-Verify."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _load_math_verify()


def _die_with_parent() -> None:
    """A parent killed with SIGKILL runs no cleanup, and its workers would go on comparing for as
    long as their task lasts: on Linux the kernel kills them with it (PR_SET_PDEATHSIG);
    elsewhere a thread watches for the parent to go."""
    import os
    import signal

    parent = os.getppid()
    try:
        import ctypes

        set_parent_death_signal = 1  # PR_SET_PDEATHSIG, <linux/prctl.h>
        if ctypes.CDLL(None, use_errno=True).prctl(set_parent_death_signal, signal.SIGKILL) == 0:
            if os.getppid() != parent:  # it died before the signal was set
                os._exit(1)
            return
    except (OSError, AttributeError):  # not Linux
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="prmtool-parent-watch", daemon=True).start()


def start_workers(workers: int) -> None:
    """Start the verifier's worker processes now, if they are not running. Commands call this
    before they load a model: the workers are then forked before the engine starts threads of
    its own (vLLM's), since a process forked from a threaded one can inherit a held lock and
    hang before its first task."""
    _shared_pool(max(1, workers)).schedule(_load_math_verify).result()


def _load_math_verify() -> None:
    """A first comparison, so that every lazily imported module is in place."""
    compare("1/2", "0.5")


def _stop_pool(pool) -> None:
    pool.stop()
    pool.join(timeout=5)


def verify_responses(
    responses: Iterable[str | None],
    references: Iterable[str | None],
    timeout: float = 5.0,
    workers: int = 2,
    chunk_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
    extract: str = "cascade",
) -> tuple[list[Answer], list[Verdict]]:
    """Extract each response's answer and verify it against its reference. Extraction runs in
    the workers too, under the same timeout: no response, however hostile, stalls the stage."""
    if extract not in EXTRACT_MODES:
        raise ValueError(f"extract: expected one of {', '.join(EXTRACT_MODES)}, not {extract!r}")
    golds = [None if g is None else str(g) for g in references]
    results = _in_workers(list(zip(golds, responses)), extract, timeout, workers, chunk_size, on_progress)
    return [answer for answer, _ in results], [verdict for _, verdict in results]


def answer_texts(frame: pl.DataFrame, tags: tuple[ThinkTags, ...] = KNOWN_TAGS) -> list[str | None]:
    """The part of each response that holds its final answer: the solution of a reasoning
    trace, nothing (None) for a trace that did not finish, whatever it boxed while thinking,
    and the whole response otherwise. A trace is known by its tags, or by `thinking_steps`
    and `finished` (a trace whose opening tag was in the prompt may have no tag at all)."""
    thinking = frame["thinking_steps"].to_list() if "thinking_steps" in frame.columns else [None] * frame.height
    finished = frame["finished"].to_list() if "finished" in frame.columns else [None] * frame.height
    texts = []
    for response, thinking_steps, done in zip(frame["response"].to_list(), thinking, finished):
        if done is False:
            texts.append(None)
        else:  # finished null: not known to be a trace (DeltaBench's sections), read as written
            texts.append(solution_text(response, tags, opened=bool(thinking_steps) and done is not None))
    return texts


def verify_rows(
    frame: pl.DataFrame,
    timeout: float = 5.0,
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
    extract: str = "cascade",
    tags: tuple[ThinkTags, ...] = KNOWN_TAGS,
) -> pl.DataFrame:
    """Adds `pred_answer`, `answer_source`, `correct` and `verify_status`; every input row and
    column stays. A reasoning trace's answer is read from its solution alone (`answer_texts`)."""
    answers, verdicts = verify_responses(
        answer_texts(frame, tags),
        frame["reference_answer"].cast(pl.String).to_list(),
        timeout=timeout,
        workers=workers,
        on_progress=on_progress,
        extract=extract,
    )
    return frame.with_columns(
        pl.Series("pred_answer", [a.text for a in answers], dtype=pl.String),
        pl.Series("answer_source", [a.source for a in answers], dtype=pl.String),
        # Without a reference nothing is known: null, not False.
        pl.Series("correct", [None if v.status == "no_reference" else v.correct for v in verdicts], dtype=pl.Boolean),
        pl.Series("verify_status", [v.status for v in verdicts], dtype=pl.String),
    )
