"""Tokens/s, peak GPU memory and model FLOP utilization of `prmtool score` (implicit PRM)
against the reference approach, on the same data with the same two models.

Models: two random-weight models of the Qwen2.5-1.5B architecture (policy and reference), bf16;
speed does not depend on the weights' values. Data: responses of 256 to 4,096 tokens after
prompts of 64 to 192, cut into steps of 20 to 200 tokens.

Both sides go from the rows' text to step values, and both timings include the host work:
  prmtool     `score_implicit` (the stage's core, as `prmtool score` runs it): one batched
              tokenization, step ends from offset mappings; length-sorted batches of
              --max-batch-tokens, right padding with no attention mask, float32 logits from a
              bf16 matmul, log-normalizer in chunks (on Hopper fused into the output head, and
              SiLU*mul into the gate/up matmul: engines/hopper.py), both models on a batch
              before the next
  reference   ImplicitPRM's eval recipe: batches of 4 in data order, each collated as its
              collator does (the text tokenized, then every step prefix tokenized again to find
              the step ends; its code collates a second time for the reference model, which is
              left out here), padded with pad = eos and a mask from it, full logits upcast to
              float32, full log-softmax over the vocabulary (its `get_logps` calls log_softmax on
              the model's logits, which transformers up to 4.45 returned in float32; the issue's
              29 GiB reference peak matches float32 logits), masked, cumulated, read at step ends
The reference's collating time is measured apart, so the ratio against its model passes alone
is printed too.

MFU counts 2 models x 2 x parameters FLOPs per token against a dense bf16 peak of 989 TFLOP/s
(H100/H200 SXM). Targets: >= 4x the reference's tokens/s, <= 1/3 of its peak memory, >= 40% MFU.

    PYTHONPATH=. python bench/bench_score.py           # the GPU benchmark (about 3 minutes)
    PYTHONPATH=. python bench/bench_score.py --quick   # a tiny model on CPU: checks the script runs

Measured 2026-12-02 on one H200 (torch 2.11, transformers 5.17, Triton 3.6), default arguments:
256 responses, 606,099 tokens, padding 2.2%; runs 1 and 2 in one lease (commit 8525df1), run 3
in another, on the final code (commit dd770a4: the collator no longer tokenizes each problem
twice, a few milliseconds):
  prmtool    83,711 / 83,457 / 82,749 tokens/s warm (7.2 / 7.3 / 7.3 s; cold, compiling
             included, 19 to 25 s), peak 6.2 GiB, MFU 52.3% / 52.1% / 51.7%
  reference  13,689 / 15,816 / 17,788 tokens/s end to end (44.3 / 38.3 / 34.1 s), peak 34.8 GiB,
             MFU 8.5% / 9.9% / 11.1%; of that, its collator 16.4 / 14.5 / 9.7 s (host CPU work,
             which varies with the machine) and its model passes 27.9 / 23.8 / 24.4 s
             (21,730 / 25,423 / 24,855 tokens/s)
  ratio      6.12x / 5.28x / 4.65x tokens/s end to end (3.85x / 3.28x / 3.33x against the
             reference's model passes alone), 0.18 of the peak memory; every step value of the
             two agrees with correlation 0.9992 (bf16 noise; in float32 on CPU they agree to 1e-8)
The reference's end-to-end rate is close to the issue's figure for it (about 13,500 tokens/s).
Over seven runs the reference's model passes ran at 20,900 to 25,400 tokens/s, prmtool at
82,600 to 84,800; the four earlier runs timed the reference's model passes alone (3.55x to 3.95x).
GPU time of a warm pass (6.93 s busy, idle 1%): the fused SwiGLU kernel 3.11 s, the other matmuls
(attention projections, down projection) 1.85 s, the fused output head with its log-normalizer
0.86 s, cuDNN attention 0.77 s, norms, residual adds and rotary embeddings about 0.34 s. Before
the fused kernels (hopper.py) the same parts took 3.26 s (cuBLAS gate and up, then SiLU*mul) and
1.06 s (cuBLAS float32 logits, then the one-pass log-normalizer), and a check for packed
sequences in transformers' mask code made the host wait for the GPU before every forward pass
(78,834 tokens/s, 3.69x the model passes alone).
Tried without gain: Inductor max-autotune (cuBLAS wins every shape), 32,768-token batches
(7.35 s against 7.30 s), and one N=256 product over interleaved gate and up weights in place of
the SwiGLU kernel's two N=128 products (1.43 ms against 1.30 ms per 16,384 tokens). Also, per
16,384 tokens against the SwiGLU kernel's 1.39 ms in one run: Triton 3.6's warp specialization
on Hopper (`tl.range(..., warp_specialize=True)`) 1.44 ms, a flattened tile loop 1.68 ms,
256-row tiles 1.68 ms (with 128 columns they need more shared memory than an SM has), a split
epilogue store 1.47 ms; cuBLAS's two bare products alone take 1.34 ms, so little is left there.
Running the two models on two CUDA streams side by side: 7.23 s against 7.15 s a pass. SDPA's
default (cuDNN) is already the fastest attention here: 518 TFLOP/s at 4 x 4,096 tokens against
FlashAttention-2's 295, and 224 against 97 at 48 x 340 tokens.
Earlier, on one H100: 74,389 against 21,450 tokens/s (3.47x), before the fused kernels.

Through vLLM (`--vllm`: two vLLM 0.26.0 instances in this process, prompt_logprobs), measured
2026-12-04 on one H200: `PRMTOOL_VLLM_OPTIONS='{"enforce_eager": true}' python
bench/bench_score.py --vllm --skip-reference --responses 128` (306,175 tokens; eager because
scoring is prefill only, so CUDA graphs do not apply, and vLLM's compile would cost its start
minutes of the lease):
  prmtool (hf engine, fused)   74,982 tokens/s warm (4.1 s), peak 6.2 GiB, MFU 46.8%
  vllm                         16,277 tokens/s warm (18.8 s; first pass 13,959), peak 5.8 GiB
  ratio                        4.6x for the hf engine
  agreement                    step values correlate 0.9642; the largest difference is 6.7e-2 at
                               beta 0.001 (values spread with std 4.2e-2). vLLM's log-probabilities
                               come from bf16 logits, the hf path's from float32 logits, and over
                               prefixes of up to 4,096 tokens the per-token differences add up.
"""

from __future__ import annotations

import argparse
import random
import time

import polars as pl
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.bench_generate import QWEN25_15B, TINY, build_tokenizer
from prmtool.engines.base import length_batches
from prmtool.engines.hf import HFEngine
from prmtool.methods.step_rewards import ScoringConfig, score_implicit
from prmtool.methods.steps import make_splitter, split_steps

PEAK_BF16_FLOPS = 989e12
EOS = 2  # the id the reference pads with


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few responses, CPU: a smoke run")
    parser.add_argument("--responses", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--no-compile", action="store_true", help="eager scoring forward (no torch.compile)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--vllm", action="store_true", help="also score through the vllm engine (two instances)")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of one warm prmtool pass")
    parser.add_argument(
        "--trace", metavar="FILE", help="with --profile: also write that pass as a Chrome trace (shapes recorded)"
    )
    args = parser.parse_args()
    if args.quick:
        args.responses, args.min_tokens, args.max_tokens, args.max_batch_tokens = 8, 16, 64, 512
    return args


def build_model(config: dict, seed: int, device: torch.device) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(**config, eos_token_id=EOS, pad_token_id=EOS))
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def make_rows(args, vocab_size: int) -> pl.DataFrame:
    rng = random.Random(0)
    splitter = make_splitter("blank-line")

    def words(count: int) -> list[str]:
        return [f"t{rng.randrange(3, vocab_size)}" for _ in range(count)]

    rows = []
    for index in range(args.responses):
        length, steps = rng.randint(args.min_tokens, args.max_tokens), []
        while length > 0:
            size = min(length, rng.randint(20, 200))
            steps.append(" ".join(words(size)))
            length -= size
        response = "\n\n".join(steps)
        rows.append(
            {
                "problem_id": f"p{index}",
                "problem": " ".join(words(rng.randint(64, 192))),
                "response_id": f"r{index}",
                "response": response,
                "steps": split_steps(response, splitter),
            }
        )
    return pl.DataFrame(rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device: torch.device, work) -> tuple[float, float]:
    """Seconds and peak GPU memory (GiB, models included) of `work()`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def reference_collate(tokenizer, problem: str, steps: list[str]) -> tuple[list[int], int, list[int]]:
    """ImplicitPRM's collator: the whole text tokenized once, then every prefix of steps again,
    each step ending at its prefix's last token. Returns the ids, the prompt's length and the
    step ends. (Its code re-tokenizes chat-templated prefixes and also collates everything a
    second time for the reference model; this keeps one pass.)"""
    prompt_ids = tokenizer.encode(problem)
    ids = prompt_ids + tokenizer.encode("\n\n".join(steps))
    ends = [
        len(tokenizer.encode(problem + "\n\n" + "\n\n".join(steps[:count]))) - 1 for count in range(1, len(steps) + 1)
    ]
    return ids, len(prompt_ids), ends


def reference_step_values(
    models, tokenizer, frame: pl.DataFrame, device: torch.device
) -> tuple[list[list[float]], float]:
    """ImplicitPRM's eval recipe, text in, step values out: batches of 4 in data order, each
    collated (tokenized, step ends by prefix re-tokenization) and then scored: pad = eos with the
    mask derived from it (which also hides real end-of-turn tokens), full float32 logits and
    log-softmax, rewards masked to the response, cumulated and read at the step ends. Returns
    the step values and the seconds spent collating (the host work between the model passes)."""
    values, collating = [], 0.0
    rows = list(zip(frame["problem"], frame["steps"]))
    with torch.inference_mode():
        for start in range(0, len(rows), 4):
            started = time.perf_counter()
            collated = [reference_collate(tokenizer, problem, steps) for problem, steps in rows[start : start + 4]]
            collating += time.perf_counter() - started
            width = max(len(ids) for ids, _, _ in collated)
            ids = torch.full((len(collated), width), EOS, device=device)
            for row, (sequence, _, _) in enumerate(collated):
                ids[row, : len(sequence)] = torch.tensor(sequence, device=device)
            mask = (ids != EOS).long()
            log_probs = []
            for model in models:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                log_softmax = logits[:, :-1].log_softmax(-1)
                log_probs.append(log_softmax.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2))
                del logits, log_softmax
            # Reward index t belongs to token t + 1; the response starts at token prompt_length.
            prompt_lengths = torch.tensor([prompt_length for _, prompt_length, _ in collated], device=device)
            response = torch.arange(width - 1, device=device)[None, :] >= prompt_lengths[:, None] - 1
            q = (0.001 * (log_probs[0] - log_probs[1]) * response).cumsum(1)
            ends = [torch.tensor(step_ends, device=device) - 1 for _, _, step_ends in collated]
            values += [q[row, row_ends].tolist() for row, row_ends in enumerate(ends)]
    return values, collating


def score_through_vllm(args, policy, ref, tokenizer, frame, settings, hf_scored, report) -> None:
    """The same rows scored by two vLLM instances in this process (prompt_logprobs), warm,
    against the hf engine's fused path: tokens/s and how far the step values are apart."""
    import gc
    import tempfile

    from prmtool.engines.vllm import VLLMEngine, options_from_environment

    folders = []
    for model in (policy, ref):
        folders.append(tempfile.mkdtemp(prefix="bench-score-vllm-"))
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    gc.collect()
    torch.cuda.empty_cache()
    # PRMTOOL_VLLM_OPTIONS as for the stages, e.g. {"enforce_eager": true}: scoring is prefill
    # only, so CUDA graphs (decode) do not matter, and eager mode skips minutes of compiling.
    options = {"gpu_memory_utilization": 0.3, **options_from_environment()}
    print(f"vllm options: {options}", flush=True)
    engines = [VLLMEngine(folder, dtype="bfloat16", **options) for folder in folders]
    for engine in engines:
        engine.tokenizer = tokenizer  # the word-level tokenizer as built (vLLM's reload encodes nothing)
    scored = {}

    def run():
        scored["frame"] = score_implicit(frame, engines[0], engines[1], settings)

    seconds, peak = measure(torch.device("cuda"), run)
    report("vllm (first pass)", seconds, peak)
    seconds, peak = measure(torch.device("cuda"), run)
    report("vllm (warm)", seconds, peak)
    ours = [v for row in hf_scored["step_values"] for v in row]
    theirs = [v for row in scored["frame"]["step_values"] for v in row]
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    correlation = float(torch.corrcoef(torch.tensor([ours, theirs], dtype=torch.float64))[0, 1])
    print(
        f"step values, hf engine vs vllm: correlation {correlation:.4f}, largest difference {worst:.2e} "
        f"(beta {settings.beta}), spread (std) {torch.tensor(ours).std().item():.2e}",
        flush=True,
    )
    for engine in engines:
        engine.close()


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    config = TINY if args.quick else QWEN25_15B
    tokenizer = build_tokenizer(config["vocab_size"])
    policy, ref = build_model(config, 0, device), build_model(config, 1, device)
    parameters = sum(p.numel() for p in policy.parameters())
    frame = make_rows(args, config["vocab_size"])
    settings = ScoringConfig(beta=0.001, prompt_template="{problem}", max_batch_tokens=args.max_batch_tokens)
    engines = [
        HFEngine(model, tokenizer, max_batch_tokens=args.max_batch_tokens, compile=False if args.no_compile else None)
        for model in (policy, ref)
    ]
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in frame["problem"])
    response_tokens = sum(len(tokenizer.encode(r)) for r in frame["response"])
    tokens = prompt_tokens + response_tokens
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"{parameters / 1e9:.2f}B parameters per model, {frame.height} responses, {tokens:,} tokens "
        f"({response_tokens:,} in responses), compile {engines[0].compile}",
        flush=True,
    )

    def report(name: str, seconds: float, peak: float) -> float:
        rate = tokens / seconds
        mfu = rate * 2 * 2 * parameters / PEAK_BF16_FLOPS
        print(f"{name:<22} {rate:>10,.0f} tokens/s  {seconds:7.1f} s  peak {peak:5.1f} GiB  MFU {mfu:6.1%}", flush=True)
        return rate

    scored = {}

    def run_prmtool():
        scored["frame"] = score_implicit(frame, engines[0], engines[1], settings)

    seconds, peak = measure(device, run_prmtool)
    report("prmtool (cold)", seconds, peak)
    seconds, peak = measure(device, run_prmtool)
    ours = report("prmtool (warm)", seconds, peak)
    ours_peak = peak
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=bool(args.trace)
        ) as profiler:
            run_prmtool()
            sync(device)
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        if args.trace:
            profiler.export_chrome_trace(args.trace)
    lengths = [len(tokenizer.encode(p)) + len(tokenizer.encode(r)) for p, r in zip(frame["problem"], frame["response"])]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in length_batches(lengths, args.max_batch_tokens))
    print(f"padding: {padded / sum(lengths) - 1:.2%} of the real tokens", flush=True)
    if args.vllm:
        score_through_vllm(args, policy, ref, tokenizer, frame, settings, scored["frame"], report)
    if args.skip_reference:
        return
    models = [policy, ref]
    reference_step_values(models, tokenizer, frame.head(8), device)  # warm-up, as prmtool had its cold pass
    reference: dict = {}

    def run_reference():
        reference["values"], reference["collating"] = reference_step_values(models, tokenizer, frame, device)

    seconds, peak = measure(device, run_reference)
    theirs = report("reference", seconds, peak)
    collating = reference["collating"]
    passes_only = report("  its model passes", seconds - collating, peak)
    print(
        f"  (the rest, {collating:.1f} s, is its collator: tokenizing, and every step prefix again for the step ends)"
    )
    print(
        f"prmtool / reference: {ours / theirs:.2f}x tokens/s end to end, {ours / passes_only:.2f}x against its model "
        f"passes alone; {ours_peak / peak:.2f} of the peak memory"
    )
    # Same numbers, up to bf16 noise: every step value, prmtool vs reference.
    ours_values = [v for row in scored["frame"]["step_values"] for v in row]
    their_values = [v for row in reference["values"] for v in row]
    assert len(ours_values) == len(their_values), "the two disagree on the number of steps"
    worst = max(abs(a - b) for a, b in zip(ours_values, their_values))
    correlation = float(torch.corrcoef(torch.tensor([ours_values, their_values], dtype=torch.float64))[0, 1])
    print(
        f"step values, prmtool vs reference: correlation {correlation:.4f}, largest difference "
        f"{worst:.2e}, spread (std) {torch.tensor(their_values).std().item():.2e}"
    )


if __name__ == "__main__":
    main()
