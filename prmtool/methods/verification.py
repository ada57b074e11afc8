"""Outcome verification: extract a response's final answer and compare it with the gold
answer by mathematical equivalence (Math-Verify), never by string equality.

Math-Verify's own timeouts use SIGALRM, which works only in a process's main thread, and some
inputs hang in C code where no signal reaches. So comparisons run in worker processes (pebble),
in chunks for speed; a chunk that overruns is killed and its items are retried one by one,
each under its own hard timeout, so one hanging answer costs one timeout and stalls nothing.
"""

from __future__ import annotations

import atexit
import re
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

import polars as pl

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?i)\bthe (?:final )?answer is\s*:?\s*([^\n]+)")
_HASHES = re.compile(r"####\s*([^\n]+)")
_A_LINE = re.compile(r"(?m)^[ \t]*A:[ \t]*([^\n]+)")  # not \s*: across blank lines it is quadratic
_BRACE = re.compile(r"[{}]")
_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str | None) -> str | None:
    """The final answer of a solution: the last `\\boxed{...}`, else whichever of
    `The answer is X`, `#### X` or a GSM8K `A: X` line comes last. None when there is none."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    candidates = [m for pattern in (_ANSWER_IS, _HASHES, _A_LINE) for m in pattern.finditer(text)]
    if not candidates:
        return None
    last = max(candidates, key=lambda m: m.start(1))
    return _clean_text_answer(last.group(1))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close, nested braces balanced.

    One pass pairs every brace of the text (a stack), so the time is linear in the text: a
    response of 20,000 unclosed boxes costs one pass, not one scan to the end per box."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}  # position just after an opening brace -> its closing brace
    open_braces: list[int] = []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.end())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    for start in reversed(starts):
        if start in closing:
            return text[start : closing[start]]
    return None


def _clean_text_answer(answer: str) -> str | None:
    """`$1,234.50 dollars.` -> `1,234.50`: plain-text answers carry units and punctuation that
    Math-Verify would read as symbols. LaTeX answers are left alone."""
    answer = answer.strip().rstrip(".").strip()
    if answer.startswith("\\boxed"):
        return last_boxed(answer)
    if "\\" not in answer and re.search(r"[A-Za-z$%]", answer):
        number = _NUMBER.search(answer)
        if number:
            return number.group(0).rstrip(",")
    return answer or None


@dataclass(frozen=True)
class Verdict:
    correct: bool
    status: str  # ok | no_answer | timeout | error


@lru_cache(maxsize=65536)
def _parsed(answer: str, timeout: int):
    from math_verify import parse

    return parse(f"${answer}$", parsing_timeout=timeout, raise_on_error=True)


def compare(gold: str, pred: str, timeout: int = 5) -> Verdict:
    """Gold first, prediction second: Math-Verify is asymmetric. Runs in the calling process."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if gold.strip() == pred.strip():
        return Verdict(True, "ok")  # identical text is equal; saves a sympy round trip
    try:
        return Verdict(
            bool(verify(_parsed(gold, timeout), _parsed(pred, timeout), timeout_seconds=timeout, raise_on_error=True)),
            "ok",
        )
    except TimeoutException:
        return Verdict(False, "timeout")
    except Exception:
        return Verdict(False, "error")


def _verdict(gold: str | None, pred: str | None, timeout: int) -> Verdict:
    if pred is None:
        return Verdict(False, "no_answer")
    if gold is None or not str(gold).strip():
        return Verdict(False, "error")
    return compare(gold, pred, timeout)


def _compare_chunk(
    pairs: list[tuple[str | None, str | None]], timeout: int, extract: bool = False
) -> list[tuple[str | None, Verdict]]:
    """(answer, verdict) for each (gold, pred) pair; with `extract`, each pair holds a whole
    response and its answer is extracted here, inside the worker's timeout."""
    results = []
    for gold, text in pairs:
        pred = extract_answer(text) if extract else text
        results.append((pred, _verdict(gold, pred, timeout)))
    return results


def verify_answers(
    pairs: list[tuple[str | None, str | None]],
    timeout: float = 5.0,
    workers: int = 2,
    chunk_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> list[Verdict]:
    """Verdicts for (gold, pred) pairs, in order. A missing pred is `no_answer`, a missing
    gold is `error`; everything else goes through Math-Verify in worker processes."""
    return [verdict for _, verdict in _in_workers(pairs, False, timeout, workers, chunk_size, on_progress)]


def _in_workers(
    pairs: list[tuple[str | None, str | None]],
    extract: bool,
    timeout: float,
    workers: int,
    chunk_size: int,
    on_progress: Callable[[int], None] | None,
) -> list[tuple[str | None, Verdict]]:
    results: list[tuple[str | None, Verdict] | None] = [None] * len(pairs)
    todo: list[int] = []
    for index, (gold, text) in enumerate(pairs):
        if text is None or (extract and not text.strip()):
            results[index] = (None, Verdict(False, "no_answer"))
        elif not extract and (gold is None or not str(gold).strip() or gold.strip() == text.strip()):
            results[index] = (text, _verdict(gold, text, 1))  # decided without Math-Verify
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
    retry: list[int] = []
    for chunk, future in zip(chunks, futures):
        try:
            for index, result in zip(chunk, future.result()):
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
        unread = None if extract else pairs[index][1]
        try:
            results[index] = future.result()[0]
        except FutureTimeout:
            results[index] = (unread, Verdict(False, "timeout"))
        except Exception:
            results[index] = (unread, Verdict(False, "error"))
        if on_progress:
            on_progress(1)
    return results  # type: ignore[return-value]


_POOLS: dict[int, object] = {}


def _shared_pool(workers: int):
    """One worker pool per size for the whole process: labeling verifies rollouts every round,
    and starting processes (and re-parsing gold answers in fresh caches) each time would cost
    more than the comparisons. A worker killed on a timeout is replaced by pebble."""
    from pebble import ProcessPool

    if workers not in _POOLS:
        # Each worker loads Math-Verify (and sympy) before its first task: pebble's timeouts
        # count from a task's start, and an import that a busy machine stretches past the
        # timeout would otherwise turn a fresh worker's first comparisons into `timeout`.
        pool = ProcessPool(max_workers=workers, initializer=_load_math_verify)
        atexit.register(_stop_pool, pool)
        _POOLS[workers] = pool
    return _POOLS[workers]


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
) -> tuple[list[str | None], list[Verdict]]:
    """Extract each response's answer and verify it against its reference. Extraction runs in
    the workers too, under the same timeout: no response, however hostile, stalls the stage."""
    golds = [None if g is None else str(g) for g in references]
    results = _in_workers(list(zip(golds, responses)), True, timeout, workers, chunk_size, on_progress)
    return [pred for pred, _ in results], [verdict for _, verdict in results]


def verify_rows(
    frame: pl.DataFrame, timeout: float = 5.0, workers: int = 2, on_progress: Callable[[int], None] | None = None
) -> pl.DataFrame:
    """Adds `pred_answer`, `correct` and `verify_status`; every input row and column stays."""
    predictions, verdicts = verify_responses(
        frame["response"].to_list(),
        frame["reference_answer"].cast(pl.String).to_list(),
        timeout=timeout,
        workers=workers,
        on_progress=on_progress,
    )
    return frame.with_columns(
        pl.Series("pred_answer", predictions, dtype=pl.String),
        pl.Series("correct", [v.correct for v in verdicts], dtype=pl.Boolean),
        pl.Series("verify_status", [v.status for v in verdicts], dtype=pl.String),
    )
