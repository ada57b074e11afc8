"""`prmtool label`: step labels from Monte Carlo rollouts.

The scripted engine below gives exact ground truth: a rollout reaches the right answer with
probability `p`, unless its prefix contains the injected wrong step ("WRONG"), in which case it
does with probability `p_bad` (0 unless a test lets rollouts recover). So the true first error
of every response is known.
"""

import math
import random
import time

import polars as pl
import pytest

from prmtool.core.errors import InputError
from prmtool.engines import Cancel, Completion, Engine
from prmtool.methods import labeling
from prmtool.methods.labeling import label_rows
from prmtool.methods.progress import (
    DEFAULT_PRIOR,
    first_bad_posterior,
    learned_prior,
    most_informative,
    wilson_interval,
)
from prmtool.methods.rollouts import RolloutSettings
from tests.conftest import SAMPLES


class ScriptedRolloutEngine(Engine):
    def __init__(self, answers: dict[str, str], p: float = 1.0, p_bad: float = 0.0):
        self.tokenizer = None
        self.answers, self.p, self.p_bad = answers, p, p_bad
        self.calls: list[list] = []

    def chat_prompt_ids(self, problem, system_prompt=None, prompt_template=None):
        return [ord(c) for c in problem] + [0]  # 0 marks the end of the problem

    def continuation_ids(self, prompt_ids, partial_answer):
        return list(prompt_ids) + [ord(c) for c in partial_answer]

    def sample(self, requests, on_progress=None):
        self.calls.append(requests)
        results = []
        for request in requests:
            end = request.prompt_ids.index(0)
            problem = "".join(map(chr, request.prompt_ids[:end]))
            prefix = "".join(map(chr, request.prompt_ids[end + 1 :]))
            samples = []
            for number in range(request.first_sample, request.first_sample + request.n):
                # One stream per (seed, sample number), as the real engines: a split request
                # samples what the whole one would have.
                rng = random.Random(f"{request.seed}:{number}")
                right = rng.random() < (self.p_bad if "WRONG" in prefix else self.p)
                gold = int(self.answers[problem])
                # Written as a fraction: only a mathematical verifier counts it as right.
                answer = f"\\frac{{{2 * gold}}}{{2}}" if right else str(gold + 1)
                samples.append(Completion(f"So the result is \\boxed{{{answer}}}.", [1, 2, 3], 3, "stop"))
            results.append(samples)
        return results

    def sampling_capacity(self):
        return getattr(self, "capacity", 0)  # 0: no idle slots to speculate into

    def score(self, requests):
        raise NotImplementedError("label never scores")


def responses(count: int, seed: int = 0, max_steps: int = 12) -> pl.DataFrame:
    """Wrong responses of 1..max_steps steps, each with one injected wrong step."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        n = rng.randint(1, max_steps)
        wrong_at = rng.randrange(n)
        steps = [f"Step {i}: fine." if i != wrong_at else f"Step {i}: WRONG." for i in range(n)]
        rows.append(
            {
                "problem_id": f"p{index % 5}",
                "problem": f"Problem {index % 5}?",
                "reference_answer": str(10 + index % 5),
                "response_id": f"r{index}",
                "steps": steps,
                "correct": False,
                "true_first_error": wrong_at,
            }
        )
    return pl.DataFrame(rows)


def answers_of(frame: pl.DataFrame) -> dict[str, str]:
    return dict(zip(frame["problem"], frame["reference_answer"]))


SETTINGS = RolloutSettings(workers=1)


def test_binary_search_finds_the_same_first_error_as_per_step_mc_on_noise_free_cases():
    frame = responses(40)
    engine = ScriptedRolloutEngine(answers_of(frame), p=1.0)
    binary = label_rows(frame, engine, "binary", k=4, settings=SETTINGS)
    per_step = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=1.0), "mc", k=4, settings=SETTINGS)
    assert binary["first_error"].to_list() == frame["true_first_error"].to_list()
    assert per_step["first_error"].to_list() == frame["true_first_error"].to_list()


def test_any_success_binary_search_spends_at_most_k_times_log2_n_plus_one_rollouts_per_wrong_response():
    frame = responses(40)
    k = 4
    labeled = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame)), "binary", k=k, settings=SETTINGS, rule="any-success"
    )
    for steps, rollouts in zip(labeled["steps"], labeled["label_rollouts"]):
        assert rollouts <= k * (math.ceil(math.log2(len(steps))) + 1) if len(steps) > 1 else rollouts == 0


def test_binary_labels_good_before_the_first_error_bad_at_it_and_nothing_after():
    frame = responses(20)
    labeled = label_rows(frame, ScriptedRolloutEngine(answers_of(frame)), "binary", k=4, settings=SETTINGS)
    for labels, first_error in zip(labeled["step_labels"].to_list(), labeled["first_error"]):
        assert labels == [1] * first_error + [0] + [None] * (len(labels) - first_error - 1)


def test_all_searches_advance_together_one_engine_call_per_round():
    frame = responses(40, max_steps=12)
    engine = ScriptedRolloutEngine(answers_of(frame))
    label_rows(frame, engine, "binary", k=2, settings=SETTINGS, rule="any-success")
    # Two rounds per level at most (staged sampling), whatever the number of responses.
    assert len(engine.calls) <= 2 * math.ceil(math.log2(12)), "one call per round, not one per probe"
    assert sum(len(call) for call in engine.calls) > len(engine.calls)
    # The drop rule: a round per stage (k/8 rollouts, here 1), within a search's budget of
    # --max-k (8) rollouts a level.
    engine = ScriptedRolloutEngine(answers_of(frame))
    label_rows(frame, engine, "binary", k=2, settings=SETTINGS)
    assert len(engine.calls) <= math.ceil(math.log2(12)) * 8
    assert sum(len(call) for call in engine.calls) > len(engine.calls)


class OneAtATimeEngine(ScriptedRolloutEngine):
    """Finishes one request at a time, in a shuffled order, and queues follow-ups as they come:
    how an engine with continuous rounds hands results back. Between requests it asks for
    follow-ups that became ready meanwhile (an empty hand-back), as the hf and vllm engines do
    while they have room: verification runs on another thread in continuous rounds."""

    def sample_continuously(self, requests, on_done, on_progress=None, longest=0):
        queue = list(enumerate(requests))
        next_key, shuffle = len(queue), random.Random(1)
        self.empty_hand_backs_answered = 0
        self.cancelled = 0
        while queue:
            key, request = queue.pop(shuffle.randrange(len(queue)))
            follow_ups = on_done([(key, self.sample([request])[0])])
            time.sleep(0.001)  # the verifier thread's chance to finish while this "decodes"
            ready = on_done([])
            self.empty_hand_backs_answered += bool(ready)
            answer = follow_ups + ready
            stopped = {item.key for item in answer if isinstance(item, Cancel)}
            self.cancelled += len(stopped)
            queue = [(key, request) for key, request in queue if key not in stopped]
            new = [item for item in answer if not isinstance(item, Cancel)]
            queue += list(enumerate(new, start=next_key))
            next_key += len(new)


def same_labels(labeled: pl.DataFrame, other: pl.DataFrame) -> bool:
    """The same step labels and first errors. Under any-success, continuous rounds stop a probe
    at its first right rollout (test_in_continuous_rounds_the_first_right_rollout_settles_a_probe):
    its MC is that rollout's alone, and the rollouts counted are those it waited for."""
    columns = ["response_id", "step_labels", "first_error"]
    return labeled.select(columns).equals(other.select(columns))


@pytest.mark.parametrize("rule", ["drop", "any-success"])
@pytest.mark.parametrize("method", ["binary", "mc", "omegaprm"])
def test_continuous_rounds_give_the_labels_of_lockstep_rounds(method, rule):
    frame = responses(30)
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.5, p_bad=0.1)
    lockstep = label_rows(frame, engine, method, k=4, settings=SETTINGS, rule=rule)
    engine = OneAtATimeEngine(answers_of(frame), p=0.5, p_bad=0.1)
    continuous = label_rows(frame, engine, method, k=4, settings=SETTINGS, continuous=True, rule=rule)
    if method != "mc" and rule == "any-success":
        assert same_labels(continuous, lockstep)  # and fewer rollouts: a right one settles a probe
    else:
        assert continuous.equals(lockstep)
    assert engine.calls and all(len(call) == 1 for call in engine.calls)  # it did run one request at a time
    if method != "mc":  # mc asks every probe in its first round: it has no follow-ups
        assert engine.empty_hand_backs_answered > 0  # follow-ups did arrive between hand-backs
    assert lockstep["first_error"].n_unique() > 3  # p = 0.5: searches of different lengths


def test_in_continuous_rounds_the_first_right_rollout_settles_a_probe():
    """Under any-success a prefix is good once one rollout from it is right. In continuous rounds
    a probe's k rollouts go to the engine as one request each, verified as each ends: the first
    right one settles the probe and the others are stopped, so the search waits for the quickest
    right rollout rather than for the slowest of a stage. The labels are lockstep's."""
    frame = responses(30)
    lockstep = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame), p=0.7), "binary", k=8, settings=SETTINGS, rule="any-success"
    )
    engine = OneAtATimeEngine(answers_of(frame), p=0.7)
    continuous = label_rows(
        frame, engine, "binary", k=8, settings=SETTINGS, continuous=True, speculate=False, rule="any-success"
    )
    assert same_labels(continuous, lockstep)
    assert all(request.n == 1 for call in engine.calls for request in call)
    assert engine.cancelled > 0  # rollouts of settled probes, stopped before they ran
    for values, labels in zip(continuous["step_mc"], continuous["step_labels"]):
        for value, label in zip(values, labels):
            if value is not None and label is not None:  # a probed step: good on 1 right of 1, bad on 0 of 8
                assert value == (1.0 if label == 1 else 0.0)
    # a good prefix counts the one rollout that settled it (lockstep's first stage draws 2)
    assert continuous["label_rollouts"].sum() < lockstep["label_rollouts"].sum()


class QueueingEngine(ScriptedRolloutEngine):
    """A continuous engine of `capacity` slots that samples its queue in order, a request at a
    time, and records what it was handed, in order, and the most samples it ever held."""

    capacity = 8

    def sampling_capacity(self):
        return self.capacity

    def sample_continuously(self, requests, on_done, on_progress=None, longest=None):
        queue, next_key = list(enumerate(requests)), len(requests)
        self.handed, self.most_held = list(requests), sum(request.n for request in requests)
        while queue:
            key, request = queue.pop(0)
            answer = on_done([(key, self.sample([request])[0])])
            time.sleep(0.001)  # the verifier thread's chance to finish
            answer += on_done([])
            new = [item for item in answer if not isinstance(item, Cancel)]
            queue += list(enumerate(new, start=next_key))
            next_key += len(new)
            self.handed += new
            self.most_held = max(self.most_held, sum(request.n for _, request in queue))


def test_continuous_rounds_feed_the_engine_the_longest_chains_first_and_no_more_than_it_has_slots():
    frame = responses(40, max_steps=12)
    rule = "any-success"  # probes of k = 8 single-rollout requests, for the count below
    plain = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame), p=0.5), "binary", k=8, settings=SETTINGS, rule=rule
    )
    engine = QueueingEngine(answers_of(frame), p=0.5)
    engine.capacity = 32
    fed = label_rows(frame, engine, "binary", k=8, settings=SETTINGS, continuous=True, speculate=False, rule=rule)
    assert same_labels(fed, plain)
    assert engine.most_held <= engine.capacity + 8  # its slots, and at most one probe more
    # 32 slots: four probes (8 rollouts each), all of responses of 9-12 steps, whose searches
    # have the most levels left; their prefixes hold half the steps.
    first = engine.handed[:32]
    prefixes = ["".join(map(chr, request.prompt_ids[request.prompt_ids.index(0) + 1 :])) for request in first]
    assert all(prefix.count("Step ") >= 4 for prefix in prefixes), prefixes
    assert min(len(steps) for steps in frame["steps"]) < 9  # shorter responses were there to pick


@pytest.mark.parametrize("rule", ["drop", "any-success"])
@pytest.mark.parametrize("continuous", [False, True], ids=["lockstep", "continuous"])
def test_speculation_fills_idle_slots_and_gives_the_labels_it_would_give_without(continuous, rule):
    frame = responses(30)
    plain_engine = ScriptedRolloutEngine(answers_of(frame), p=0.5, p_bad=0.1)
    plain = label_rows(frame, plain_engine, "binary", k=8, settings=SETTINGS, speculate=False, rule=rule)
    engine = OneAtATimeEngine(answers_of(frame), p=0.5, p_bad=0.1)
    engine.capacity = 256  # more slots than the searches' own probes fill
    counts = {}
    ahead = label_rows(frame, engine, "binary", k=8, settings=SETTINGS, continuous=continuous, counts=counts, rule=rule)
    if continuous and rule == "any-success":
        assert same_labels(ahead, plain)
    else:
        assert ahead.equals(plain)  # label_rollouts and label_tokens count only the rollouts used
    assert counts["speculative_rollouts"] > counts["speculative_rollouts_unused"] > 0
    if continuous:
        assert engine.cancelled > 0  # probes a search stopped needing were stopped, not sampled to the end
    else:
        assert len(engine.calls) < len(plain_engine.calls)  # searches skipped rounds their probes were sampled in


def test_under_the_drop_rule_speculation_spares_most_rounds_of_small_stages():
    """A drop search draws k/8 rollouts a round, often several stages in a row from the prefixes
    beside the place it is checking: with idle slots, those are sampled ahead, so a round's engine
    call serves several of its steps."""
    frame = responses(30)
    plain = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.3)
    alone = label_rows(frame, plain, "binary", k=8, settings=SETTINGS, speculate=False)
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.3)
    engine.capacity = 4096
    ahead = label_rows(frame, engine, "binary", k=8, settings=SETTINGS)
    assert ahead.equals(alone)
    assert len(engine.calls) <= len(plain.calls) / 3


def test_any_success_staged_sampling_draws_the_rest_of_k_only_when_the_first_rollouts_all_fail():
    frame = responses(30)
    labeled = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame), p=1.0), "binary", k=8, settings=SETTINGS, rule="any-success"
    )
    for steps, rollouts, values in labeled.select("steps", "label_rollouts", "step_mc").iter_rows():
        measured = [v for v in values if v is not None]
        # Good prefixes (MC 1.0 from 2 rollouts) cost 2, bad ones (0.0 from all 8) cost 8.
        assert rollouts == sum(2 if v == 1.0 else 8 for v in measured)
    soft = label_rows(
        frame,
        ScriptedRolloutEngine(answers_of(frame), p=1.0),
        "binary",
        k=8,
        settings=SETTINGS,
        soft=True,
        rule="any-success",
    )
    assert all(r % 8 == 0 for r in soft["label_rollouts"]), "soft labels need every MC value from k rollouts"


# ------------------------------------------------------------------ the drop rule (--rule drop)


def test_the_drop_rule_finds_first_errors_that_any_success_misses_when_rollouts_recover():
    """After the wrong step, 20% of rollouts still reach the right answer: "any rollout right"
    calls most wrong steps good, the drop in the success rate (80% -> 20%) does not."""
    frame = responses(40, seed=5)
    truth = frame["true_first_error"]

    def labeled(rule=None):
        engine = ScriptedRolloutEngine(answers_of(frame), p=0.8, p_bad=0.2)
        return label_rows(frame, engine, "binary", k=8, settings=SETTINGS, rule=rule)

    assert (labeled("any-success")["first_error"] == truth).mean() < 0.5
    assert (labeled("drop")["first_error"] == truth).mean() >= 0.9
    assert labeled().equals(labeled("drop"))  # the default rule


def test_when_nothing_recovers_the_drop_rule_pays_about_what_any_success_pays():
    """p_bad = 0 is any-success's own model, where it is exact; the drop rule, not told that
    rollouts never recover, must see it, and a first error at the last step is placed only by
    ruling out a drop before it."""
    frame = responses(40, seed=3)
    truth = frame["true_first_error"]

    def labeled(rule):
        engine = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.0)
        return label_rows(frame, engine, "binary", k=8, settings=SETTINGS, rule=rule)

    any_success, drop = labeled("any-success"), labeled("drop")
    assert (any_success["first_error"] == truth).all()
    assert (drop["first_error"] == truth).mean() >= 0.95
    assert drop["label_rollouts"].sum() <= 1.5 * any_success["label_rollouts"].sum()  # 1.2x here


def test_the_drop_rule_calls_a_step_the_error_only_on_k_rollouts_from_its_prefix():
    """4 of 4 right, then 0 of 2: the posterior already puts the drop there with 0.92, but two
    wrong rollouts from a good prefix happen one time in eleven at p = 0.7, so the search draws
    from that prefix until it has k, and stops once those k hold no right rollout either."""
    from prmtool.methods.labeling import DropSearch
    from prmtool.methods.rollouts import ProbeResult

    search = DropSearch(row=0, n_steps=4, correct=False, k=8, confidence=0.9, max_k=32)
    search.counts = [(4, 4), (4, 4), (0, 2), (0, 0), (0, 0)]
    assert search._likeliest() == (2, pytest.approx(0.92, abs=0.01))
    for sampled in range(2, 8):
        (probe,) = search.probes()
        assert (probe.prefix_steps, probe.first_sample) == (2, sampled)
        search.observe(ProbeResult(probe, correct=0, tokens=10))
    assert search.probes() == [] and search.outcome().first_error == 1


def test_the_full_response_is_not_sampled_so_its_own_rate_cannot_push_the_drop_late():
    """A real policy's rollouts from a whole wrong response restate its answer: they hardly ever
    recover, even where those from the steps after the error recover 30% of the time. Pooled
    with those steps, that rate would pull theirs down until a step after the error looked good:
    the drop rule never samples it."""
    frame = responses(40, seed=3).with_columns(problem=pl.format("Problem {}?", "response_id"))  # one a row
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.3)
    labeled = label_rows(frame, engine, "binary", k=8, settings=SETTINGS)
    whole = {tuple(request.prompt_ids) for call in engine.calls for request in call}
    for steps, problem in zip(frame["steps"], frame["problem"]):
        full = engine.continuation_ids(engine.chat_prompt_ids(problem), "\n\n".join(steps) + "\n\n")
        assert tuple(full) not in whole
    assert (labeled["first_error"] == frame["true_first_error"]).mean() >= 0.8  # --confidence 0.8, the default


def test_a_higher_confidence_draws_more_rollouts_and_errs_less_often():
    """--confidence is the chance, given the rollouts, that the first error found is the one: at
    0.95, about one response in twenty may be wrong, at 0.8 one in five (70% -> 30% here)."""
    frame = responses(40, seed=3)
    truth = frame["true_first_error"]

    def labeled(confidence):
        engine = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.3)
        return label_rows(frame, engine, "binary", k=8, settings=SETTINGS, confidence=confidence)

    sure, quick = labeled(0.95), labeled(0.8)
    assert (sure["first_error"] == truth).mean() >= 0.9
    assert (quick["first_error"] == truth).mean() >= 0.75
    assert sure["label_rollouts"].sum() > 1.3 * quick["label_rollouts"].sum()


def test_the_drop_rule_labels_every_step_with_per_step_mc():
    frame = responses(20, seed=2)
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.8, p_bad=0.1)
    labeled = label_rows(frame, engine, "mc", k=8, settings=SETTINGS)
    assert (labeled["first_error"] == frame["true_first_error"]).mean() >= 0.9
    for labels, first_error in zip(labeled["step_labels"].to_list(), labeled["first_error"]):
        assert None not in labels and labels.index(0) == first_error
        assert labels[-1] == 0  # a wrong response's last step is bad by its outcome


def test_the_drop_rule_draws_small_stages_that_continue_each_prefix_s_stream():
    frame = responses(30, seed=1)
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.7, p_bad=0.2)
    labeled = label_rows(frame, engine, "binary", k=8, settings=SETTINGS, max_k=32)
    drawn: dict[tuple, list] = {}  # (prompt) -> [(first_sample, n)] in the order asked
    for call in engine.calls:
        for request in call:
            drawn.setdefault((tuple(request.prompt_ids), request.seed), []).append((request.first_sample, request.n))
    staged = 0
    for stages in drawn.values():  # of each prefix probed: the start, the full response, steps between
        assert all(n == 1 for _, n in stages)  # stages of k/8
        assert stages[0][0] == 0
        for (first, n), (next_first, _) in zip(stages, stages[1:]):
            assert next_first == first + n  # each stage continues the one before
        assert stages[-1][0] + stages[-1][1] <= 32  # --max-k
        staged += len(stages) > 1
    assert staged > 0  # some prefixes needed more than one stage
    assert labeled["label_rollouts"].sum() == sum(n for stages in drawn.values() for _, n in stages)
    # An easy case (every rollout right before the error, none after) ends after a few stages.
    easy_engine = ScriptedRolloutEngine(answers_of(frame), p=1.0)
    easy = label_rows(frame, easy_engine, "binary", k=8, settings=SETTINGS)
    assert easy["first_error"].to_list() == frame["true_first_error"].to_list()
    assert easy["label_rollouts"].mean() < labeled["label_rollouts"].mean()


def test_step_mc_comes_with_a_confidence_interval_under_every_rule():
    frame = responses(20, seed=4)
    for method, rule, bad_below in [("binary", "drop", None), ("mc", "drop", None), ("mc", "any-success", None),
                                    ("binary", "bad-below", 0.5)]:  # fmt: skip
        engine = ScriptedRolloutEngine(answers_of(frame), p=0.6, p_bad=0.1)
        labeled = label_rows(frame, engine, method, k=8, settings=SETTINGS, rule=rule, bad_below=bad_below)
        for values, lows, highs in labeled.select("step_mc", "step_mc_low", "step_mc_high").iter_rows():
            assert len(values) == len(lows) == len(highs)
            for value, low, high in zip(values, lows, highs):
                assert (value is None) == (low is None) == (high is None)
                if value is not None:
                    assert 0 <= low <= value <= high <= 1
    # Wilson's interval: 0 of 8 right is no proof the rate is 0; more rollouts, a narrower interval.
    assert wilson_interval(0, 8, 0.95) == pytest.approx((0.0, 0.3244), abs=1e-4)
    low, high = wilson_interval(30, 40, 0.95)
    assert high - low < wilson_interval(6, 8, 0.95)[1] - wilson_interval(6, 8, 0.95)[0]

    def intervals(confidence):  # 95% intervals whatever the drop rule's --confidence
        engine = ScriptedRolloutEngine(answers_of(frame), p=0.6)
        labeled = label_rows(frame, engine, "mc", k=8, settings=SETTINGS, rule="any-success", confidence=confidence)
        return labeled.select("step_mc_low", "step_mc_high").to_dicts()

    assert intervals(0.99) == intervals(0.8)


def test_the_posterior_puts_the_drop_where_the_counts_fall_and_stays_unsure_when_they_do_not():
    # Prefixes 0..4: 6 of 8 right at 0 and 1, none of 8 at 2 and 4 (3 not probed).
    counts = [(6, 8), (6, 8), (0, 8), (0, 0), (0, 8)]
    posterior = first_bad_posterior(counts, [1, 2, 3, 4])
    assert posterior.argmax() == 1 and posterior[1] > 0.99  # the first bad prefix is 2
    assert posterior.sum() == pytest.approx(1.0)
    # Two rollouts cannot place a drop from 8 of 8; equal rates leave every place open.
    assert first_bad_posterior([(8, 8), (1, 2), (0, 8)], [1, 2]).max() < 0.95
    assert first_bad_posterior([(4, 8), (4, 8), (4, 8), (4, 8)], [1, 2, 3]).max() < 0.6
    assert first_bad_posterior([(4, 8), (4, 8), (4, 8), (0, 8)], [1, 2, 3]).argmax() == 2  # only the end fell
    # Where to sample next: beside the likeliest place, not where the answer is already plain.
    unsure = [(6, 8), (2, 4), (0, 0), (0, 8)]
    assert most_informative(unsure, [1, 2, 3], [(1, 2), (3, 2)])[0] == (1, 2)


def test_a_prior_learned_from_other_responses_tells_a_search_what_the_two_rates_are():
    """The analytic prior as grid weights gives the posterior of before; learned from responses
    whose rollouts fell from about 0.7 to 0.3, it reads a response's 1 of 4 as the bad rate, not
    as a hard problem's good one, so the drop is placed early where alone it was in doubt."""
    counts, places = [(3, 4), (2, 4), (1, 4), (1, 4), (0, 0)], [1, 2, 3, 4, 5]
    assert learned_prior([]) is DEFAULT_PRIOR
    assert first_bad_posterior(counts, places, DEFAULT_PRIOR) == pytest.approx(first_bad_posterior(counts, places))
    finished = [([(6, 8), (5, 8), (2, 8), (3, 8), (0, 0)], 2)] * 30 + [([(11, 16), (2, 8), (3, 8), (2, 8)], 1)] * 30
    prior = learned_prior(finished)
    alone, told = first_bad_posterior(counts, places), first_bad_posterior(counts, places, prior)
    assert alone[2:].sum() > 0.4 and told[2:].sum() < 0.15  # a drop after prefix 2: in doubt, then not


def test_the_drop_rule_learns_the_rates_from_a_first_wave_of_responses(monkeypatch):
    """With 64 wrong responses, an eighth of them (16 at least) run first with the analytic
    prior and label as they would alone; the rest run with the prior those showed, told that
    rollouts recover about one time in ten, and find the first errors as well for a third fewer
    rollouts than without it. The same seeds give the same labels, in any rounds."""
    frame = responses(64, seed=7)
    truth = frame["true_first_error"]

    def labeled(continuous=False):
        # continuous: results come back one request at a time, in a shuffled order
        engine = (OneAtATimeEngine if continuous else ScriptedRolloutEngine)(answers_of(frame), p=0.7, p_bad=0.1)
        engine.capacity = 1024  # idle slots to speculate into
        return label_rows(frame, engine, "binary", k=8, settings=SETTINGS, confidence=0.9, continuous=continuous)

    learned = labeled()
    assert labeled(continuous=True).equals(learned)  # every search of a wave sees the same prior
    monkeypatch.setattr(labeling, "FIRST_WAVE", 64)  # more than half the searches: one wave, nothing learned
    alone = labeled()
    first_wave = [index * 4 for index in range(16)]  # spread evenly over the rows
    assert learned[first_wave].equals(alone[first_wave])
    # as well: within one response of 64 (a prior learned from 16 responses is itself a guess)
    assert (learned["first_error"] == truth).mean() >= (alone["first_error"] == truth).mean() - 1 / 64
    assert (alone["first_error"] == truth).mean() >= 0.95
    assert learned["label_rollouts"].sum() < 0.75 * alone["label_rollouts"].sum()


def test_rule_options_are_checked():
    frame = responses(2)
    engine = ScriptedRolloutEngine(answers_of(frame))
    for kwargs, message in [
        ({"rule": "sometimes"}, "--rule 'sometimes': expected one of drop, any-success, bad-below"),
        ({"rule": "bad-below"}, "--rule bad-below goes with --bad-below"),
        ({"rule": "drop", "bad_below": 0.5}, "--rule bad-below goes with --bad-below"),
        ({"max_k": 4}, "--max-k 4: expected at least --k (8)"),
    ]:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            label_rows(frame, engine, "binary", k=8, settings=SETTINGS, **kwargs)
    # --bad-below alone keeps meaning what it meant: the bad-below rule.
    assert label_rows(frame, engine, "mc", k=8, settings=SETTINGS, bad_below=0.5)["label_rollouts"].sum() > 0


def test_per_step_mc_values_are_the_fraction_of_correct_rollouts():
    frame = responses(10)
    labeled = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=1.0), "mc", k=4, settings=SETTINGS)
    for values, first_error in zip(labeled["step_mc"].to_list(), frame["true_first_error"]):
        assert values == [1.0] * first_error + [0.0] * (len(values) - first_error)
    noisy = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame), p=0.5), "mc", k=8, settings=SETTINGS, rule="any-success"
    )
    measured = [v for values in noisy["step_mc"].to_list() for v in values[:-1]]
    assert all(v * 8 == int(v * 8) for v in measured), "MC values are counts out of k"
    assert 0 < sum(measured) / len(measured) < 1


def test_bad_below_sets_the_threshold_of_a_bad_step():
    frame = responses(15, seed=3)
    labeled = label_rows(
        frame, ScriptedRolloutEngine(answers_of(frame), p=0.6), "mc", k=8, settings=SETTINGS, bad_below=0.5
    )
    for values, labels in zip(labeled["step_mc"].to_list(), labeled["step_labels"].to_list()):
        assert labels == [int(v >= 0.5) for v in values]


def test_correct_responses_are_trusted_by_default_and_estimated_on_request():
    frame = responses(6).with_columns(
        correct=pl.lit(True), steps=pl.col("steps").list.eval(pl.element().str.replace("WRONG", "fine"))
    )
    engine = ScriptedRolloutEngine(answers_of(frame))
    trusted = label_rows(frame, engine, "mc", k=4, settings=SETTINGS)
    assert trusted["label_rollouts"].sum() == 0 and not engine.calls
    assert all(labels == [1] * len(labels) for labels in trusted["step_labels"].to_list())
    # Hard labels, any-success: the correct response itself proves every prefix good.
    estimate = {"settings": SETTINGS, "correct_responses": "estimate", "rule": "any-success"}
    estimated_hard = label_rows(frame, engine, "mc", k=4, **estimate)
    assert estimated_hard["label_rollouts"].sum() == 0
    estimated_soft = label_rows(frame, engine, "mc", k=4, soft=True, **estimate)
    assert estimated_soft["label_rollouts"].sum() == 4 * sum(len(s) - 1 for s in frame["steps"])
    assert all(v == 1.0 for values in estimated_soft["step_mc"].to_list() for v in values)
    # The drop rule measures them (a correct outcome proves no step kept the rate where it was).
    dropped = label_rows(frame, engine, "mc", k=4, settings=SETTINGS, correct_responses="estimate")
    assert dropped["label_rollouts"].sum() > 0
    assert all(labels == [1] * len(labels) for labels in dropped["step_labels"].to_list())


def test_binary_costs_a_fraction_of_per_step_mc():
    frame = responses(40, max_steps=16)
    binary = label_rows(frame, ScriptedRolloutEngine(answers_of(frame)), "binary", k=8, settings=SETTINGS)
    per_step = label_rows(frame, ScriptedRolloutEngine(answers_of(frame)), "mc", k=8, settings=SETTINGS)
    assert binary["label_tokens"].sum() < 0.6 * per_step["label_tokens"].sum()


def test_labels_are_reproducible_with_a_seed():
    frame = responses(10)
    first = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=0.5), "mc", k=4, settings=SETTINGS)
    again = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=0.5), "mc", k=4, settings=SETTINGS)
    assert first.equals(again)


def test_label_refuses_unverified_input(prmtool, tmp_path):
    result = prmtool("label", SAMPLES / "responses", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "missing required column 'correct'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_label_refuses_an_unknown_rounds_mode_before_loading_a_model(prmtool, tmp_path):
    result = prmtool("label", SAMPLES / "labeled", "-o", tmp_path / "out", "--rounds", "sideways")
    assert result.exit_code == 2
    assert "--rounds 'sideways': expected lockstep or continuous" in result.stderr
    assert not (tmp_path / "out").exists()


def test_label_refuses_a_rule_without_its_threshold_before_loading_a_model(prmtool, tmp_path):
    result = prmtool("label", SAMPLES / "labeled", "-o", tmp_path / "out", "--rule", "bad-below")
    assert result.exit_code == 2
    assert "--rule bad-below goes with --bad-below" in result.stderr
    result = prmtool("label", SAMPLES / "labeled", "-o", tmp_path / "out", "--k", "8", "--max-k", "4")
    assert result.exit_code == 2 and "--max-k 4: expected at least --k (8)" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_label_command_with_the_embedded_model(prmtool, tmp_path):
    """End to end: verify then label a few sample responses with SmolLM2-135M-Instruct."""
    few = tmp_path / "few"
    few.mkdir()
    pl.read_parquet(SAMPLES / "responses" / "part-00000.parquet").head(4).write_parquet(few / "part-00000.parquet")
    assert prmtool("verify", few, "-o", tmp_path / "verified", "--workers", "1").exit_code == 0
    result = prmtool(
        "label",
        tmp_path / "verified",
        "-o",
        tmp_path / "labeled",
        "--k",
        "2",
        "--max-tokens",
        "24",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--method",
        "binary",
    )
    assert result.exit_code == 0, result.stderr
    # on a CPU every sampled token costs its share: no probe is sampled ahead unless asked for
    assert "speculative" not in result.stderr
    labeled = pl.read_parquet(tmp_path / "labeled" / "part-00000.parquet")
    for steps, labels, correct, first_error, rollouts in labeled.select(
        "steps", "step_labels", "correct", "first_error", "label_rollouts"
    ).iter_rows():
        assert len(labels) == len(steps)
        if correct:
            assert labels == [1] * len(steps) and first_error == -1 and rollouts == 0
        else:
            assert 0 <= first_error < len(steps) and labels[first_error] == 0
            # The drop rule, k = 2: at most --max-k (8) rollouts a level of a binary search.
            assert rollouts <= 8 * max(1, math.ceil(math.log2(max(len(steps), 1))))
    assert labeled["label_tokens"].sum() > 0


def test_label_starts_the_verifier_workers_before_it_loads_the_model(prmtool, tmp_path, monkeypatch):
    """A process forked from one that runs an engine's threads (vLLM's) can inherit a held lock
    and hang: the command forks its verifier workers first."""
    import prmtool.stages.label as label_stage
    from prmtool.engines.loading import EngineOnDemand

    frame = pl.read_parquet(SAMPLES / "labeled" / "*.parquet").drop("step_labels", "first_error").head(3)
    frame = frame.with_columns(correct=pl.lit(False))  # every row gets a first-error search
    (tmp_path / "verified").mkdir()
    frame.write_parquet(tmp_path / "verified" / "part-00000.parquet")
    events: list[str] = []
    start_workers = label_stage.start_workers
    monkeypatch.setattr(label_stage, "start_workers", lambda workers: events.append("workers") or start_workers(1))

    def load(engine_on_demand):
        events.append("model")
        return ScriptedRolloutEngine(answers_of(frame), p=0.5)

    monkeypatch.setattr(EngineOnDemand, "_load", load)
    result = prmtool("label", tmp_path / "verified", "-o", tmp_path / "labeled", "--k", "2", "--workers", "1", "-q")
    assert result.exit_code == 0, result.stderr
    assert events[:2] == ["workers", "model"]


def test_soft_labels_under_the_drop_rule_measure_every_probed_step_from_k_rollouts_at_least():
    frame = responses(20, seed=6)
    engine = ScriptedRolloutEngine(answers_of(frame), p=1.0)
    soft = label_rows(frame, engine, "binary", k=8, settings=SETTINGS, soft=True)
    hard = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=1.0), "binary", k=8, settings=SETTINGS)
    assert soft["first_error"].to_list() == hard["first_error"].to_list() == frame["true_first_error"].to_list()
    assert soft["label_rollouts"].sum() > hard["label_rollouts"].sum()  # hard labels stop sooner
    for values, lows, highs in soft.select("step_mc", "step_mc_low", "step_mc_high").iter_rows():
        for value, low, high in zip(values, lows, highs):
            if value is not None:  # at least 8 rollouts: the interval is no wider than 8's
                assert high - low <= wilson_interval(4, 8, 0.95)[1] - wilson_interval(4, 8, 0.95)[0] + 1e-9


def test_a_response_whose_start_is_never_right_has_no_drop_and_ends_after_3k_rollouts():
    """Nothing to fall from: the first error is the last step, the step that left the answer wrong
    (as the binary search's invariant has it), found once the start failed 2k rollouts."""
    frame = responses(10, seed=7)
    counts = {}
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.0)
    labeled = label_rows(frame, engine, "binary", k=4, settings=SETTINGS, counts=counts)
    for steps, first_error, rollouts in labeled.select("steps", "first_error", "label_rollouts").iter_rows():
        assert first_error == len(steps) - 1
        assert rollouts <= 3 * 4  # k rollouts anywhere, then the start's 2k
    # the summary says how many labels rest on no right rollout (a one-step response needs none:
    # its step is the error)
    searched = int((labeled["label_rollouts"] > 0).sum())
    assert counts["wrong_responses_no_rollout_right"] == searched > 0
    # and each row says it (train leaves such rows out): 0 right, null where nothing was drawn
    drawn = labeled["label_rollouts"] > 0
    assert labeled["label_right_rollouts"].to_list() == [0 if d else None for d in drawn]
    for rule, p in (("any-success", 0.0), ("drop", 0.7)):
        counts = {}
        other = label_rows(frame, ScriptedRolloutEngine(answers_of(frame), p=p), "binary", k=4, settings=SETTINGS,
                           rule=rule, counts=counts)  # fmt: skip
        assert counts["wrong_responses_no_rollout_right"] == (searched if p == 0 else 0)
        assert (other["label_right_rollouts"].fill_null(0) > 0).sum() == (0 if p == 0 else searched)
    # --max-k as low as --k: the start stops at k, no stage is ever empty
    engine = ScriptedRolloutEngine(answers_of(frame), p=0.0)
    capped = label_rows(frame, engine, "binary", k=4, settings=SETTINGS, max_k=4)
    assert capped["first_error"].equals(labeled["first_error"])
    assert all(request.n > 0 for call in engine.calls for request in call)
