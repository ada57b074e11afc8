"""The `vllm` engine: vLLM's offline API (`vllm.LLM`), with prefix caching on.

vLLM is an optional extra (`pip install -e '.[vllm]'` in the repository) imported only when this engine is
built. The translation between prmtool's requests and vLLM's objects lives in plain functions
below, so it is tested without vLLM installed (with stand-in objects of the same shape).
"""

from __future__ import annotations

import gc
from typing import Any

from prmtool.engines.base import (
    Cancel,
    Completion,
    Engine,
    EngineError,
    FollowUp,
    ProgressCallback,
    SamplingRequest,
    ScoringRequest,
    check_requests,
)
from prmtool.engines.model_files import locate_model

# -------------------------------------------------------------------- pure adapter functions


def sampling_params_kwargs(request: SamplingRequest, ignore_eos: bool = False) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    vLLM excludes the stop string from the text by default (include_stop_str_in_output=False),
    which is prmtool's convention too.
    """
    return {
        "n": request.n,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        # vLLM seeds sample i of a request with seed + i: starting at seed + first_sample
        # continues the stream of an earlier request of the same seed.
        "seed": None if request.seed is None else request.seed + request.first_sample,
        "ignore_eos": ignore_eos,
    }


def tokens_prompt(prompt_ids: list[int]) -> dict[str, list[int]]:
    """A `vllm.inputs.TokensPrompt` (a TypedDict, so a plain dict of the same keys)."""
    return {"prompt_token_ids": list(prompt_ids)}


def completions_from_output(request_output: Any) -> list[Completion]:
    """The Completions of one `vllm.RequestOutput`, ordered by sample index."""
    completions = []
    for output in sorted(request_output.outputs, key=lambda o: o.index):
        # vLLM reports "stop" for EOS and stop strings, "length" at max_tokens, "abort" when a
        # request is aborted; prmtool knows only the first two and treats an abort as cut short.
        reason = "stop" if output.finish_reason == "stop" else "length"
        token_ids = list(output.token_ids)
        completions.append(Completion(output.text, token_ids, len(token_ids), reason))
    return completions


def scoring_params_kwargs() -> dict[str, Any]:
    """SamplingParams for scoring: generate one throw-away token and return the prompt's log
    probabilities (prompt_logprobs=0 returns the logprob of each actual prompt token)."""
    return {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}


def continuation_log_probs(prompt_logprobs: list[Any], request: ScoringRequest) -> list[float]:
    """Log p of each continuation token, read from vLLM's prompt_logprobs of prompt+continuation.

    `prompt_logprobs[i]` maps token ids to Logprob objects for position i (None at position 0).
    """
    sequence = list(request.prompt_ids) + list(request.continuation_ids)
    start = len(request.prompt_ids)
    return [float(prompt_logprobs[i][sequence[i]].logprob) for i in range(start, len(sequence))]


# -------------------------------------------------------------------- engine


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise EngineError(
            f"the vllm engine needs vLLM: pip install -e '.[vllm]' in the prmtool repository ({error})"
        ) from None
    return vllm


class VLLMEngine(Engine):
    """Samples and scores through `vllm.LLM`. Extra options go to `vllm.LLM` unchanged
    (e.g. gpu_memory_utilization, tensor_parallel_size, max_model_len, enforce_eager).

    seed: vLLM's global seed (an int: vLLM refuses None); each request carries its own seed
      as well, so what a request samples does not depend on this one.
    deterministic: set VLLM_BATCH_INVARIANT=1 (before vLLM loads) and turn the prefix cache
      off, so the same request gives the same tokens whatever else is in the batch and
      whatever ran before. Without it, vLLM's batching and its prefix cache can change the
      tokens of a repeated request (the README's "Determinism" says what repeats).
    """

    def __init__(
        self,
        model: str | None,
        *,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        ignore_eos: bool = False,
        deterministic: bool = False,
        **llm_options,
    ):
        import os

        if deterministic:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        # vLLM forks its engine process by default, which fails once CUDA is up in this one
        # (a stage may have touched it); spawn works either way.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # Every request prmtool sends carries a seed, and vLLM samples seeded requests with its
        # PyTorch sampler, never FlashInfer's; FlashInfer's would only cost its JIT build at
        # start-up (about 100 s on a fresh H200 machine, in vLLM 0.26's sampler warm-up).
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        vllm = import_vllm()
        self._vllm = vllm
        location = locate_model(model)
        self.ignore_eos = ignore_eos
        llm_options.setdefault("enable_prefix_caching", not deterministic)
        try:
            self.llm = vllm.LLM(
                model=location.path,
                dtype=dtype or "auto",
                trust_remote_code=trust_remote_code,
                seed=int(seed),
                **llm_options,
            )
        except (ValueError, RuntimeError, TypeError) as error:  # vLLM's word on a model or an option, on one line
            message = " ".join(str(error).split())[:300]
            raise EngineError(f"vllm cannot start {location.path}: {type(error).__name__}: {message}") from None
        self.tokenizer = self.llm.get_tokenizer()

    def sample(
        self, requests: list[SamplingRequest], on_progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        check_requests(requests)
        if not requests:
            return []
        params = [self._vllm.SamplingParams(**sampling_params_kwargs(r, self.ignore_eos)) for r in requests]
        prompts = [tokens_prompt(r.prompt_ids) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = [completions_from_output(output) for output in outputs]
        if on_progress is not None:
            on_progress(len(results), sum(c.num_tokens for samples in results for c in samples))
        return results

    def sample_continuously(
        self,
        requests: list[SamplingRequest],
        on_done: FollowUp,
        on_progress: ProgressCallback | None = None,
        longest: int = 0,
    ) -> None:
        """As `Engine.sample_continuously`, through vLLM's engine loop (`add_request`, `step`):
        a follow-up joins the running batch as soon as the request it follows is done."""
        engine = getattr(self.llm, "llm_engine", None)
        if not all(hasattr(engine, name) for name in ("add_request", "step", "has_unfinished_requests")):
            return super().sample_continuously(requests, on_done, on_progress, longest)
        from vllm.sampling_params import RequestOutputKind

        next_key = 0

        def add(answer: list) -> None:
            nonlocal next_key
            cancelled = [f"p{item.key}" for item in answer if isinstance(item, Cancel)]
            if cancelled:
                engine.abort_request(cancelled)
            new_requests = [item for item in answer if not isinstance(item, Cancel)]
            check_requests(new_requests)
            for request in new_requests:
                params = self._vllm.SamplingParams(**sampling_params_kwargs(request, self.ignore_eos))
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when done
                engine.add_request(f"p{next_key}", tokens_prompt(request.prompt_ids), params)
                next_key += 1

        add(requests)
        done = 0
        while engine.has_unfinished_requests():
            finished = [output for output in engine.step() if output.finished]
            # vLLM may add a suffix of its own to a request id ("p12-ab34"): the key is before it.
            results = [(int(out.request_id.split("-")[0][1:]), completions_from_output(out)) for out in finished]
            if results:
                done += len(results)
                if on_progress is not None:
                    on_progress(done, sum(c.num_tokens for _, samples in results for c in samples))
            add(on_done(results))  # an empty list collects follow-ups that became ready meanwhile

    def sampling_capacity(self) -> int:
        try:
            return int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
        except (AttributeError, TypeError, ValueError):  # another vLLM's layout: no speculation
            return 0

    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        for number, request in enumerate(requests):
            if not request.prompt_ids:
                raise EngineError(f"scoring request {number}: empty prompt_ids (the first token has no context)")
        to_score = [i for i, r in enumerate(requests) if r.continuation_ids]
        params = self._vllm.SamplingParams(**scoring_params_kwargs())
        prompts = [tokens_prompt(list(requests[i].prompt_ids) + list(requests[i].continuation_ids)) for i in to_score]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        results: list[list[float]] = [[] for _ in requests]
        for index, output in zip(to_score, outputs):
            results[index] = continuation_log_probs(output.prompt_logprobs, requests[index])
        return results

    def close(self) -> None:
        self.llm = None
        gc.collect()


OPTIONS_VARIABLE = "PRMTOOL_VLLM_OPTIONS"


def options_from_environment() -> dict:
    """`PRMTOOL_VLLM_OPTIONS='{"tensor_parallel_size": 2, "max_model_len": 4096}'`: vLLM options
    for every stage that loads a model, since the command line has no option per vLLM setting."""
    import json
    import os

    text = os.environ.get(OPTIONS_VARIABLE, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise EngineError(f"{OPTIONS_VARIABLE}: not a JSON object ({error.msg} at {error.pos})") from None
    if not isinstance(options, dict):
        raise EngineError(f"{OPTIONS_VARIABLE}: expected a JSON object of vLLM options, got {type(options).__name__}")
    return options


def load(model: str | None, *, device=None, dtype=None, trust_remote_code: bool = False, **options) -> VLLMEngine:
    """`load_engine("vllm", ...)`: options go to VLLMEngine (gpu_memory_utilization, ...), over
    those of PRMTOOL_VLLM_OPTIONS."""
    if device not in (None, "cuda"):
        raise EngineError(f"the vllm engine runs on CUDA only, not on {device!r}")
    return VLLMEngine(
        model, dtype=dtype, trust_remote_code=trust_remote_code, **{**options_from_environment(), **options}
    )
