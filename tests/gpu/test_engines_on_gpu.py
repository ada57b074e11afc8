"""Every model stage on a GPU with both engines, through the command line, on random-weight
model folders saved with `save_pretrained` (tokenizer included). Skipped without CUDA, so CI
(CPU only) never runs them; on the GPU machine:

    python -m pytest -v -m gpu tests/gpu                 # everything
    python -m pytest -v -m gpu tests/gpu -k "hf and not agrees"
    python -m pytest -v -m gpu tests/gpu -k "vllm and command_line and (generate or binary or mc)"

The vllm cases need vLLM installed (`pip install 'prmtool[vllm]'`). Each command starts its own
engine. Measured on one H200 (2026-12-04, vLLM 0.26.0, eager): a vLLM start about a minute, and
on a fresh machine the first one 173 s, 101 s of it in vLLM's engine warm-up, where its
FlashInfer sampler was JIT-built (the engine now turns that sampler off: seeded requests never
use it). On one H100 (2026-12-06, vLLM 0.26.0, transformers 5.17, torch 2.11), all passed:
`-k "hf and not agrees"` 8 in 3 min 36 s; `-k "vllm or agrees"` 9 in 11 min 58 s, each test
47-127 s (score agreement, two engines and three model loads, the longest). Give each test
600 s (`--timeout 600`) and, under a 10-minute limit per command, run the vllm cases in groups
of four or five, or in the background.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from prmtool.core.schema import COLUMNS
from tests.conftest import ROOT
from tests.engine_fixtures import build_tokenizer

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="needs vllm"))]
# vLLM starts in a few seconds without CUDA graphs; a test run needs no more speed than that.
VLLM_ENV = {"PRMTOOL_VLLM_OPTIONS": json.dumps({"enforce_eager": True, "gpu_memory_utilization": 0.3})}


def save_model(folder: Path, seed: int) -> Path:
    """A small Llama whose head size (64) every vLLM attention backend supports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15)  # peaked next-token distributions, as in engine_fixtures
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        "policy": save_model(tmp_path_factory.mktemp("policy"), seed=0),
        "ref": save_model(tmp_path_factory.mktemp("ref"), seed=1),
    }


COMMAND_TIMEOUT = 300  # seconds: a vLLM start takes about a minute (3 on a fresh machine); more is a hang


def prmtool(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """One command in its own process: each vLLM instance gets a clean GPU."""
    command = [sys.executable, "-m", "prmtool", *map(str, args)]
    environment = {**os.environ, **(env or {})}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, env=environment, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr
        shown = " ".join(map(str, args))
        pytest.fail(f"prmtool {shown}: no answer in {COMMAND_TIMEOUT} s; its stderr:\n{(stderr or '')[-3000:]}")
    assert result.returncode == 0, f"prmtool {' '.join(map(str, args))}:\n{result.stderr[-3000:]}"
    return result


def columns_of(directory: Path) -> dict[str, pl.DataType]:
    return dict(pl.read_parquet_schema(sorted(directory.glob("*.parquet"))[0]))


def assert_contract(directory: Path, stage: str) -> None:
    """The columns `stage` adds are there, with the contract's types."""
    found = columns_of(directory)
    for column in COLUMNS.values():
        if stage in column.written_by and column.name in found:
            assert found[column.name] == column.dtype, (stage, column.name, found[column.name])
    added = [c.name for c in COLUMNS.values() if stage in c.written_by]
    assert any(name in found for name in added), (stage, sorted(found))


@pytest.fixture(scope="module")
def stage_inputs(models, tmp_path_factory) -> Path:
    """Problems, verified responses and labeled responses, made once with the hf engine: the
    inputs of the stage tests below, so each of those starts one engine of its own."""
    work = tmp_path_factory.mktemp("inputs")
    policy = models["policy"]
    common = ["--engine", "hf", "--device", "cuda", "-q"]
    prmtool("import", ROOT / "data_samples/gsm8k/test_sample.jsonl", "--preset", "gsm8k", "-o", work / "problems", "-q")
    prmtool("generate", work / "problems", "-o", work / "responses", "--model", policy, "--n", 2, "--max-tokens", 48,
            "--temperature", 1.0, *common)  # fmt: skip
    prmtool("verify", work / "responses", "-o", work / "verified", "-q")
    prmtool("label", work / "verified", "-o", work / "labeled", "--method", "binary", "--model", policy, "--k", 2,
            "--max-tokens", 24, *common)  # fmt: skip
    return work


def stage_command(stage: str, inputs: Path, models: dict, out: Path) -> list:
    """The command line of one model stage, from the module's inputs to `out`."""
    policy = models["policy"]
    if stage == "generate":
        return ["generate", inputs / "problems", "-o", out, "--model", policy, "--n", 2, "--max-tokens", 48,
                "--temperature", 1.0]  # fmt: skip
    if stage.startswith("label-"):
        method = stage.removeprefix("label-")
        tree = ["--tree-output", out.with_name("tree"), "--search-budget", 4, "--screen-rollouts", 4]
        return ["label", inputs / "verified", "-o", out, "--method", method, "--model", policy, "--k", 2,
                "--max-tokens", 24, *(tree if method == "omegaprm" else [])]  # fmt: skip
    if stage == "score":
        return ["score", inputs / "labeled", "-o", out, "--policy", policy, "--ref", models["ref"]]
    if stage == "intervene":
        return ["intervene", inputs / "labeled", "-o", out, "--model", policy, "--candidates", 1, "--verify-rollouts",
                2, "--max-tokens", 24, "--proposer-max-tokens", 32, "--rejects", out.with_name("rejects")]  # fmt: skip
    raise ValueError(stage)


MODEL_STAGES = ["generate", "label-binary", "label-mc", "label-omegaprm", "score", "intervene"]


@pytest.mark.parametrize("stage", MODEL_STAGES)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_model_stage_runs_through_the_command_line(engine, stage, models, stage_inputs, tmp_path):
    """One engine start per test (about a minute on vLLM), so a slow or stuck stage shows as
    itself, and any subset fits one command on the GPU machine."""
    out = tmp_path / "out"
    command = stage_command(stage, stage_inputs, models, out)
    prmtool(*command, "--engine", engine, "--device", "cuda", "-q", env=VLLM_ENV if engine == "vllm" else None)
    if stage == "intervene":
        assert (out / "_SUCCESS").exists()
    else:
        assert_contract(out, stage.split("-")[0])
    if stage == "score":  # the scored rows export as TRL's stepwise dataset
        prmtool("export", out, "-o", tmp_path / "trl", "--format", "trl-stepwise", "-q")
        assert (tmp_path / "trl" / "_SUCCESS").exists()


@pytest.mark.skipif(not HAS_VLLM, reason="needs vllm")
def test_score_agrees_between_the_engines(models, tmp_path):
    """Step values are sums of per-token log-ratios. vLLM computes its log-probabilities in
    bf16 with its own kernels; the hf engine's fused path keeps the log-normalizer in float32.
    Per token they differ by up to about 0.1 nats in bf16, so the values, scaled by beta, are
    compared with a tolerance of beta * 0.1 per token of the prefix."""
    labeled = tmp_path / "verified"
    sample = pl.read_parquet(ROOT / "data_samples/gsm8k/labeled/*.parquet").head(8)
    labeled.mkdir()
    sample.write_parquet(labeled / "part-00000.parquet")
    beta = 0.05
    for engine in ("hf", "vllm"):
        prmtool("score", labeled, "-o", tmp_path / engine, "--policy", models["policy"], "--ref", models["ref"],
                "--beta", beta, "--engine", engine, "--device", "cuda", "-q",
                env=VLLM_ENV if engine == "vllm" else None)  # fmt: skip
    hf = pl.read_parquet(tmp_path / "hf/*.parquet").sort("response_id")
    vllm = pl.read_parquet(tmp_path / "vllm/*.parquet").sort("response_id")
    worst = 0.0
    for a, b, response in zip(hf["step_values"], vllm["step_values"], hf["response"]):
        assert len(a) == len(b)
        tokens = max(1, len(response) // 2)  # an upper bound on the response's tokens (>= 2 chars each)
        for x, y in zip(a, b):
            worst = max(worst, abs(x - y))
            assert abs(x - y) <= beta * 0.1 * tokens
    print(f"largest step-value difference hf vs vllm: {worst:.4f} (beta {beta})")


class CountingEngine:
    """An engine wrapper that counts calls of `sample` and `sample_continuously`."""

    def __init__(self, engine):
        self.engine, self.calls = engine, {"sample": 0, "sample_continuously": 0}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def sample(self, requests, on_progress=None):
        self.calls["sample"] += 1
        return self.engine.sample(requests, on_progress)

    def sample_continuously(self, *args, **kwargs):
        self.calls["sample_continuously"] += 1
        return self.engine.sample_continuously(*args, **kwargs)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_label_makes_one_engine_call_per_round_and_seeds_repeat(engine_name, models):
    import prmtool as api
    from prmtool.engines import SamplingRequest
    from prmtool.methods.labeling import MAX_K_PER_K, drop_levels, label_rows
    from prmtool.methods.rollouts import RolloutSettings

    frame = pl.read_parquet(ROOT / "data_samples/gsm8k/labeled/*.parquet").drop("step_labels", "first_error")
    frame = frame.with_columns(correct=pl.lit(False))  # every response gets a first-error search
    options = {"deterministic": True, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    # hf: prefixes' keys and values computed once and reused could differ in their last bits
    # from ones computed in another batch; without the prefix cache a sample is bit for bit its seed's.
    engine = api.load_engine(
        engine_name,
        str(models["policy"]),
        device="cuda",
        **(options if engine_name == "vllm" else {"prefix_cache": False}),
    )
    with engine:
        counting = CountingEngine(engine)
        settings = api.label.settings(k=4, max_tokens=16, method="binary")
        first = api.label.label_frame(frame, counting, settings)
        longest = max(len(s) for s in frame["steps"])
        # the drop rule (the default) draws one stage a round from each search, at least one
        # rollout, and a search ends at its budget (max_k = 4k rollouts for each level of a
        # binary search over its places) if not before: one engine call per round for all rows
        # together, so never more calls than the longest search's budget
        assert 1 <= counting.calls["sample"] <= MAX_K_PER_K * 4 * drop_levels(longest)  # k = 4
        # continuous rounds: every probe, follow-ups included, through one engine call
        continuous = CountingEngine(engine)
        again = label_rows(frame, continuous, "binary", k=4, settings=RolloutSettings.of(settings, 2), continuous=True)
        assert continuous.calls == {"sample": 0, "sample_continuously": 1}
        # speculation (on above: the engine has idle slots here) changes no label
        plain = label_rows(frame, engine, "binary", k=4, settings=RolloutSettings.of(settings, 2), speculate=False)
        # staged probes and speculation rest on this: a request split in two samples the whole
        prompt = engine.chat_prompt_ids("What is 2 + 3?")
        whole = engine.sample([SamplingRequest(prompt, n=8, max_tokens=16, temperature=1.0, seed=5)])[0]
        first_two, rest = engine.sample(
            [
                SamplingRequest(prompt, n=2, max_tokens=16, temperature=1.0, seed=5),
                SamplingRequest(prompt, n=6, max_tokens=16, temperature=1.0, seed=5, first_sample=2),
            ]
        )
    assert [c.token_ids for c in first_two + rest] == [c.token_ids for c in whole]
    assert plain["step_labels"].to_list() == first["step_labels"].to_list()
    # the same seed and inputs give the same labels, in continuous or lockstep rounds (vLLM:
    # with deterministic=True). Token counts are not compared on hf: a sample's tokens depend
    # on its seed only up to bf16 differences between batch shapes, which can move an EOS.
    assert first["step_labels"].to_list() == again["step_labels"].to_list()
    assert first["label_rollouts"].to_list() == again["label_rollouts"].to_list()
    if engine_name == "vllm":
        assert first["label_tokens"].to_list() == again["label_tokens"].to_list()


def test_hf_engine_reuses_its_decoder_and_graphs_for_shorter_requests(models):
    import prmtool as api
    from prmtool.engines import SamplingRequest

    def sample(engine, prompt, seed):
        return engine.sample([SamplingRequest(prompt, n=8, max_tokens=16, temperature=1.0, seed=seed)])[0]

    with api.load_engine("hf", str(models["policy"]), device="cuda", prefix_cache=False) as engine:
        short = engine.chat_prompt_ids("What is 2 + 3?")
        long = engine.chat_prompt_ids("Add: " + " + ".join(map(str, range(150))))
        sample(engine, long, seed=0)
        sized_for_long = engine.decoder
        on_it = sample(engine, short, seed=1)
        assert engine.decoder is sized_for_long and engine.decoders_built == 1
        assert sized_for_long.graphs and engine.setup_seconds() > 0  # decoding replays CUDA graphs
    with api.load_engine("hf", str(models["policy"]), device="cuda", prefix_cache=False) as fresh:
        alone = sample(fresh, short, seed=1)
        assert fresh.decoder.max_len < sized_for_long.max_len
    assert [c.token_ids for c in on_it] == [c.token_ids for c in alone]


def test_hf_decoder_captures_a_graph_for_every_row_count_when_it_is_built(models):
    """As vLLM captures its batch sizes at start: 20 samples that end together run at one row
    count only, yet every count the decoder can run at has its graph, and a second call of the
    same shape captures nothing."""
    import prmtool as api
    from prmtool.engines import SamplingRequest

    with api.load_engine("hf", str(models["policy"]), device="cuda") as engine:
        prompt = engine.chat_prompt_ids("What is 2 + 3?")
        engine.sample([SamplingRequest(prompt, n=20, max_tokens=8, temperature=1.0, seed=0)])
        decoder, setup = engine.decoder, engine.setup_seconds()
        assert decoder.num_slots == 32 and decoder.row_counts == [8, 16, 32]
        assert sorted(decoder.graphs) == [(rows, decoder.max_len) for rows in decoder.row_counts]
        engine.sample([SamplingRequest(prompt, n=20, max_tokens=8, temperature=1.0, seed=1)])
        assert engine.decoder is decoder and engine.setup_seconds() == setup


@pytest.mark.parametrize("engine", ENGINES)
def test_the_quickstart_recipe_runs_with_either_engine(engine, models, tmp_path):
    """`prmtool run --engine vllm`: one model instance serves every stage of the recipe."""
    env = VLLM_ENV if engine == "vllm" else None
    recipe = ROOT / "recipes/quickstart.yaml"
    result = prmtool(
        "run", recipe, "--engine", engine, "--model", models["policy"], "--workdir", tmp_path / "qs", "-q", env=env
    )
    assert "stages complete" in result.stderr
    assert (tmp_path / "qs/07-export-prm/_SUCCESS").exists()
    assert (tmp_path / "qs/09-export-sft/_SUCCESS").exists()
