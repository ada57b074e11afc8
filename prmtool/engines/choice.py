"""`--engine auto`: which engine runs a model, from the model's config and the run's lengths.

The hf engine runs on CPU and CUDA with no extra install; vLLM runs on CUDA only. On a GPU the
faster one depends on the model's size and the prompts' length, and the choice follows the
measurements in `MEASURED` (the latest side-by-side measurement of each point). Where the
hf engine cannot run a model at all (several GPUs per model, quantized weights, sliding-window
attention), vLLM is the only choice.

    choose_engine("./Qwen2.5-7B-Instruct", device="cuda", prompt_tokens=1152)
    # Choice(engine='hf', reason='7.6B parameters, prompts of about 1,152 tokens on cuda: the hf
    #   engine measured at 1.07x vLLM's tokens/s at 7.6B with 1536-token prompts')
"""

from __future__ import annotations

import importlib.util
import json
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

from prmtool.engines.base import EngineError
from prmtool.engines.vllm import options_from_environment  # PRMTOOL_VLLM_OPTIONS; vLLM itself is not imported

AUTO = "auto"


@dataclass(frozen=True)
class Measurement:
    """The hf engine's sampling throughput over bare vLLM's, on the same requests and GPU."""

    parameters: float  # the model's, in billions
    prompt_tokens: int  # tokens per prompt
    hf_over_vllm: float  # > 1: the hf engine is faster
    source: str  # where it was measured


# Random-weight Qwen2.5 models, bf16, each engine in its own process on the same requests
# (bench/bench_generate.py --shape), side by side in one invocation per architecture, one H200,
# 2026-12-07 (on one H100 earlier that day, before graphs captured at build, steps of 128 rows and
# the sampling kernel: 2.37x, 1.15x, 0.97x and 0.93x). Changes to either engine move these:
# rerun the benchmark and replace the rows.
MEASURED = [
    Measurement(0.5, 128, 8.02, "bench_generate --arch 0.5b --shape short, H200: 163,665 / 20,402 tok/s"),
    Measurement(7.6, 128, 1.21, "bench_generate --arch 7b --shape short, H200: 30,287 / 25,109 tok/s"),
    Measurement(7.6, 768, 1.18, "bench_generate --arch 7b --shape rollout, H200: 20,905 / 17,662 tok/s"),
    Measurement(7.6, 1536, 1.07, "bench_generate --arch 7b --shape long, H200: 17,802 / 16,682 tok/s"),
]
# A stage's own rate on each of prmtool's engines, where it is not the engine's tokens/s: at 7B
# from long step prefixes label's rate rests on how each engine serves its searches' many
# small, dependent requests. Random-weight Qwen2.5-7B, one H100 80GB, one lease, 2026-12-07,
# `bench/bench_label.py long --modes continuous` (256 responses of 1,000-3,000 tokens, k = 8,
# --rule any-success); the hf engine's prefill of a probe's single-rollout requests has changed
# since (one prefill serves them all), not yet measured on a GPU.
STAGE_MEASURED = {
    "label": [
        Measurement(7.6, 2000, 0.49, "bench_label long, H100: 4,743 / 9,746 labelled responses a GPU-hour"),
    ],
}

# prmtool's vllm engine runs at 0.98 to 1.20x bare vLLM's throughput (bench_generate,
# bench_label overhead). vLLM is chosen only where it wins even at the low end: a tie goes to
# hf, which needs no extra install and repeats its samples bit for bit.
VLLM_ENGINE_OVER_BARE_VLLM = 0.98

# Prompt tokens a stage's prompts hold beyond the response prefix: the problem and the chat
# template (a GSM8K problem in Qwen's template is 100-200 tokens).
PROBLEM_TOKENS = 128


def stage_prompt_tokens(stage: str, settings) -> int | None:
    """The typical prompt length of a stage's engine calls: generate's prompts are the
    problems; label's and intervene's continue response prefixes; score's forward passes are
    no sampling (None)."""
    if stage == "generate":
        return PROBLEM_TOKENS
    if stage in ("label", "intervene"):
        return continuation_prompt_tokens(settings.max_tokens)
    return None


def continuation_prompt_tokens(max_tokens: int) -> int:
    """The typical prompt of a stage that continues responses (label's rollouts, intervene's
    proposals): the problem and a response prefix, on average half a response, and a response
    about as long as the most tokens a continuation may take."""
    return PROBLEM_TOKENS + max_tokens // 2


@dataclass(frozen=True)
class Choice:
    engine: str  # hf or vllm
    reason: str  # one line, for the log

    def line(self) -> str:
        """`engine: vllm (--engine auto: REASON)`; empty for an engine named, not chosen."""
        return f"engine: {self.engine} (--engine auto: {self.reason})" if self.reason else ""


def vllm_installed() -> bool:
    """Whether vLLM can be imported, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def choose_engine(
    model: str | None,
    *,
    device: str | None,
    prompt_tokens: int | None,
    vllm_options: dict | None = None,
    cuda: bool | None = None,
    has_vllm: bool | None = None,
    stage: str | None = None,
) -> Choice:
    """The engine `--engine auto` runs `model` with, and why.

    device: --device (None: CUDA when available). prompt_tokens: the prompts' typical length in
    this run; None for score's forward passes, which no measurement here compares (the hf
    engine scored at 4.6x vLLM's tokens/s, README), so hf there unless the model needs vLLM.
    vllm_options: PRMTOOL_VLLM_OPTIONS (tensor_parallel_size > 1 needs vLLM).
    cuda, has_vllm: whether a GPU and vLLM are there (None: look).
    stage: the stage that runs it; a measurement of that stage's own rate (`STAGE_MEASURED`) at
    about the model's size decides over the engines' tokens/s.
    """
    if cuda is None:
        cuda = cuda_available() if device is None else device.startswith("cuda")
    if not cuda:
        return Choice("hf", "on cpu, where vLLM does not run")
    if has_vllm is None:
        has_vllm = vllm_installed()
    if model is None or str(model).lower().endswith(".gguf"):
        return Choice("hf", "a .gguf model: the hf engine reads GGUF files, vLLM only experimentally")
    config = read_config(model)
    needs = needs_vllm(config, vllm_options or {})
    if needs is not None:
        if has_vllm:
            return Choice("vllm", f"{needs}, which only vLLM runs")
        if not needs.startswith("sliding"):
            raise EngineError(
                f"{model}: {needs}, which the hf engine does not run, and vLLM is not installed "
                "(pip install -e '.[vllm]' in the prmtool repository)"
            )
        return Choice("hf", f"{needs}: vLLM is not installed, and the hf engine runs requests shorter than the window")
    billions = parameter_count(config) / 1e9
    if prompt_tokens is None:
        return Choice("hf", f"{billions:.1f}B parameters, scoring: the hf engine scored at 4.6x vLLM's tokens/s")
    sizes = f"{billions:.1f}B parameters, prompts of about {prompt_tokens:,} tokens on cuda"
    stage_measurement = stage_rate(stage, billions)
    if stage_measurement is not None:
        ratio = stage_measurement.hf_over_vllm
        basis = (
            f"{stage} on the hf engine measured at {ratio:.2f}x its rate on the vllm engine at "
            f"{stage_measurement.parameters}B ({stage_measurement.source})"
        )
    else:
        ratio, nearest = hf_over_vllm(billions, prompt_tokens)
        basis = f"the hf engine measured at {ratio:.2f}x vLLM's tokens/s at {nearest}"
    if ratio >= VLLM_ENGINE_OVER_BARE_VLLM:
        return Choice("hf", f"{sizes}: {basis}")
    if not has_vllm:
        return Choice("hf", f"{sizes}: vLLM would be faster ({basis}) but is not installed")
    return Choice("vllm", f"{sizes}: {basis}")


def stage_rate(stage: str | None, billions: float) -> Measurement | None:
    """The measurement of this stage's own rate at the nearest size within a factor of two of
    the model's, or None (then the engines' tokens/s decide)."""

    def distance(m: Measurement) -> float:
        return abs(math.log(m.parameters / max(billions, 1e-3)))

    within = [m for m in STAGE_MEASURED.get(stage or "", []) if distance(m) <= math.log(2)]
    return min(within, key=distance, default=None)


def hf_over_vllm(billions: float, prompt_tokens: int) -> tuple[float, str]:
    """The hf engine's throughput over vLLM's at the nearest measurement: nearest in log
    parameters first, then in log prompt length."""

    def distance(m: Measurement) -> tuple[float, float]:
        return (
            round(abs(math.log(m.parameters / max(billions, 1e-3))), 1),
            abs(math.log(m.prompt_tokens / max(prompt_tokens, 1))),
        )

    nearest = min(MEASURED, key=distance)
    return nearest.hf_over_vllm, f"{nearest.parameters}B with {nearest.prompt_tokens}-token prompts"


def read_config(model: str) -> dict:
    """A model folder's config.json, as a dict."""
    from prmtool.engines.model_files import locate_model

    location = locate_model(model)
    path = Path(location.folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EngineError(f"{path}: cannot read the model's config ({error})") from None
    if not isinstance(config, dict):
        raise EngineError(f"{path}: the model's config is not a JSON object")
    return config


def text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def needs_vllm(config: dict, vllm_options: dict) -> str | None:
    """What in the model's config or the vLLM options the hf engine cannot run, or None."""
    tensor_parallel = int(vllm_options.get("tensor_parallel_size", 1) or 1)
    if tensor_parallel > 1:
        return f"tensor_parallel_size {tensor_parallel} (several GPUs per model)"
    quantization = config.get("quantization_config") or text_config(config).get("quantization_config")
    if isinstance(quantization, dict):
        return f"{quantization.get('quant_method', 'quantized')} quantized weights"
    text = text_config(config)
    layer_types = text.get("layer_types") or []
    window = text.get("sliding_window")
    if window and ("sliding_attention" in layer_types or (not layer_types and text.get("use_sliding_window"))):
        return f"sliding-window attention ({window} tokens)"
    return None


def parameter_count(config: dict) -> float:
    """A decoder's parameters from its config: embeddings, and per layer the attention
    (grouped-query: fewer key and value heads) and a gated MLP."""
    text = text_config(config)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    vocab = int(text.get("vocab_size") or 0)
    intermediate = int(text.get("intermediate_size") or 4 * hidden)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // max(heads, 1))
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return embeddings + layers * (attention + mlp)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# model -> the engine every stage of a recipe that runs it takes (`one_engine_per_model`)
_AGREED: ContextVar[dict] = ContextVar("agreed_engines", default={})


@contextmanager
def one_engine_per_model(choices: dict):
    """Inside, `auto` gives each model in `choices` its engine there. `prmtool run` agrees on
    one engine per model before its stages run: generate's short prompts and label's long ones
    can pick different engines, and a second engine would load the model a second time (a 7B
    on hf, then on vLLM: twice the GPU memory, or vLLM failing to start)."""
    token = _AGREED.set(choices)
    try:
        yield
    finally:
        _AGREED.reset(token)


def agree(choices: list[tuple[str | None, int | None, Choice]]) -> dict:
    """One engine per model from each (model, prompt_tokens, choice) of a recipe's stages: the
    choice of the stage with the longest prompts (label's, intervene's: the stages that sample
    the most), unless that stage could run its model on hf only."""
    agreed: dict = {}
    for model, prompt_tokens, choice in sorted(choices, key=lambda c: -1 if c[1] is None else c[1], reverse=True):
        if model not in agreed:
            agreed[model] = replace(choice, reason=f"{choice.reason}; one engine for every stage on this model")
    return agreed


def resolve(
    engine: str, model: str | None, device: str | None, prompt_tokens: int | None, stage: str | None = None
) -> Choice:
    """The engine to run: `engine` itself (no reason), or for `auto` the one `choose_engine`
    picks for `stage`, or the one a recipe agreed on for this model (`one_engine_per_model`).
    Stages print its `line()` when they load the model: a run that fails on its input says only
    that."""
    from prmtool.engines import ENGINE_NAMES

    if engine not in (*ENGINE_NAMES, AUTO):
        raise EngineError(f"--engine {engine!r}: expected one of {', '.join((*ENGINE_NAMES, AUTO))}")
    if engine != AUTO:
        return Choice(engine, "")
    return _AGREED.get().get(model) or choose_engine(
        model, device=device, prompt_tokens=prompt_tokens, vllm_options=options_from_environment(), stage=stage
    )
