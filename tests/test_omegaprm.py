"""OmegaPRM tree search (`prmtool label --method omegaprm`).

The branching engine below writes multi-step rollouts so the tree has somewhere to grow: each
generated step is "WRONG" with probability `wrong_step`, and a rollout is right with
probability `p` unless its prefix or its own steps hold a "WRONG" step. So any prefix holding
"WRONG" has true MC = 0, and the tree's measured MC there must be exactly 0.
"""

import random
from collections import Counter

import polars as pl
import pytest

from prmtool.engines import Completion
from prmtool.methods.labeling import label_rows
from prmtool.methods.omegaprm import TREE_SCHEMA, SearchConfig, grow_trees, tree_frame
from prmtool.methods.progress import wilson_interval
from prmtool.methods.rollouts import RolloutSettings
from prmtool.methods.steps import make_splitter
from tests.test_label import ScriptedRolloutEngine, answers_of, responses

SETTINGS = RolloutSettings(workers=1)
SEPARATOR = "\n\n"


class BranchingRolloutEngine(ScriptedRolloutEngine):
    def __init__(self, answers: dict[str, str], p: float = 0.5, wrong_step: float = 0.3):
        super().__init__(answers, p)
        self.wrong_step = wrong_step

    def sample(self, requests, on_progress=None):
        self.calls.append(requests)
        results = []
        for request in requests:
            problem, prefix = split_prompt(request.prompt_ids)
            rng = random.Random(request.seed)
            samples = []
            for _ in range(request.n):
                steps = [
                    "Next: WRONG." if rng.random() < self.wrong_step else "Next: fine."
                    for _ in range(rng.randint(1, 4))
                ]
                right = "WRONG" not in prefix and "WRONG" not in "".join(steps) and rng.random() < self.p
                gold = int(self.answers[problem])
                answer = f"\\frac{{{2 * gold}}}{{2}}" if right else str(gold + 1)
                text = SEPARATOR.join(steps + [f"So the result is \\boxed{{{answer}}}."])
                samples.append(Completion(text, [1] * len(text.split()), len(text.split()), "stop"))
            results.append(samples)
        return results


def split_prompt(prompt_ids: list[int]) -> tuple[str, str]:
    end = prompt_ids.index(0)
    return "".join(map(chr, prompt_ids[:end])), "".join(map(chr, prompt_ids[end + 1 :]))


def grow(frame, engine, **config):
    return grow_trees(frame, engine, SearchConfig(**config), SETTINGS, make_splitter("blank-line"))


def test_search_rollouts_never_exceed_the_budget():
    frame = responses(30)
    engine = BranchingRolloutEngine(answers_of(frame))
    searches = grow(frame, engine, k=4, budget=22, screen_rollouts=8)
    assert any(search.kept for search in searches.values())
    # Guarantee: a probe is issued only if its k rollouts fit, so search rollouts <= budget
    # exactly, and a question costs at most screen_rollouts + budget rollouts in all.
    sampled = Counter()
    for call in engine.calls:
        for request in call:
            sampled[split_prompt(request.prompt_ids)[0]] += request.n
    problems = dict(zip(frame["problem_id"], frame["problem"]))
    for problem_id, search in searches.items():
        assert search.search_rollouts <= 22
        assert sampled[problems[problem_id]] == 8 + search.search_rollouts <= 8 + 22
    assert max(search.search_rollouts for search in searches.values()) == 20, (
        "the budget is spent up to the last whole probe"
    )


def test_a_picked_candidate_is_never_picked_again():
    frame = responses(30)
    searches = grow(frame, BranchingRolloutEngine(answers_of(frame)), k=4, budget=200, screen_rollouts=8)
    assert sum(len(search.picked) for search in searches.values()) > 20
    for search in searches.values():
        assert len(search.picked) == len(set(search.picked)), "no candidate is picked twice"


def test_the_search_ends_when_the_pool_is_empty():
    # One-step rollouts: a wrong one's first error is its only step, so every pick is settled
    # without a probe and the pool drains however large the budget.
    frame = responses(30)
    searches = grow(frame, ScriptedRolloutEngine(answers_of(frame), p=0.5), k=4, budget=10**9, screen_rollouts=8)
    for search in searches.values():
        assert search.kept and not search.pool and search.search_rollouts == 0
        wrong = round((1 - search.states[0].mc) * 8)
        assert len(search.picked) == wrong, "each wrong screen rollout was picked exactly once"


def test_screening_drops_questions_whose_screen_is_all_right_or_all_wrong():
    frame = responses(20)
    for p, wrong_step in ((1.0, 0.0), (0.0, 0.3)):
        engine = BranchingRolloutEngine(answers_of(frame), p=p, wrong_step=wrong_step)
        searches = grow(frame, engine, k=4, budget=40, screen_rollouts=8)
        assert not any(search.kept for search in searches.values())
        assert len(engine.calls) == 1, "only the screen ran"
        tree = tree_frame(frame, searches, SEPARATOR)
        assert tree.height == 0 and tree.schema == pl.Schema(TREE_SCHEMA)


def test_tree_states_hold_measured_mc_and_prefixes_with_an_error_have_mc_zero():
    frame = responses(30)
    searches = grow(frame, BranchingRolloutEngine(answers_of(frame)), k=4, budget=60, screen_rollouts=16)
    tree = tree_frame(frame, searches, SEPARATOR)
    assert tree.height > len(searches), "the tree grows beyond the screened roots"
    assert set(tree["problem_id"]) <= set(frame["problem_id"])
    for prefix, steps, mc, rollouts in tree.select("prefix", "prefix_steps", "mc", "rollouts").iter_rows():
        assert 0 <= mc <= 1 and mc * rollouts == round(mc * rollouts)
        assert prefix == (SEPARATOR.join(steps) + SEPARATOR if steps else "")
        if "WRONG" in prefix:
            assert mc == 0
    assert (tree.filter(pl.col("prefix") == "")["rollouts"] == 16).all(), "roots come from the screen"
    assert tree.filter(pl.col("prefix").str.contains("WRONG")).height > 0
    assert tree.filter((pl.col("mc") > 0) & (pl.col("prefix") != "")).height > 0
    # Each state's MC keeps its meaning and comes with its Wilson interval (95% by default).
    for mc, low, high, rollouts in tree.select("mc", "mc_low", "mc_high", "rollouts").iter_rows():
        assert (low, high) == pytest.approx(wilson_interval(round(mc * rollouts), rollouts, 0.95))
        assert 0 <= low <= mc <= high <= 1


def test_all_question_searches_advance_together_one_engine_call_per_round():
    frame = responses(30)
    engine = BranchingRolloutEngine(answers_of(frame))
    searches = grow(frame, engine, k=4, budget=40, screen_rollouts=8)
    # Each question asks one probe per round from the screen until it stops, so the rounds
    # are those of the longest search, not the sum over questions.
    assert len(engine.calls) == max(1 + search.search_rollouts // 4 for search in searches.values())
    assert len(engine.calls[0]) == len(searches), "every question's screen in one call"
    assert any(len({split_prompt(r.prompt_ids)[0] for r in call}) > 1 for call in engine.calls[1:])


def test_omegaprm_labels_the_input_rows_as_binary_does():
    frame = responses(20)
    omega = label_rows(frame, ScriptedRolloutEngine(answers_of(frame)), "omegaprm", k=4, settings=SETTINGS)
    binary = label_rows(frame, ScriptedRolloutEngine(answers_of(frame)), "binary", k=4, settings=SETTINGS)
    assert omega.equals(binary)


def test_label_command_writes_the_omegaprm_tree(prmtool, tmp_path, tiny_model_dir):
    verified = tmp_path / "verified"
    verified.mkdir()
    responses(4, max_steps=3).drop("true_first_error").write_parquet(verified / "part-00000.parquet")
    refused = prmtool("label", verified, "-o", tmp_path / "labeled", "--method", "omegaprm")
    assert refused.exit_code == 2 and "--tree-output" in refused.stderr
    result = prmtool(
        "label",
        verified,
        "-o",
        tmp_path / "labeled",
        "--method",
        "omegaprm",
        "--tree-output",
        tmp_path / "tree",
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--k",
        "2",
        "--max-tokens",
        "8",
        "--search-budget",
        "8",
        "--screen-rollouts",
        "4",
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    labeled = pl.read_parquet(tmp_path / "labeled" / "part-00000.parquet")
    assert labeled.height == 4 and {"step_labels", "first_error", "label_rollouts"} <= set(labeled.columns)
    tree = pl.read_parquet(tmp_path / "tree" / "part-00000.parquet")
    assert list(tree.columns) == list(TREE_SCHEMA)
