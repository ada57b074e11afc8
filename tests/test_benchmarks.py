"""The GPU benchmarks' CPU smoke runs (`--quick`): each script still runs, and the reference it
times computes what the stage computes, so its speed ratio compares like with like."""

import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def run_bench(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_score_reference_gives_the_stages_step_values():
    """The reference (ImplicitPRM's recipe: prefix re-tokenization, padded batches of 4, full
    log-softmax) and `score_implicit` agree on every step value, in float32 on CPU."""
    out = run_bench("bench/bench_score.py", "--quick")
    assert re.search(r"prmtool / reference: [\d.]+x tokens/s end to end, [\d.]+x against its model passes alone", out)
    largest = float(
        re.search(r"step values, prmtool vs reference: correlation [\d.]+, largest difference (\S+),", out)[1]
    )
    assert largest < 1e-6


def test_bench_kernels_fallbacks_match_the_unfused_path():
    out = run_bench("bench/bench_kernels.py", "--quick")
    errors = [float(e) for e in re.findall(r"relative error (\S+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-5
    assert re.search(r"sample +kernel: needs CUDA and Triton +torch +[\d.]+ ms", out)


def test_bench_kernels_times_a_layers_matrix_products_at_each_row_count_and_marks_the_engines():
    out = run_bench("bench/bench_kernels.py", "--quick", "--matmul-rows")
    rows = re.findall(r"^ +(\d+) +(yes)? +(?:[\d.]+ +){5}([\d.]+) +[\d.]+$", out, flags=re.MULTILINE)
    assert [int(count) for count, _, _ in rows] == [8, 16, 32, 64, 96, 128]
    assert [count for count, used, _ in rows if used] == ["8", "16", "32", "64", "128"]  # no step runs 96 rows


def test_bench_scale_runs_each_way_and_every_way_gives_the_one_process_labels():
    """One process, Ray tasks, and `xargs -P` with --shard-index: the same labels row for row."""
    out = run_bench("bench/bench_scale.py", "--quick")
    assert re.search(r"2 GPUs, ray +[\d.]+ s", out) and re.search(r"2 GPUs, xargs -P +[\d.]+ s", out)
    assert "ray output equals the one-GPU run row for row: True" in out
    assert "xargs output equals the one-GPU run row for row: True" in out


def test_bench_label_overhead_replays_labels_work_and_every_mode_gives_its_labels():
    """Each mode labels the same rows as the first, and the bare engine replays what it asked;
    a list of sizes runs on one engine and ends in one table."""
    out = run_bench(
        "bench/bench_label.py", "overhead", "--quick", "--responses", "6,8", "--max-tokens", "8",
        "--modes", "lockstep,lockstep+speculation,continuous+speculation", "--workers", "1",
    )  # fmt: skip
    assert out.count("bare engine, the same requests in one call") == 2
    assert out.count("labels as in lockstep: True") == 4 and "False" not in out
    # Lockstep runs split label's time into its engine calls and the work between them.
    assert len(re.findall(r"engine calls [\d.]+ s \([\d., ]+\), label's work between them [\d.]+ s", out)) == 4
    rows = re.findall(r"^\| hf, (\d+), 8 \| (\S+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, flags=re.MULTILINE)
    assert len(rows) == 6 and {size for size, _ in rows} == {"6", "8"}


def test_bench_label_long_labels_with_each_method_and_reports_rates_and_agreement(tmp_path):
    """(a) label in each mode, (b) the naive search and (c) per-step MC on the same responses:
    one row each, the rollouts a response took, and first errors as (c)'s. Rollouts answer by
    seeded coins that never come up right after the wrong step, so every method finds (c)'s
    first errors, and staged sampling spends fewer rollouts than the naive search's k a probe."""
    out = run_bench(
        "bench/bench_label.py", "long", "--quick", "--responses", "6", "--mc-responses", "3", "--max-tokens", "64",
        "--eos-every", "20", "--modes", "lockstep,lockstep+speculation", "--workers", "1",
        "--results", str(tmp_path / "long.jsonl"),
    )  # fmt: skip
    # method | responses | seconds | per GPU-hour | rollouts / response | tokens / response | tok/s | peak | as (c)
    table_row = (
        r"^\| (\([abc]\)[^|]*) \| (\d+) \| [\d.]+ \| [\d,]+ \| ([\d.,]+) \| ([\d,]+) \| [\d,]+ \| nan \| ([\d.]+) \|$"
    )
    rows = re.findall(table_row, out, flags=re.MULTILINE)
    methods = [row[0] for row in rows]
    assert len(methods) == 4 and [m[:3] for m in methods] == ["(a)", "(a)", "(b)", "(c)"]
    assert methods[0].endswith("hf engine, lockstep") and methods[1].endswith("lockstep+speculation")
    assert [int(row[1]) for row in rows] == [6, 6, 6, 3]  # (c) on the first --mc-responses
    assert {row[4] for row in rows} == {"1.000"}
    lockstep, naive, per_step = float(rows[0][2]), float(rows[2][2]), float(rows[3][2])
    assert lockstep < naive < per_step
    # every 20th id ends a rollout: most end well before --max-tokens
    tokens_per_rollout = float(rows[2][3].replace(",", "")) / naive
    assert tokens_per_rollout < 40
    # A second invocation (another engine, another lease) adds its rows to the same table; this
    # one runs (a) alone, on longer responses, and shows where the engine's prefill work went.
    again = run_bench(
        "bench/bench_label.py", "long", "--quick", "--responses", "6", "--mc-responses", "3", "--max-tokens", "64",
        "--eos-every", "20", "--modes", "continuous", "--methods", "a", "--response-words", "150,200",
        "--workers", "1", "--results", str(tmp_path / "long.jsonl"),
    )  # fmt: skip
    methods = [row[0] for row in re.findall(table_row, again, flags=re.MULTILINE)]
    assert len(methods) == 5 and methods[:4] == [m for m, *_ in rows] and methods[4].endswith("continuous")
    computed = re.search(r"prefill_tokens ([\d,]+), prefill_padded_tokens ([\d,]+)", again)
    real, padded = (int(number.replace(",", "")) for number in computed.groups())
    assert 6 * 150 // 2 <= real <= padded  # each search's first probe computes about half its response


def test_bench_label_schedule_counts_the_waves_of_each_mode_on_label_itself():
    """The schedule model drives label's own code: speculation never needs more waves than
    lockstep rounds alone, and no mode needs fewer than the bare engine."""
    out = run_bench("bench/bench_label.py", "schedule", "--responses", "64", "--slots", "128", "--workers", "1")
    rows = dict(
        (mode, (int(waves), int(bare)))
        for mode, waves, bare in re.findall(r"^\| 64 \| (\S+) \| (\d+) \| (\d+) \|", out, flags=re.MULTILINE)
    )
    assert set(rows) == {"lockstep", "lockstep+speculation", "continuous", "continuous+speculation"}
    assert all(waves >= bare for waves, bare in rows.values())
    assert rows["lockstep+speculation"][0] <= rows["lockstep"][0]


def test_bench_label_fidelity_measures_every_rule_through_label_and_writes_one_record_each(tmp_path):
    """The quick run: 24 ProcessBench GSM8K structures, two grid points, every rule and method;
    under the noisy policy the drop rule finds first errors today's rule misses."""
    out = run_bench(
        "bench/bench_label.py", "fidelity", "--quick", "--workers", "1", "--json", str(tmp_path / "f.jsonl")
    )
    assert out.startswith("24 wrong responses from gsm8k.jsonl")
    records = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 2
    assert {(r["p_good"], r["p_bad"]) for r in records} == {(0.7, 0.0), (0.7, 0.1)}
    assert {r["rule"] for r in records} == {"any-success", "bad-below 0.35", "drop"}
    assert {r["method"] for r in records} == {"binary", "mc"}
    for r in records:
        assert set(r) == {"p_good", "p_bad", "rule", "method", "exact", "early", "late", "rollouts"}
        assert abs(r["exact"] + r["early"] + r["late"] - 1) < 1e-9 and r["rollouts"] > 0
    exact = {(r["p_bad"], r["rule"], r["method"]): r["exact"] for r in records}
    assert exact[(0.0, "any-success", "binary")] == 1.0  # no recovery: today's rule is exact
    assert exact[(0.1, "drop", "binary")] > exact[(0.1, "any-success", "binary")] + 0.2
    assert len(re.findall(r"^\| 0\.7, 0\.1 \| drop \| binary \| ", out, flags=re.MULTILINE)) == 1


def test_bench_label_fidelity_rates_known_tells_the_drop_rule_the_policys_rates():
    """--rates-known: the upper bound a prior learned from the run's rollouts could approach."""
    out = run_bench("bench/bench_label.py", "fidelity", "--quick", "--workers", "1", "--methods", "binary",
                    "--rates-known", "--confidence", "0.999")  # fmt: skip
    row = r"^\| 0\.7, 0\.0 \| drop, rates known \| binary \| ([\d.]+) \|.* \| ([\d.]+) \|$"
    told = re.search(row, out, flags=re.MULTILINE)
    assert float(told[1]) == 1.0 and float(told[2]) < 1.0  # exact, for fewer rollouts than any-success


def test_bench_label_fidelity_reads_other_step_structures_and_refuses_bad_ones(tmp_path):
    rows = [
        {"steps": ["a", "b", "c"], "label": 1},
        {"steps": ["a", "b"], "label": -1},
        {"steps": ["a", "b"], "label": 0},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = run_bench(
        "bench/bench_label.py", "fidelity", "--quick", "--workers", "1", "--data", str(tmp_path / "rows.json")
    )
    assert out.startswith("2 wrong responses from rows.json")  # the row without an error is left out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"steps": ["a"]}) + "\n")
    result = subprocess.run(
        [sys.executable, "bench/bench_label.py", "fidelity", "--data", str(tmp_path / "bad.jsonl")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "no column label" in result.stderr


def test_bench_generate_shape_runs_each_engine_in_its_own_process_and_prints_the_table():
    """Each engine in its own process over every shape; --eos-every 4 ends samples at random, as
    rollouts end, and hf-no-compaction leaves a draining batch's rows in place; --profile prints
    each hf engine's decode kernels by time over a window of steps mid-run, after its timed pass."""
    out = run_bench("bench/bench_generate.py", "--quick", "--shape", "short,long", "--engines", "hf,hf-no-compaction",
                    "--eos-every", "4", "--profile")  # fmt: skip
    assert "--worker hf --shape short,long" in out  # one process for the engine, every shape in it
    for shape in ("short", "long"):  # requests, engine, tokens/s, slots, peak, seconds
        for engine in ("hf", "hf-no-compaction"):
            row = rf"^{shape} +8 x 16 x n=4, 4..32 +{engine} +[\d,]+ +16 +nan +[\d.]+ +[\d.]+$"
            assert re.search(row, out, flags=re.MULTILINE)
    # two engines x two shapes, each profiled from the step by which half its decode rows are done
    assert len(re.findall(r"eager decode steps from step \d+, \d+ samples decoding a step:", out)) == 4
    assert "aten::mm" in out and out.count("ms a step (wall)") == 4
    stats = re.findall(r"^  hf engine, long: GenerationStats\((.*)\); decoder setup", out, flags=re.MULTILINE)
    compactions = [int(re.search(r"compactions=(\d+)", line)[1]) for line in stats]
    assert compactions[0] > 0 and compactions[1] == 0  # hf, then hf-no-compaction
    generated = [int(re.search(r"generated_tokens=(\d+)", line)[1]) for line in stats]
    # one token id in 4 ends a sample: about 4 tokens a sample, where max_tokens averages 18
    assert all(tokens / (8 * 4) < 10 for tokens in generated)


def test_bench_train_runs_prmtool_trl_1_13_and_trainer_on_the_same_tokens():
    """Both sides train one epoch on the same rows (the script asserts equal token counts), and
    the ratios print; TRL 1.13 comes from the consumer folder (tests/consumers/install.sh)."""
    subprocess.run(["bash", str(ROOT / "tests/consumers/install.sh")], check=True, capture_output=True)
    out = run_bench("bench/bench_train.py", "--quick")
    assert re.search(r"TRL batches of 4 rows are [\d.]+% padding", out)
    for side in ("prmtool", "trl", "trainer"):
        assert re.search(rf"  {side} +[\d,]+ tokens/s", out)
    assert re.search(r"prmtool / TRL 1.13 PRMTrainer: [\d.]+x tokens/s", out)
    assert re.search(r"plain loop / transformers' Trainer on the same packed batches: [\d.]+x tokens/s", out)
