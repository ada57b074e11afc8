"""The rounds of InT's interventions over a frame of responses (docs/algorithms.md,
"Interventions"), each one engine call for every row of the frame:

1. triage: correct responses and those without steps are skipped; the labels' `first_error`
   is used where it names a step (`--first-error auto` or `from-labels`);
2. locate: the model names the first error of the rest (greedy);
3. propose: `candidates` replacement steps per row, each with its own seed;
4. verify: `verify_rollouts` continuations of `steps[:error] + intervention`, checked by the
   project's verifier; a candidate is kept when at least `min_success` reach the answer.

Prompts, parsing and the reasons a candidate is rejected are in `prmtool.methods.interventions`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from prmtool.core.errors import InputError, StageError
from prmtool.methods import interventions as iv
from prmtool.methods.rollouts import Probe, Rollouts, RolloutSettings
from prmtool.methods.steps import rollout_prefix
from prmtool.methods.thinking import KNOWN_TAGS, ThinkTags, check_steps_column, known_traces, step_window

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine

FIRST_ERROR_MODES = ("auto", "from-labels", "model")

# Columns the stage adds. Kept rows have the first seven; rejects have all of them, null where
# they do not apply (a skipped row has no candidate).
KEPT_COLUMNS = {
    "intervention": pl.String,
    "intervention_step": pl.Int32,
    "intervention_success_rate": pl.Float64,
    "guided_response": pl.String,
    "intervene_candidate": pl.Int32,  # which of the row's --candidates proposals (0-based)
    "intervene_first_error": pl.Int32,  # the 0-based first error the proposer was shown
    "intervene_first_error_source": pl.String,  # labels or model
}
REJECT_COLUMNS = {
    **KEPT_COLUMNS,
    # see prmtool.methods.interventions: unparseable, leaks_answer, not_verified, not_wrong, ...
    "intervene_reason": pl.String,
    "intervene_detail": pl.String,  # the reason in words
    "intervene_output": pl.String,  # the model's raw answer (proposal, or first-error answer)
}


@dataclass
class InterventionConfig:
    candidates: int = 4
    verify_rollouts: int = 32
    min_success: int = 1
    first_error: str = "auto"  # auto: the label's first_error where it names a step, else the model
    temperature: float = 0.7
    proposer_max_tokens: int = 1024
    prefill_tag: bool = False  # start the model's answer inside the tag (small models keep the format)
    rollouts: RolloutSettings = field(default_factory=RolloutSettings)
    steps: str = "all"  # --steps: a reasoning trace's first error is intervened on in these steps only
    tags: tuple[ThinkTags, ...] = KNOWN_TAGS


@dataclass
class Outcome:
    """What became of one candidate (or of a row that got none)."""

    row: int
    candidate: int | None = None
    first_error: int | None = None
    source: str | None = None
    content: str | None = None
    step: int | None = None
    success_rate: float | None = None
    guided: str | None = None
    reason: str | None = None  # None: kept
    detail: str | None = None
    output: str | None = None


def _seed(seed: int, *parts: object) -> int:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def _reference_solutions(frame: pl.DataFrame) -> list[str | None]:
    if "reference_solution" in frame.columns:
        return frame["reference_solution"].cast(pl.String).to_list()
    return [None] * frame.height


def _answer_text(prefill: str, completion, stop: str) -> str:
    """The model's whole answer: the prefilled start, the sampled text, and the closing tag the
    stop string cut off (an answer that ended at EOS instead simply will not parse)."""
    if not prefill:
        return completion.text
    return prefill + completion.text + (stop if completion.finish_reason == "stop" else "")


def intervene_rows(
    frame: pl.DataFrame,
    engine: Engine,
    settings: InterventionConfig | None = None,
    separator: str = "\n\n",
    tracker: Tracker | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pure core: responses in; (one row per kept intervention, one row per rejected candidate or
    skipped response) out. Every input row is the source of at least one row of the two."""
    return InterventionRounds(frame, engine, settings or InterventionConfig(), separator, tracker).run()


class InterventionRounds:
    """One frame's rounds; each round adds to `outcomes` (what became of a row or candidate)
    and `first_errors` (row -> (0-based first error, where it came from))."""

    def __init__(
        self, frame: pl.DataFrame, engine: Engine, config: InterventionConfig, separator: str, tracker: Tracker | None
    ) -> None:
        if config.first_error not in FIRST_ERROR_MODES:
            raise InputError(f"--first-error {config.first_error!r}: expected one of {', '.join(FIRST_ERROR_MODES)}")
        if config.first_error == "from-labels" and "first_error" not in frame.columns:
            raise InputError("--first-error from-labels needs a 'first_error' column; run prmtool label first")
        check_steps_column(config.steps, frame.columns)
        self.frame, self.engine, self.config, self.separator, self.tracker = frame, engine, config, separator, tracker
        self.steps = [list(s or []) for s in frame["steps"].to_list()]
        self.problems = frame["problem"].to_list()
        self.references = frame["reference_answer"].cast(pl.String).to_list()
        self.response_ids = frame["response_id"].to_list()
        self.solutions = _reference_solutions(frame)
        self.thinking_steps = (
            frame["thinking_steps"].to_list() if "thinking_steps" in frame.columns else [None] * frame.height
        )
        self.outcomes: list[Outcome] = []
        self.first_errors: dict[int, tuple[int, str]] = {}
        self._chat_ids: dict[str, list[int]] = {}

    def run(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        to_locate = self.triage()
        self.advance(len(self.outcomes), [])
        if to_locate:
            self.locate(to_locate)
        self.keep_to_steps()
        candidates = self.propose()
        self.verify([o for o in candidates if o.reason is None])
        self.advance(len(self.first_errors), [])
        self.outcomes.extend(candidates)

        kept = [o for o in self.outcomes if o.reason is None]
        rejected = [o for o in self.outcomes if o.reason is not None]
        accounted = {o.row for o in self.outcomes}
        if len(accounted) != self.frame.height:
            raise StageError(
                f"internal error: {self.frame.height - len(accounted)} input rows neither kept nor rejected"
            )
        return _rows(self.frame, kept, KEPT_COLUMNS), _rows(self.frame, rejected, REJECT_COLUMNS)

    def advance(self, rows: int, completions) -> None:
        if self.tracker is not None:
            self.tracker.advance(rows, sum(c.num_tokens for samples in completions for c in samples))

    def request(self, message: str, prefill: str, stop: str, seed: int, temperature: float, max_tokens: int):
        from prmtool.engines import SamplingRequest

        if message not in self._chat_ids:
            self._chat_ids[message] = self.engine.chat_prompt_ids(message)
        ids = self.engine.continuation_ids(self._chat_ids[message], prefill) if prefill else self._chat_ids[message]
        return SamplingRequest(
            prompt_ids=ids,
            n=1,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=(stop,) if prefill else (),
            seed=seed,
        )

    def triage(self) -> list[int]:
        """Skip what cannot be intervened on, take the labels' first errors; returns the rows
        whose first error the model must find."""
        frame, config, steps = self.frame, self.config, self.steps
        labels = (
            frame["first_error"].to_list()
            if "first_error" in frame.columns and config.first_error != "model"
            else [None] * frame.height
        )
        to_locate = []
        for row, correct in enumerate(frame["correct"].to_list()):
            label = labels[row]
            if correct:
                self.outcomes.append(Outcome(row, reason=iv.NOT_WRONG, detail="the response is correct"))
            elif not steps[row]:
                self.outcomes.append(Outcome(row, reason=iv.NO_STEPS, detail="the response has no steps"))
            elif label is not None and 0 <= label < len(steps[row]):
                self.first_errors[row] = (label, "labels")
            elif config.first_error == "from-labels":
                detail = (
                    "first_error is null" if label is None else f"first_error is {label}, not a step of the response"
                )
                self.outcomes.append(
                    Outcome(row, first_error=label, source="labels", reason=iv.NO_FIRST_ERROR, detail=detail)
                )
            else:
                to_locate.append(row)
        return to_locate

    def locate(self, to_locate: list[int]) -> None:
        """The first errors the labels do not give, greedy, one call for all rows."""
        steps, seed = self.steps, self.config.rollouts.seed
        prefill = iv.FIRST_ERROR_PREFILL if self.config.prefill_tag else ""
        prompts = [
            iv.locator_prompt(self.problems[r], steps[r], self.references[r], self.solutions[r]) for r in to_locate
        ]
        requests = [
            self.request(
                prompt,
                prefill,
                iv.FIRST_ERROR_STOP,
                _seed(seed, "locate", self.response_ids[row]),
                0.0,
                self.config.proposer_max_tokens,
            )
            for prompt, row in zip(prompts, to_locate)
        ]
        completions = self.engine.sample(requests)
        for row, samples in zip(to_locate, completions):
            text = _answer_text(prefill, samples[0], iv.FIRST_ERROR_STOP)
            located = iv.parse_first_error(text, len(steps[row]))
            if isinstance(located, iv.Rejection):
                self.outcomes.append(
                    Outcome(row, source="model", reason=located.reason, detail=located.detail, output=text)
                )
            elif located < 0:
                found_none = Outcome(row, first_error=-1, source="model", reason=iv.NO_FIRST_ERROR, output=text)
                found_none.detail = "the model found no error"
                self.outcomes.append(found_none)
            else:
                self.first_errors[row] = (located, "model")
        self.advance(sum(1 for r in to_locate if r not in self.first_errors), completions)

    def keep_to_steps(self) -> None:
        """`--steps thinking|solution`: a trace whose first error lies in the other part is not
        intervened on (no_first_error, the detail says where the error is)."""
        if self.config.steps == "all":
            return
        thinking = self.thinking_steps
        for row, (first_error, source) in sorted(self.first_errors.items()):
            first, last = step_window(self.config.steps, len(self.steps[row]), thinking[row])
            if not first <= first_error < last:
                del self.first_errors[row]
                detail = f"the first error, step {first_error}, is not among the --steps {self.config.steps} steps"
                self.outcomes.append(
                    Outcome(row, first_error=first_error, source=source, reason=iv.NO_FIRST_ERROR, detail=detail)
                )

    def propose(self) -> list[Outcome]:
        """Every candidate of every row in one call; candidate c of a row has its own seed."""
        config, steps = self.config, self.steps
        rows = sorted(self.first_errors)
        prefill = iv.INTERVENTION_PREFILL if config.prefill_tag else ""
        asks = [(row, c) for row in rows for c in range(config.candidates)]
        prompts = {
            row: iv.proposer_prompt(
                self.problems[row], steps[row], self.first_errors[row][0], self.references[row], self.solutions[row]
            )
            for row in rows
        }
        requests = [
            self.request(
                prompts[row],
                prefill,
                iv.INTERVENTION_STOP,
                _seed(config.rollouts.seed, "propose", self.response_ids[row], c),
                config.temperature,
                config.proposer_max_tokens,
            )
            for row, c in asks
        ]
        completions = self.engine.sample(requests) if asks else []
        self.advance(0, completions)
        candidates: list[Outcome] = []
        seen: set[tuple[int, int, str]] = set()
        for (row, c), samples in zip(asks, completions):
            text = _answer_text(prefill, samples[0], iv.INTERVENTION_STOP)
            first_error, source = self.first_errors[row]
            outcome = Outcome(row, c, first_error, source, output=text)
            parsed = iv.parse_intervention(
                text, len(steps[row]), self.references[row], problem=self.problems[row], latest=first_error
            )
            if isinstance(parsed, iv.Rejection):
                outcome.reason, outcome.detail = parsed.reason, parsed.detail
                if parsed.reason != iv.UNPARSEABLE:  # the tag was read: keep what it said
                    outcome.content, outcome.step = _said(text)
            else:
                outcome.content, outcome.step = parsed.content, parsed.step
                outcome.guided = self.separator.join(steps[row][: parsed.step] + [parsed.content])
                if (row, parsed.step, parsed.content) in seen:
                    outcome.reason, outcome.detail = iv.DUPLICATE, "the same step and content as an earlier candidate"
                seen.add((row, parsed.step, parsed.content))
            candidates.append(outcome)
        return candidates

    def verify(self, to_verify: list[Outcome]) -> None:
        """Rollouts from `steps[:step] + intervention`, one call for all candidates."""
        if not to_verify:
            return
        config, steps, separator = self.config, self.steps, self.separator
        rollouts = Rollouts(
            self.engine,
            self.problems,
            steps,
            self.references,
            self.response_ids,
            separator,
            config.rollouts,
            known_traces(self.frame),
            config.tags,
        )
        prefixes = [rollout_prefix(steps[o.row][: o.step] + [o.content], separator) for o in to_verify]
        probes = [Probe(o.row, o.step, config.verify_rollouts, prefix=p) for o, p in zip(to_verify, prefixes)]
        results = rollouts.run(probes)
        if self.tracker is not None:
            self.tracker.advance(0, sum(r.tokens for r in results))
        for outcome, result in zip(to_verify, results):
            outcome.success_rate = result.mc
            if result.correct < config.min_success:
                outcome.reason = iv.NOT_VERIFIED
                outcome.detail = (
                    f"{result.correct} of {config.verify_rollouts} rollouts reached the answer; "
                    f"--min-success is {config.min_success}"
                )


def _said(text: str) -> tuple[str | None, int | None]:
    """Content and 0-based step of a tag that was read but rejected, for the rejects."""
    try:
        value = iv.read_literal(iv.last_tag(text, "intervention") or "")
    except ValueError:
        return None, None
    if not isinstance(value, dict):
        return None, None
    content = value.get("content") if isinstance(value.get("content"), str) else None
    location = iv.location_number(value.get("location"))
    return content, None if location is None else location - 1


def _rows(frame: pl.DataFrame, outcomes: list[Outcome], columns: dict[str, pl.DataType]) -> pl.DataFrame:
    outcomes = sorted(outcomes, key=lambda o: (o.row, -1 if o.candidate is None else o.candidate))
    values = {
        "intervention": [o.content for o in outcomes],
        "intervention_step": [o.step for o in outcomes],
        "intervention_success_rate": [o.success_rate for o in outcomes],
        "guided_response": [o.guided for o in outcomes],
        "intervene_candidate": [o.candidate for o in outcomes],
        "intervene_first_error": [o.first_error for o in outcomes],
        "intervene_first_error_source": [o.source for o in outcomes],
        "intervene_reason": [o.reason for o in outcomes],
        "intervene_detail": [o.detail for o in outcomes],
        "intervene_output": [o.output for o in outcomes],
    }
    added = pl.DataFrame({name: values[name] for name in columns}, schema=columns)
    source = frame[[o.row for o in outcomes]] if outcomes else frame.clear()
    return pl.concat([source, added], how="horizontal")
