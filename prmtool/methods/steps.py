"""Lossless step splitting.

`separator.join(split_steps(text, splitter)) == text` for every text and splitter, and no step
is empty or whitespace only: such a piece is glued to its neighbour together with the separator,
so no byte is lost (a text that is all whitespace stays one step). A rollout from step i
continues `prompt + separator.join(steps[:i]) + separator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from prmtool.core.errors import InputError

# A --split regex: pattern may backtrack catastrophically (`(a|aa)+$`) and never finish: each
# split runs under a time limit, generous for the text's length (the `regex` module's own):
# a plain pattern splits a megabyte in milliseconds.
SPLIT_SECONDS = 1.0
SPLIT_SECONDS_PER_MB = 10.0


@dataclass(frozen=True)
class Splitter:
    name: str
    separator: str  # the exact text between two steps
    boundary: regex.Pattern  # matches exactly `separator` wherever a new step begins...
    opens_step: bool = False  # ...or, when True, matches the text that opens a new step


def make_splitter(spec: str) -> Splitter:
    if spec == "blank-line":
        return Splitter(spec, "\n\n", regex.compile(regex.escape("\n\n")))
    if spec == "think":
        # Reasoning traces (prmtool.methods.thinking): runs of whole paragraphs, joined by the
        # blank lines they were cut at, so the separator is the blank-line split's.
        return Splitter(spec, "\n\n", regex.compile(regex.escape("\n\n")))
    if spec == "line":
        return Splitter(spec, "\n", regex.compile(regex.escape("\n")))
    if spec == "step-k":
        return Splitter(spec, "\n", regex.compile(r"\n(?=[ \t]*Step \d+\s*:)"))
    if spec.startswith("regex:"):
        pattern = spec.removeprefix("regex:")
        try:
            compiled = regex.compile(pattern)
        except (regex.error, ValueError) as exc:
            raise InputError(f"--split {spec!r}: invalid regular expression: {exc}") from None
        # The matched text opens the new step; nothing stands between steps.
        return Splitter(spec, "", compiled, opens_step=True)
    raise InputError(f"--split {spec!r}: expected blank-line, line, step-k, think or regex:PATTERN")


def split_steps(text: str, splitter: Splitter) -> list[str]:
    if splitter.name == "think":
        from prmtool.methods.thinking import split_trace  # its default settings; import and generate pass theirs

        return split_trace(text).steps
    pieces: list[str] = []
    start = 0
    limit = SPLIT_SECONDS + SPLIT_SECONDS_PER_MB * len(text) / 1e6
    try:
        for match in splitter.boundary.finditer(text, timeout=limit):
            pieces.append(text[start : match.start()])
            start = match.start() if splitter.opens_step else match.end()
    except TimeoutError:
        raise InputError(
            f"--split {splitter.name!r}: the pattern ran past {limit:.0f} s on one text of {len(text):,} characters; "
            "it backtracks without end (nested or overlapping repeats such as (a|aa)+): write it without"
        ) from None
    pieces.append(text[start:])
    return _merge_blank(pieces, splitter.separator)


def _merge_blank(pieces: list[str], separator: str) -> list[str]:
    """Glue blank pieces to the next step (or the previous one, at the end), separator kept."""
    steps: list[str] = []
    pending = ""  # blank pieces waiting for the next real step, with their separators
    for piece in pieces:
        if piece.strip():
            steps.append(pending + piece)
            pending = ""
        else:
            pending += piece + separator
    if pending:
        if steps:
            # `pending` ends with one separator too many: the join already puts one before it.
            steps[-1] += separator + pending[: len(pending) - len(separator)]
        elif pending[: len(pending) - len(separator)]:
            steps.append(pending[: len(pending) - len(separator)])
    return steps


def rollout_prefix(steps: list[str], separator: str) -> str:
    """The text a rollout continues after `steps`: `join(steps) + sep`, empty for no steps."""
    return separator.join(steps) + separator if steps else ""
