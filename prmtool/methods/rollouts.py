"""Monte Carlo rollouts from step prefixes: the one place that turns "estimate MC(prefix)"
into engine requests and verified results.

A probe asks for k rollouts continuing a response after its first `prefix_steps` steps, or,
with an explicit `prefix` text, continuing any text (OmegaPRM's states are prefixes of earlier
rollouts, not only of the input responses). All
probes of one round go to the engine in a single call, whatever method asked for them; the
rollouts' final answers are checked by the project's verifier (mathematical equivalence).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Hashable, Protocol

from prmtool.engines.base import sample_in_rounds
from prmtool.methods.steps import rollout_prefix
from prmtool.methods.thinking import KNOWN_TAGS, ThinkTags, find_thinking, prompt_opens_thinking, solution_text
from prmtool.methods.verification import verify_responses, waits_abandoned

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Completion, Engine, SamplingRequest


@dataclass(frozen=True)
class Probe:
    row: int  # which response (index into the frame being labeled)
    prefix_steps: int  # the rollout continues after steps[:prefix_steps]
    k: int
    # When set, the rollout continues this text instead (the row then only names the problem
    # and its reference answer); prefix_steps is then just the number of steps it holds.
    prefix: str | None = None
    # Rollouts first_sample .. first_sample + k - 1 of the prefix's seeded stream: a staged
    # probe's second stage continues the stream of its first instead of drawing a new one.
    first_sample: int = 0
    # Only whether some rollout is right matters (the any-success rule): in continuous rounds
    # the first right rollout settles the probe and its other rollouts are stopped.
    until_right: bool = False


@dataclass
class ProbeResult:
    probe: Probe
    correct: int  # rollouts whose final answer is right
    tokens: int  # generated tokens spent
    # Every rollout as (continuation text, verified correct, generated tokens), in sample order.
    texts: list[tuple[str, bool, int]] = field(default_factory=list)

    @property
    def mc(self) -> float:
        return self.correct / self.probe.k


@dataclass
class RolloutSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    system_prompt: str | None = None
    prompt_template: str | None = None
    verify_timeout: float = 5.0
    workers: int = 2

    @classmethod
    def of(cls, settings, workers: int) -> RolloutSettings:
        """From a stage's settings (label's, intervene's), which name these options alike;
        no prompt template means the default one, as generate's."""
        from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE

        return cls(
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            system_prompt=settings.system_prompt,
            prompt_template=settings.prompt_template or DEFAULT_PROMPT_TEMPLATE,
            workers=workers,
        )


class Rollouts:
    """Runs rounds of probes for a frame of responses (problem, steps, reference_answer)."""

    def __init__(
        self,
        engine: "Engine",
        problems: list[str],
        steps: list[list[str]],
        references: list[str],
        response_ids: list[str],
        separator: str,
        settings: RolloutSettings,
        thinking_steps: list[int | None] | None = None,
        tags: tuple[ThinkTags, ...] = KNOWN_TAGS,
    ) -> None:
        self.engine, self.settings, self.separator = engine, settings, separator
        self.problems, self.steps, self.references, self.response_ids = problems, steps, references, response_ids
        # Reasoning traces: how many leading steps of each response are thinking (None: not a trace).
        self.thinking_steps = thinking_steps or [None] * len(steps)
        self.tags = tags
        self._chat_ids: dict[str, list[int]] = {}
        self._template_opens: ThinkTags | None | bool = False  # False: not asked yet
        self._trace_tags: dict[int, ThinkTags] = {}
        self.rounds = 0

    def template_opens_thinking(self) -> ThinkTags | None:
        """The thinking tags the model's chat template opens at the end of its generation prompt
        (Qwen3, DeepSeek-R1 distills), or None. Asked of the engine's tokenizer once."""
        if self._template_opens is False:
            tokenizer = getattr(self.engine, "tokenizer", None)
            opens = None
            if tokenizer is not None and hasattr(tokenizer, "decode"):
                ids = self.engine.chat_prompt_ids(
                    "1 + 1 = ?", self.settings.system_prompt, self.settings.prompt_template
                )
                opens = prompt_opens_thinking(tokenizer.decode(ids[-16:]), self.tags)
            self._template_opens = opens
        return self._template_opens

    def is_trace(self, row: int) -> bool:
        return bool(self.thinking_steps[row])

    def prefix_text(self, row: int, prefix_steps: int) -> str:
        """`join(steps[:i]) + sep`, as docs/algorithms.md says a rollout from step i continues.
        A reasoning trace's prefix inside the thinking is the opened thinking so far, no closing
        tag: its opening tag is written once, by the chat template when the template opens the
        thinking, else at the start of the prefix."""
        prefix = rollout_prefix(self.steps[row][:prefix_steps], self.separator)
        if not self.is_trace(row):
            return prefix
        return self._one_opening_tag(row, prefix)

    def _one_opening_tag(self, row: int, prefix: str) -> str:
        if row not in self._trace_tags:
            written = find_thinking(self.separator.join(self.steps[row]), self.tags, opened=True)
            self._trace_tags[row] = written.tags if written is not None else self.tags[0]
        tags = self._trace_tags[row]
        has_tag = bool(self.steps[row]) and self.steps[row][0].lstrip().startswith(tags.open)
        opened_by_template = self.template_opens_thinking() is not None
        if has_tag and opened_by_template and tags.open in prefix:
            start = prefix.index(tags.open) + len(tags.open)
            return prefix[start:].removeprefix("\n")
        if not has_tag and not opened_by_template:
            return f"{tags.open}\n{prefix}"
        if has_tag and not opened_by_template and not prefix:
            # The start (the drop rule samples it): inside the thinking the trace opens, as every
            # other prefix of the trace is, so its rollouts are read as the trace's are.
            return f"{tags.open}\n"
        return prefix

    def answer_text(self, row: int, text: str) -> str | None:
        """What a rollout's answer is read from: the solution of a trace (None while it never
        closed its thinking), and of any rollout that writes thinking tags (a reasoning policy's,
        OmegaPRM's included); else the whole text."""
        return solution_text(text, self.tags, opened=self.is_trace(row))

    def probe_prefix(self, probe: Probe) -> str:
        if probe.prefix is None:
            return self.prefix_text(probe.row, probe.prefix_steps)
        return self._one_opening_tag(probe.row, probe.prefix) if self.is_trace(probe.row) else probe.prefix

    def _chat_prompt_ids(self, row: int) -> list[int]:
        problem = self.problems[row]
        if problem not in self._chat_ids:
            self._chat_ids[problem] = self.engine.chat_prompt_ids(
                problem, self.settings.system_prompt, self.settings.prompt_template
            )
        return self._chat_ids[problem]

    def _prompt_ids(self, probes: list[Probe]) -> list[list[int]]:
        """Each probe's prompt: the problem's chat prompt, then its step prefix (one tokenizer
        call, each distinct prefix once: a probe split into single rollouts repeats its own)."""
        keys = [(probe.row, probe.prefix_steps, probe.prefix) for probe in probes]
        distinct = {key: probe for key, probe in zip(keys, probes)}
        chat_prompts = [self._chat_prompt_ids(probe.row) for probe in distinct.values()]
        encoded = self.engine.continuation_ids_batch(
            chat_prompts, [self.probe_prefix(probe) for probe in distinct.values()]
        )
        ids_of = dict(zip(distinct, encoded))
        return [ids_of[key] for key in keys]

    def _seed(self, probe: Probe, round_number: int) -> int:
        # Fixed by the response and the prefix, so reruns give the same labels in lockstep
        # rounds or continuous ones, and a probe sampled ahead of its round (speculation) draws
        # what it would have drawn in it: a search probes each step prefix once. Explicit
        # prefixes (OmegaPRM's states, intervene's candidates) may be probed again in a later
        # round, so their seeds take the search's round too.
        key = f"{self.settings.seed}\x1f{self.response_ids[probe.row]}\x1f{probe.prefix_steps}"
        if probe.prefix is not None:
            key += f"\x1f{round_number}\x1f{probe.prefix}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")

    def requests_for(self, probes: list[Probe], rounds: list[int]) -> tuple[list[int], list[SamplingRequest]]:
        """Engine requests for `probes` (each with the round of the search that asks it), and
        the order they are in: probes of one problem are adjacent, so shared prefixes reach the
        engine together (its prefix cache, where it has one, serves them)."""
        from prmtool.engines import SamplingRequest

        order = sorted(
            range(len(probes)),
            key=lambda i: (
                self.problems[probes[i].row],
                probes[i].row,
                probes[i].prefix_steps,
                probes[i].prefix or "",
                probes[i].first_sample,
            ),
        )
        prompt_ids = self._prompt_ids([probes[i] for i in order])
        requests = [
            SamplingRequest(
                prompt_ids=prompt_ids[position],
                n=probes[i].k,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                max_tokens=self.settings.max_tokens,
                seed=self._seed(probes[i], rounds[i]),
                first_sample=probes[i].first_sample,
            )
            for position, i in enumerate(order)
        ]
        return order, requests

    def results_of(self, probes: list[Probe], completions: list[list[Completion]]) -> list[ProbeResult]:
        """Each probe's result from its completions (aligned with `probes`), after one
        verification pass over all of them."""
        texts, references = [], []
        for probe, samples in zip(probes, completions):
            prefix = self.probe_prefix(probe)
            for sample in samples:
                # The answer may sit in the prefix when the prefix already holds the last step.
                texts.append(self.answer_text(probe.row, prefix + sample.text))
                references.append(self.references[probe.row])
        _, verdicts = verify_responses(
            texts, references, timeout=self.settings.verify_timeout, workers=self.settings.workers
        )
        verdict_iter = iter(verdicts)
        results = []
        for probe, samples in zip(probes, completions):
            texts_of_probe = [(s.text, bool(next(verdict_iter).correct), s.num_tokens) for s in samples]
            correct = sum(right for _, right, _ in texts_of_probe)
            results.append(ProbeResult(probe, correct, sum(s.num_tokens for s in samples), texts_of_probe))
        return results

    def run(self, probes: list[Probe]) -> list[ProbeResult]:
        """One round: one engine call for every probe, then one verification pass."""
        if not probes:
            return []
        self.rounds += 1
        order, requests = self.requests_for(probes, [self.rounds] * len(probes))
        completions: list[list[Completion]] = [[] for _ in probes]
        for position, samples in zip(order, self.engine.sample(requests)):
            completions[position] = samples
        return self.results_of(probes, completions)

    def longest_request(self, rows: list[int]) -> int:
        """Prompt plus max_tokens for a rollout after all but the last step of each row: the
        longest request a step search of these rows makes (the engine sizes its cache by it)."""
        probes = [Probe(row, max(0, len(self.steps[row] or []) - 1), 1) for row in rows]
        return max((len(ids) for ids in self._prompt_ids(probes)), default=0) + self.settings.max_tokens


def rests_on_no_right_rollout(correct: bool | None, right_rollouts: int | None) -> bool:
    """A wrong response none of whose rollouts, from any prefix, was right: the policy never
    solved its problem, so the labels its search gave name no error (label counts such rows in
    its summary; train leaves them out). Rows without rollouts (right_rollouts null) are not."""
    return correct is False and right_rollouts == 0


class Search(Protocol):
    """What `run_searches` drives: a label row search or an OmegaPRM question search. A search
    may also have `speculative_probes()`, the probes it may ask next, most likely first, whatever
    its probes just asked show, and `probes_left()`, how long its chain of dependent probes may
    still be (label's binary search has both)."""

    row: int  # the frame row its probes name

    def probes(self) -> list[Probe]: ...  # this round's; none when the search is done

    def observe(self, result: ProbeResult) -> None: ...


@dataclass
class SearchStats:
    """What speculation cost: rollouts sampled ahead of their round, and those of them no
    search asked for after all (their tokens where they finished before being dropped)."""

    speculative_rollouts: int = 0
    unused_rollouts: int = 0
    unused_tokens: int = 0


def settled_by(probe: Probe, seen: list[ProbeResult]) -> ProbeResult:
    """The result of an `until_right` probe whose rollouts ran one request each, from those
    verified so far (`seen`, one rollout each, in the order they were verified). A right one
    settles it: the result is that rollout alone (1 right of 1), so it does not depend on which
    others happened to finish first. Else all k are wrong, in sample order."""
    right = next((result for result in seen if result.correct), None)
    if right is not None:
        return ProbeResult(replace(probe, k=1), 1, right.tokens, right.texts)
    seen = sorted(seen, key=lambda result: result.probe.first_sample)
    return ProbeResult(probe, 0, sum(r.tokens for r in seen), [text for r in seen for text in r.texts])


def run_searches(
    searches: dict[Hashable, Search],
    rollouts: Rollouts,
    *,
    on_done: Callable[[Hashable, Search], None] | None = None,
    tracker: Tracker | None = None,
    continuous: bool = False,
    speculate: bool = True,
) -> SearchStats:
    """Advance every search until none asks for more. By default in lockstep rounds: each
    round gathers the probes of every active search into one engine call. With `continuous`,
    a search's next probes go out as soon as its own results are in and verified, while other
    searches' rollouts still run (the engine's `sample_continuously`); the seeds, and so the
    labels, are the same either way. In continuous rounds the verification runs on a worker
    thread, so the thread that feeds the GPU never waits on it; its follow-ups join at the
    engine's next hand-back, and the engine is fed only while it has free slots, the searches
    with the longest chains of probes left first (`release`). A probe `until_right` goes to
    the engine as k requests of one rollout each, verified as each ends: the first right one
    settles it and the others are stopped (`settled_by`), so a good prefix costs the search
    the wait for its quickest right rollout, not its slowest.
    `on_done(key, search)` sees each search as it finishes; `tracker` counts the generated
    tokens.

    Speculation (`speculate`, for searches with `speculative_probes`): when the engine has
    slots that nothing asked for fills, they sample the probes searches may ask next, so a
    search whose next probe was sampled ahead moves on at once instead of waiting a rollout's
    length. Seeds depend on the prefix alone, so a probe sampled ahead gives exactly what it
    would have given in its round: the labels are the same with or without speculation. A
    speculative probe no search asks for is dropped (cancelled if still sampling); what that
    cost is in the returned SearchStats. Slots are never taken from asked-for probes: the
    engine has idle ones only towards the end of a job, when too few searches are left to fill
    it and each waits on its own chain of dependent probes."""
    from prmtool.engines import Cancel

    keys = {search.row: key for key, search in searches.items()}
    by_row = {search.row: search for search in searches.values()}
    rounds = dict.fromkeys(by_row, 0)  # each search's round: part of explicit prefixes' seeds
    stats = SearchStats()
    # request key -> (row, probe, the single rollout it samples of an until_right probe, or None)
    owners: dict[int, tuple[int, Probe, Probe | None]] = {}
    in_engine: dict[tuple[int, Probe], list[int]] = {}  # (row, probe) -> its request keys in the engine
    samples_in_engine = 0
    next_key = 0  # the engine numbers requests in the order they are handed to it
    # row -> (its probes asked, what each has so far: None, its completions, or its settled ProbeResult)
    waiting: dict[int, tuple[list[Probe], list]] = {}
    # row -> probes sampled ahead and not asked yet: as in `waiting`
    ahead: dict[int, dict[Probe, list | ProbeResult | None]] = {}
    unsent: dict[int, list[Probe]] = {}  # row -> speculative probes not sampled yet, most likely first
    answered: list[int] = []  # rows whose asked probes all have their completions, to verify
    cancels: list = []
    # Continuous rounds: asked probes wait here until the engine has room (see `release`).
    held: list[tuple[int, Probe]] = []
    # until_right probes sampling one request a rollout: (row, probe) -> their rollouts verified so far
    settling: dict[tuple[int, Probe], list[ProbeResult]] = {}
    rollouts_ended: list[tuple[int, Probe, Probe, list]] = []  # their finished rollouts, to verify

    def send(pairs: list[tuple[int, Probe]]) -> list:
        nonlocal next_key, samples_in_engine
        if not pairs:
            return []
        parts: list[tuple[int, Probe, Probe | None]] = []
        for row, probe in pairs:
            if continuous and probe.until_right:
                settling[(row, probe)] = []
                for number in range(probe.first_sample, probe.first_sample + probe.k):
                    parts.append((row, probe, replace(probe, k=1, first_sample=number, until_right=False)))
            else:
                parts.append((row, probe, None))
        order, requests = rollouts.requests_for(
            [single or probe for _, probe, single in parts], [rounds[row] for row, _, _ in parts]
        )
        for index in order:
            row, probe, _ = owners[next_key] = parts[index]
            in_engine.setdefault((row, probe), []).append(next_key)
            next_key += 1
        samples_in_engine += sum(request.n for request in requests)
        return requests

    def stop(row: int, probe: Probe) -> None:
        """Cancel what the engine still samples for this probe."""
        nonlocal samples_in_engine
        for key in in_engine.pop((row, probe), []):
            _, _, single = owners.pop(key)
            cancels.append(Cancel(key))
            samples_in_engine -= (single or probe).k

    def drop_ahead(row: int, keep: set[Probe]) -> None:
        """Forget the row's speculative probes that it no longer may ask; stop those sampling."""
        for probe in [probe for probe in ahead.get(row, {}) if probe not in keep]:
            sampled = ahead[row].pop(probe)
            stats.unused_rollouts += probe.k
            if sampled is None:
                stop(row, probe)
                settling.pop((row, probe), None)
            elif isinstance(sampled, ProbeResult):
                stats.unused_tokens += sampled.tokens
            else:
                stats.unused_tokens += sum(sample.num_tokens for sample in sampled)

    def next_requests(rows: list[int]) -> list:
        to_send: list[tuple[int, Probe]] = []
        for row in rows:
            search = by_row[row]
            probes = search.probes()
            may_ask = getattr(search, "speculative_probes", None) if speculate and probes else None
            wanted = may_ask() if may_ask is not None else []
            drop_ahead(row, set(probes) | set(wanted))
            if not probes:
                unsent.pop(row, None)
                if on_done is not None:
                    on_done(keys[row], search)
                continue
            rounds[row] += 1
            completions = [None] * len(probes)
            waiting[row] = (probes, completions)
            for position, probe in enumerate(probes):
                if probe in ahead.get(row, {}):  # sampled ahead: done, or its result will come here
                    completions[position] = ahead[row].pop(probe)
                else:
                    to_send.append((row, probe))
            if all(samples is not None for samples in completions):
                answered.append(row)
            unsent[row] = [probe for probe in wanted if probe not in ahead.get(row, {}) and probe not in probes]
        if continuous:
            held.extend(to_send)
            return []
        return send(to_send)

    def place(row: int, probe: Probe, outcome: list | ProbeResult) -> None:
        """A probe's completions (or settled result) under the row that waits for them."""
        if probe in ahead.get(row, {}):  # speculative, not asked yet
            ahead[row][probe] = outcome
            return
        probes, completions = waiting[row]
        completions[probes.index(probe)] = outcome
        if all(samples is not None for samples in completions):
            answered.append(row)

    def record(done: list) -> None:
        """File finished requests under their probes; ignore those cancelled meanwhile."""
        nonlocal samples_in_engine
        for key, samples in done:
            if key not in owners:
                continue
            row, probe, single = owners.pop(key)
            in_engine[(row, probe)].remove(key)
            if not in_engine[(row, probe)]:
                del in_engine[(row, probe)]
            samples_in_engine -= len(samples)
            if single is not None:
                rollouts_ended.append((row, probe, single, samples))
            else:
                place(row, probe, samples)

    def take_answered() -> tuple[list[Probe], list]:
        probes, completions = [], []
        for row in answered:
            row_probes, row_completions = waiting.pop(row)
            probes += row_probes
            completions += row_completions
        answered.clear()
        return probes, completions

    def verify(probes: list[Probe], completions: list, ended: list) -> tuple[list[ProbeResult], list]:
        """One verification pass: the answered probes' results (those settled already kept),
        and each single rollout's, beside the (row, probe) it belongs to."""
        unverified = [i for i, outcome in enumerate(completions) if not isinstance(outcome, ProbeResult)]
        checked = rollouts.results_of(
            [probes[i] for i in unverified] + [single for _, _, single, _ in ended],
            [completions[i] for i in unverified] + [samples for _, _, _, samples in ended],
        )
        results = list(completions)
        for i, result in zip(unverified, checked):
            results[i] = result
        singles = [(row, probe, result) for (row, probe, _, _), result in zip(ended, checked[len(unverified) :])]
        return results, singles

    def settle(singles: list) -> None:
        """File verified single rollouts under their until_right probes; a right one, or the
        last of k, settles its probe (whose other rollouts are stopped)."""
        for row, probe, result in singles:
            seen = settling.get((row, probe))
            if seen is None:  # settled already, or dropped
                continue
            seen.append(result)
            if result.correct or len(seen) == probe.k:
                del settling[(row, probe)]
                stop(row, probe)
                place(row, probe, settled_by(probe, seen))

    def advance(results: list[ProbeResult], singles: list = ()) -> list:
        settle(list(singles))
        # rows that settled probes alone made ready need no verification pass
        for row in [row for row in answered if all(isinstance(c, ProbeResult) for c in waiting[row][1])]:
            answered.remove(row)
            results = results + waiting.pop(row)[1]
        for result in results:
            by_row[result.probe.row].observe(result)
        if tracker is not None and results:
            tracker.advance(0, sum(result.tokens for result in results), work=sum(r.probe.k for r in results))
        return next_requests(list(dict.fromkeys(result.probe.row for result in results)))

    def chain_left(row: int) -> int:
        probes_left = getattr(by_row[row], "probes_left", None)
        return probes_left() if probes_left is not None else 0

    def release() -> list:
        """Held probes into the engine while it holds fewer samples than it has slots, those
        of the searches with the longest chains left first. Handed over all at once, probes
        queue in the engine in the order they came, and a search far from its end waits behind
        searches about to end: the job then ends with a few long chains and idle slots. Served
        longest first, the chains end together (`bench/bench_label.py schedule`). The engines
        ask again whenever slots are free. An engine of unknown capacity gets them all."""
        capacity = rollouts.engine.sampling_capacity()
        room = capacity - samples_in_engine
        if not held or (capacity > 0 and room <= 0):
            return []
        if capacity <= 0:
            chosen = held[:]
        else:
            held.sort(key=lambda pair: -chain_left(pair[0]))  # stable: row order among equals
            count = 0
            while count < len(held) and room > 0:
                room -= held[count][1].k
                count += 1
            chosen = held[:count]
        del held[: len(chosen)]
        return send(chosen)

    def sample_ahead() -> list:
        """Speculative probes into the engine's idle slots, the most likely of every row first."""
        spare = rollouts.engine.sampling_capacity() - samples_in_engine if speculate else 0
        if spare <= 0 or not unsent:
            return []
        chosen: list[tuple[int, Probe]] = []
        for rank, row in sorted((rank, row) for row, probes in unsent.items() for rank in range(len(probes))):
            probe = unsent[row][rank]
            if probe.k <= spare:
                chosen.append((row, probe))
                spare -= probe.k
        for row, probe in chosen:
            ahead.setdefault(row, {})[probe] = None
            unsent[row].remove(probe)
            if not unsent[row]:
                del unsent[row]
        stats.speculative_rollouts += sum(probe.k for _, probe in chosen)
        return send(chosen)

    def answer(requests: list) -> list:
        requests += release()
        requests += sample_ahead()
        out = cancels + requests
        cancels.clear()
        return out

    def finished(done: list) -> list:  # lockstep: verify inline, one pass per round
        record(done)
        requests = []
        while answered:  # rows answered by speculative samples are verified in the same pass
            requests += advance(verify(*take_answered(), [])[0])
        return answer(requests)

    first = next_requests(list(by_row))
    if not first and not held:
        return stats
    if not continuous:
        sample_in_rounds(rollouts.engine, answer(first), finished)
        return stats

    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    verifying: list = []  # futures of verify(), oldest first

    def submit_answered() -> None:
        if answered or rollouts_ended:
            ended = rollouts_ended[:]
            rollouts_ended.clear()
            verifying.append(verifier.submit(verify, *take_answered(), ended))

    def finished_soon(done: list) -> list:
        record(done)
        submit_answered()
        follow_ups: list = []
        while verifying:
            if samples_in_engine == 0 and not held:  # the engine would stop: wait for a verdict
                wait(verifying, return_when=FIRST_COMPLETED)
            ready = [future for future in verifying if future.done()]
            if not ready:
                break
            for future in ready:
                verifying.remove(future)
                follow_ups += advance(*future.result())
            submit_answered()
        return answer(follow_ups)

    # Several threads: each verification waits on the worker processes, not on the GIL.
    verifier = ThreadPoolExecutor(max_workers=max(1, rollouts.settings.workers), thread_name_prefix="verify")
    try:
        rollouts.engine.sample_continuously(
            answer(first), finished_soon, longest=rollouts.longest_request(list(waiting))
        )
    except BaseException:  # Ctrl-C: the verify threads stop waiting, so the run ends now, not after them
        with waits_abandoned():
            verifier.shutdown(wait=True, cancel_futures=True)
        raise
    verifier.shutdown(wait=True)
    return stats
