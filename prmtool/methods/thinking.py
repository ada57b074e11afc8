"""Reasoning-model traces: a thinking block, then a written solution.

A trace is recognised by its tags: `<think>...</think>` (DeepSeek-R1, QwQ, Qwen3), or
`<|begin_of_thought|>...<|end_of_thought|>` followed by
`<|begin_of_solution|>...<|end_of_solution|>` (Sky-T1, Bespoke-Stratos), or a pair given with
`--think-tags OPEN,CLOSE`. The opening tag may be missing from the response: a thinking model's
chat template often puts it at the end of the generation prompt, so the response starts inside
the thinking (`opened`). A trace whose thinking never closes was cut off: all of it is thinking.

`split_trace` is the `--split think` splitter. It stays lossless with the one separator of the
blank-line split, "\\n\\n": the response is first cut into paragraphs at blank lines, and a
step is a run of whole paragraphs joined by the same "\\n\\n" they were cut at, so
`"\\n\\n".join(steps) == response` whatever is merged. The thinking's paragraphs are merged
into steps of at least `min_step_tokens`; the paragraph holding the closing tag ends the last
thinking step; the solution is cut as a blank-line response is. No step ends inside a LaTeX
display (`$$...$$`, `\\[...\\]`, `\\begin{...}...\\end{...}`) or a code block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prmtool.core.errors import InputError
from prmtool.methods.steps import make_splitter, split_steps


@dataclass(frozen=True)
class ThinkTags:
    open: str
    close: str
    solution_open: str | None = None  # a solution between its own tags (Sky-T1's format)
    solution_close: str | None = None


KNOWN_TAGS = (
    ThinkTags("<think>", "</think>"),
    ThinkTags("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"),
)

# Chosen on 80 Sky-T1 traces (data_samples/long-cot, 900 to 39,000 tokens): a median of 28
# steps, 15 of them thinking, 76 traces within 10 to 40 (tests/test_thinking.py pins these).
DEFAULT_MIN_STEP_TOKENS = 200
DEFAULT_MAX_STEPS = 40

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Words and single symbols: a count that needs no tokenizer (import runs without a model).
    On the 80 traces of data_samples/long-cot, SmolLM2's BPE tokenizer gives a median 1.19
    times as many tokens (0.99 to 1.80)."""
    return len(_TOKEN.findall(text))


def parse_think_tags(spec: str | None) -> tuple[ThinkTags, ...]:
    """`--think-tags OPEN,CLOSE`: that pair alone; none: the known ones."""
    if spec is None:
        return KNOWN_TAGS
    open_tag, sep, close_tag = spec.partition(",")
    if not sep or not open_tag.strip() or not close_tag.strip() or "," in close_tag:
        raise InputError(f"--think-tags {spec!r}: expected OPEN,CLOSE, e.g. '<think>,</think>'")
    return (ThinkTags(open_tag.strip(), close_tag.strip()),)


@dataclass(frozen=True)
class Thinking:
    """Where a trace's thinking is: `text[:end]` holds it, `solution` is what follows."""

    tags: ThinkTags
    end: int  # the thinking is text[:end] (its closing tag and the rest of that paragraph)
    closed: bool
    solution: str  # the written solution, its own tags removed; "" when there is none
    finished: bool  # the thinking closed and a complete solution followed


def find_thinking(text: str, tags: tuple[ThinkTags, ...] = KNOWN_TAGS, opened: bool = False) -> Thinking | None:
    """The thinking of a trace, or None for a response without one. `opened`: the response
    starts inside the thinking (its opening tag was in the prompt)."""
    chosen = next((t for t in tags if t.open in text or t.close in text), None)
    if chosen is None:
        if not opened:
            return None
        return Thinking(tags[0], len(text), False, "", False)
    close = text.find(chosen.close, max(0, text.find(chosen.open)))
    if close < 0:  # cut off while thinking
        return Thinking(chosen, len(text), False, "", False)
    after = close + len(chosen.close)
    cut = text.find("\n\n", after)
    rest = text[cut + 2 :] if cut >= 0 else ""
    if cut < 0 or not rest.strip():
        end, rest = len(text), text[after:]  # no blank line after the tag: one last step holds both
    else:
        end = cut
    solution = text[after:]
    complete = bool(solution.strip())
    if chosen.solution_open is not None and chosen.solution_open in solution:
        complete = chosen.solution_close in solution.split(chosen.solution_open, 1)[1]
        solution = solution.split(chosen.solution_open, 1)[1].split(chosen.solution_close, 1)[0]
    return Thinking(chosen, end, True, solution.strip(), complete)


def solution_text(text: str | None, tags: tuple[ThinkTags, ...] = KNOWN_TAGS, opened: bool = False) -> str | None:
    """What verify reads: the solution of a finished trace, None for an unfinished one, the
    whole text of a response without thinking."""
    if text is None:
        return None
    thinking = find_thinking(text, tags, opened)
    if thinking is None:
        return text
    return thinking.solution if thinking.finished else None


@dataclass(frozen=True)
class ThinkSplit:
    """The settings of `--split think`."""

    min_step_tokens: int = DEFAULT_MIN_STEP_TOKENS
    max_steps: int | None = DEFAULT_MAX_STEPS
    tags: tuple[ThinkTags, ...] = KNOWN_TAGS
    opened: bool = False


def think_split_of(settings) -> ThinkSplit:
    """From a stage's settings (import's, generate's: `TraceSettings`)."""
    return ThinkSplit(
        settings.min_step_tokens, settings.max_steps, parse_think_tags(settings.think_tags), settings.thinking_opened
    )


@dataclass
class Trace:
    steps: list[str]
    thinking_steps: int  # leading steps that are thinking
    finished: bool | None  # None: not a reasoning trace
    thinking: Thinking | None = field(default=None, repr=False)


def split_trace(text: str, settings: ThinkSplit = ThinkSplit()) -> Trace:
    """The steps of a response, and how many of them are thinking (module docstring)."""
    thinking = find_thinking(text, settings.tags, settings.opened)
    if thinking is None:
        return Trace(merge_paragraphs(_paragraphs(text), 0, None), 0, None)
    rest = text[thinking.end + 2 :] if thinking.end < len(text) else ""
    most = None if settings.max_steps is None else max(1, settings.max_steps - 1)  # one step at least thinks
    solution = _solution_steps(_paragraphs(rest), thinking.tags, most) if rest else []
    # --max-steps counts the whole trace
    room = None if settings.max_steps is None else max(1, settings.max_steps - len(solution))
    thought = merge_paragraphs(_paragraphs(text[: thinking.end]), settings.min_step_tokens, room)
    return Trace(thought + solution, len(thought), thinking.finished, thinking)


def _solution_steps(paragraphs: list[str], tags: ThinkTags, max_steps: int | None) -> list[str]:
    """The solution's paragraphs as steps, a paragraph that is only the solution's own opening
    tag joined to the next one and its closing tag to the one before (a step that is a tag
    alone has nothing to label); past `max_steps`, the shortest neighbours merge."""
    merged: list[str] = []
    join_next = False
    for paragraph in paragraphs:
        if merged and (join_next or paragraph.strip() == tags.solution_close):
            merged[-1] += "\n\n" + paragraph
        else:
            merged.append(paragraph)
        join_next = tags.solution_open is not None and paragraph.strip() == tags.solution_open
    return merge_paragraphs(merged, 0, max_steps)


def _paragraphs(text: str) -> list[str]:
    return split_steps(text, make_splitter("blank-line"))


# What opens or closes a display or code block; a step may end only where all are closed.
_FENCE = re.compile(r"```")
_DOLLARS = re.compile(r"(?<!\\)\$\$")
_BRACKET_OPEN = re.compile(r"(?<!\\)\\\[")
_BRACKET_CLOSE = re.compile(r"(?<!\\)\\\]")
_BEGIN = re.compile(r"\\begin\{")
_END = re.compile(r"\\end\{")


@dataclass
class _Blocks:
    code: bool = False
    dollars: bool = False
    brackets: int = 0
    environments: int = 0

    def read(self, paragraph: str) -> None:
        for piece_number, piece in enumerate(_FENCE.split(paragraph)):
            if piece_number:
                self.code = not self.code
            if self.code:
                continue  # LaTeX inside code is code
            if len(_DOLLARS.findall(piece)) % 2:
                self.dollars = not self.dollars
            self.brackets = max(
                0, self.brackets + len(_BRACKET_OPEN.findall(piece)) - len(_BRACKET_CLOSE.findall(piece))
            )
            self.environments = max(0, self.environments + len(_BEGIN.findall(piece)) - len(_END.findall(piece)))

    @property
    def closed(self) -> bool:
        return not (self.code or self.dollars or self.brackets or self.environments)


def merge_paragraphs(paragraphs: list[str], min_tokens: int, max_steps: int | None) -> list[str]:
    """Runs of paragraphs joined by "\\n\\n": each of at least `min_tokens` (the last one may be
    merged into the one before it), none ending inside a display or code block; then, while
    there are more than `max_steps`, the two neighbours that are shortest together merge."""
    groups: list[list[str]] = []
    current: list[str] = []
    tokens = 0
    blocks = _Blocks()
    for paragraph in paragraphs:
        current.append(paragraph)
        tokens += count_tokens(paragraph)
        blocks.read(paragraph)
        if tokens >= min_tokens and blocks.closed:
            groups.append(current)
            current, tokens = [], 0
    if current:
        if groups and (tokens < min_tokens or not blocks.closed):
            groups[-1] += current
        else:
            groups.append(current)
    if max_steps is not None and len(groups) > max(1, max_steps):
        groups = _merge_shortest(groups, [sum(count_tokens(p) for p in group) for group in groups], max(1, max_steps))
    return ["\n\n".join(group) for group in groups]


def _merge_shortest(groups: list[list[str]], sizes: list[int], max_steps: int) -> list[list[str]]:
    """Merge the two neighbours with the fewest tokens together (the leftmost pair on a tie)
    until `max_steps` are left: a heap of neighbour pairs over a linked list, so a trace of
    thousands of paragraphs costs n log n, not n squared."""
    import heapq

    count = len(groups)
    alive = [True] * count
    after, before = list(range(1, count + 1)), list(range(-1, count - 1))
    pairs = [(sizes[i] + sizes[i + 1], i, i + 1) for i in range(count - 1)]
    heapq.heapify(pairs)
    left = count
    while left > max_steps and pairs:
        total, first, second = heapq.heappop(pairs)
        if not (alive[first] and alive[second] and after[first] == second and sizes[first] + sizes[second] == total):
            continue  # a pair that an earlier merge changed
        groups[first] += groups[second]
        sizes[first] = total
        alive[second] = False
        after[first] = after[second]
        if after[second] < count:
            before[after[second]] = first
        left -= 1
        if before[first] >= 0:
            heapq.heappush(pairs, (sizes[before[first]] + total, before[first], first))
        if after[first] < count:
            heapq.heappush(pairs, (total + sizes[after[first]], first, after[first]))
    return [group for group, kept in zip(groups, alive) if kept]


def prompt_opens_thinking(prompt_text: str, tags: tuple[ThinkTags, ...] = KNOWN_TAGS) -> ThinkTags | None:
    """The tags whose opening one ends a generation prompt (a thinking model's chat template
    opens the thinking for the model), or None."""
    tail = prompt_text.rstrip()
    return next((t for t in tags if tail.endswith(t.open)), None)


def trace_columns(responses: list[str | None], settings: ThinkSplit) -> dict[str, list]:
    """`steps`, `thinking_steps` and `finished` of each response, for a frame."""
    traces = [split_trace(text, settings) if text is not None else None for text in responses]
    return {
        "steps": [None if t is None else t.steps for t in traces],
        "thinking_steps": [None if t is None else t.thinking_steps for t in traces],
        "finished": [None if t is None else t.finished for t in traces],
    }


def thinking_of_given_steps(steps: list[str], text: str, settings: ThinkSplit) -> tuple[int | None, bool | None]:
    """`thinking_steps` and `finished` of a response that came with its own steps: the steps up
    to the one that holds the end of the thinking are thinking. None, None: no tags to tell."""
    thinking = find_thinking(text, settings.tags, settings.opened)
    if thinking is None:
        return None, None
    end, count = 0, 0
    for step in steps:
        if end >= thinking.end:
            break
        end += len(step) + 2
        count += 1
    return count, thinking.finished


def known_traces(frame) -> list[int | None] | None:
    """Each row's `thinking_steps` where the row is a known trace (`finished` not null), for
    rollouts: a row whose thinking has no tags to continue (DeltaBench's sections) is rolled
    out and read as a plain response. None for a frame without the columns."""
    if "thinking_steps" not in frame.columns:
        return None
    finished = frame["finished"].to_list() if "finished" in frame.columns else [None] * frame.height
    return [t if f is not None else None for t, f in zip(frame["thinking_steps"].to_list(), finished)]


def check_steps_column(which: str, columns) -> None:
    """`--steps thinking|solution` reads `thinking_steps`: without it, say so instead of
    silently working on every step or on none."""
    if which != "all" and "thinking_steps" not in columns:
        raise InputError(
            f"--steps {which} needs a 'thinking_steps' column: import or generate the responses with --split think"
        )


def step_window(which: str, n_steps: int, thinking_steps: int | None) -> tuple[int, int]:
    """`--steps`: the steps [first, last) a stage works on. A response without thinking has no
    thinking steps and is all solution."""
    thinking = min(thinking_steps or 0, n_steps)
    if which == "thinking":
        return 0, thinking
    if which == "solution":
        return thinking, n_steps
    return 0, n_steps
