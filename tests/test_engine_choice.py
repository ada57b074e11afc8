"""`--engine auto`: which engine runs a model, decided from its config and the run's lengths.

The models here are stand-ins: a folder with only a config.json, as `huggingface-cli download`
would leave beside the weights. Nothing is loaded.
"""

from __future__ import annotations

import json

import pytest

from prmtool.core.shards import read_provenance
from prmtool.engines import EngineError
from prmtool.engines import choice as engine_choice
from prmtool.engines.choice import Measurement, choose_engine, parameter_count

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "sliding_window": 131072,
    "use_sliding_window": False,
}
QWEN25_05B = {
    **QWEN25_7B,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


@pytest.fixture
def model_folder(tmp_path):
    def make(config: dict, name: str = "model") -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    return make


def test_parameter_count_reads_the_model_size_from_its_config():
    assert parameter_count(QWEN25_7B) / 1e9 == pytest.approx(7.6, abs=0.1)
    assert parameter_count(QWEN25_05B) / 1e9 == pytest.approx(0.49, abs=0.03)


def test_on_cpu_auto_is_hf_whatever_the_model(model_folder):
    choice = choose_engine(model_folder(QWEN25_7B), device="cpu", prompt_tokens=2048, has_vllm=True)
    assert choice.engine == "hf"
    assert choice.line() == "engine: hf (--engine auto: on cpu, where vLLM does not run)"


def test_on_cuda_small_models_and_short_prompts_take_hf(model_folder):
    small = model_folder(QWEN25_05B, "small")
    for prompt_tokens in (128, 1536):
        assert choose_engine(small, device="cuda", prompt_tokens=prompt_tokens, has_vllm=True).engine == "hf"
    # 7B with short prompts and with a GSM8K rollout's: the paged hf engine measured faster
    seven_b = model_folder(QWEN25_7B)
    for prompt_tokens, ratio in ((128, "1.21x"), (640, "1.18x")):
        short = choose_engine(seven_b, device="cuda", prompt_tokens=prompt_tokens, has_vllm=True)
        assert short.engine == "hf" and ratio in short.reason


def test_on_cuda_7b_with_long_prompts_takes_hf_and_says_why(model_folder):
    choice = choose_engine(model_folder(QWEN25_7B), device="cuda", prompt_tokens=1152, has_vllm=True)
    assert choice.line() == (
        "engine: hf (--engine auto: 7.6B parameters, prompts of about 1,152 tokens on cuda: the hf engine "
        "measured at 1.07x vLLM's tokens/s at 7.6B with 1536-token prompts)"
    )


def test_a_measured_tie_takes_hf_which_needs_no_extra_install(model_folder, monkeypatch):
    """0.98x is within what prmtool's vllm engine loses to bare vLLM: not worth switching for."""
    table = [m for m in engine_choice.MEASURED if m.prompt_tokens < 1536]
    monkeypatch.setattr(engine_choice, "MEASURED", [*table, Measurement(7.6, 1536, 0.98, "an earlier lease")])
    choice = choose_engine(model_folder(QWEN25_7B), device="cuda", prompt_tokens=1152, has_vllm=True)
    assert choice.engine == "hf" and "0.98x" in choice.reason


@pytest.fixture
def vllm_faster_on_long_prompts(monkeypatch):
    """The measurements as they stood before the paged hf engine caught up on long prompts."""
    table = [m for m in engine_choice.MEASURED if m.prompt_tokens < 1536]
    monkeypatch.setattr(engine_choice, "MEASURED", [*table, Measurement(7.6, 1536, 0.82, "an earlier lease")])


def test_where_vllm_measured_faster_auto_takes_vllm_and_says_why(model_folder, vllm_faster_on_long_prompts):
    choice = choose_engine(model_folder(QWEN25_7B), device="cuda", prompt_tokens=1152, has_vllm=True)
    assert choice.engine == "vllm"
    assert choice.line() == (
        "engine: vllm (--engine auto: 7.6B parameters, prompts of about 1,152 tokens on cuda: the hf engine "
        "measured at 0.82x vLLM's tokens/s at 7.6B with 1536-token prompts)"
    )


def test_without_vllm_auto_falls_back_to_hf_with_the_reason(model_folder, vllm_faster_on_long_prompts):
    choice = choose_engine(model_folder(QWEN25_7B), device="cuda", prompt_tokens=1152, has_vllm=False)
    assert choice.engine == "hf"
    assert "vLLM would be faster" in choice.reason and "not installed" in choice.reason


def test_what_only_vllm_runs_takes_vllm(model_folder):
    quantized = model_folder({**QWEN25_05B, "quantization_config": {"quant_method": "awq", "bits": 4}}, "awq")
    choice = choose_engine(quantized, device="cuda", prompt_tokens=128, has_vllm=True)
    assert (choice.engine, choice.reason) == ("vllm", "awq quantized weights, which only vLLM runs")

    windowed = model_folder(
        {**QWEN25_05B, "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"]}, "gemma-like"
    )
    assert choose_engine(windowed, device="cuda", prompt_tokens=128, has_vllm=True).engine == "vllm"

    two_gpus = choose_engine(
        model_folder(QWEN25_05B, "tp"),
        device="cuda",
        prompt_tokens=128,
        vllm_options={"tensor_parallel_size": 2},
        has_vllm=True,
    )
    assert two_gpus.engine == "vllm" and "tensor_parallel_size 2" in two_gpus.reason


def test_what_only_vllm_runs_without_vllm_is_refused_in_one_line(model_folder):
    quantized = model_folder({**QWEN25_05B, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(EngineError, match=r"gptq quantized weights, which the hf engine does not run, and vLLM is not"):
        choose_engine(quantized, device="cuda", prompt_tokens=128, has_vllm=False)


def test_scoring_takes_hf_unless_only_vllm_runs_the_model(model_folder):
    assert choose_engine(model_folder(QWEN25_7B), device="cuda", prompt_tokens=None, has_vllm=True).engine == "hf"


def test_auto_runs_a_stage_on_cpu_and_says_so(prmtool, tmp_path, tiny_model_dir):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    assert prmtool("import", problems, "-o", tmp_path / "p", "--preset", "gsm8k", "-q").exit_code == 0
    result = prmtool(
        "generate", tmp_path / "p", "-o", tmp_path / "r", "--model", tiny_model_dir, "--max-tokens", "4", "--n", "1"
    )
    assert result.exit_code == 0, result.stderr
    assert "engine: hf (--engine auto: on cpu, where vLLM does not run)" in result.stderr
    provenance = read_provenance(next((tmp_path / "r").glob("*.parquet")))
    assert provenance["arguments"]["engine"] == "hf"  # the engine that ran, so a resume compares like with like


def test_label_at_7b_takes_the_engine_its_own_rate_was_measured_fastest_on(model_folder):
    """At 7B from long step prefixes label's rate is not its engine's tokens/s: its searches send
    many small dependent requests, and label measured on each engine decides (STAGE_MEASURED).
    Other stages, and label at sizes far from any such measurement, go by tokens/s."""
    seven_b, small = model_folder(QWEN25_7B, "7b"), model_folder(QWEN25_05B, "05b")
    label = choose_engine(seven_b, device="cuda", prompt_tokens=640, has_vllm=True, stage="label")
    assert label.engine == "vllm"
    assert "label on the hf engine measured at 0.49x its rate on the vllm engine at 7.6B" in label.reason
    assert choose_engine(seven_b, device="cuda", prompt_tokens=640, has_vllm=True, stage="generate").engine == "hf"
    assert choose_engine(small, device="cuda", prompt_tokens=640, has_vllm=True, stage="label").engine == "hf"
    unavailable = choose_engine(seven_b, device="cuda", prompt_tokens=640, has_vllm=False, stage="label")
    assert unavailable.engine == "hf" and "vLLM would be faster" in unavailable.reason


def test_a_recipe_runs_each_model_on_the_engine_its_longest_prompts_pick(model_folder, vllm_faster_on_long_prompts):
    """generate's short prompts pick hf and label's long ones vLLM: loading the 7B twice would
    not fit, so every stage takes label's choice, and says why."""
    from prmtool.engines.choice import agree, one_engine_per_model, resolve

    model = model_folder(QWEN25_7B)
    generate = choose_engine(model, device="cuda", prompt_tokens=128, has_vllm=True)
    label = choose_engine(model, device="cuda", prompt_tokens=1152, has_vllm=True)
    score = choose_engine(model, device="cuda", prompt_tokens=None, has_vllm=True)
    assert (generate.engine, label.engine, score.engine) == ("hf", "vllm", "hf")
    agreed = agree([(model, 128, generate), (model, 1152, label), (model, None, score)])
    with one_engine_per_model(agreed):
        picked = resolve("auto", model, "cuda", 128)
        assert resolve("hf", model, "cuda", 128).engine == "hf"  # an engine named is never overridden
    assert picked.line() == f"engine: vllm (--engine auto: {label.reason}; one engine for every stage on this model)"
    assert resolve("auto", model, "cpu", 128).engine == "hf"  # outside the recipe: each stage its own
