"""Generated tokens/s of the hf engine against the ways other tools drive transformers.

Same requests, same model: a random-weight model of the Qwen2.5-0.5B architecture in bf16,
256 prompts of 128 random tokens x n=8, each request with its own max_tokens drawn between 16
and 512. EOS never ends a sample (random weights, EOS ignored), so the varying max_tokens stand
in for the varying lengths EOS produces in real use. Compared, in one process:

  hf engine   prmtool's engine (slot pool, shared prefill, CUDA-graph decode)
  (a)         model.generate(num_return_sequences=n) once per prompt, as openr's hf backend;
              slow, so measured on a subset of prompts and extrapolated per token
  (b)         one padded static-batch model.generate over all requests; it runs every row to
              the longest max_tokens, and only the tokens each request asked for count
  (cb)        transformers' continuous batching (paged attention), for reference

Targets: hf engine >= 40x (a) and >= 2x (b).

    PYTHONPATH=. python bench/bench_generate.py --skip cb   # the GPU benchmark (about 3 minutes)
    PYTHONPATH=. python bench/bench_generate.py --quick     # a tiny model on CPU: checks the script runs

Measured 2026-11-22 on one H200 (torch 2.11, transformers 5.17), default arguments, --skip cb:
  hf engine 78,390 tokens/s (59,715 cold), (a) 218, (b) 12,932: 360x (a), 6.1x (b); peak 10.8 GiB
  vs 1.1 (a) and 19.9 (b). Two earlier runs of the baselines gave (a) 260-279 and (b) 15,340-16,056,
  the engine 79,076 (1024 slots; 2048 slots: 55,032, as every request starts at once and the
  batch then drains). (cb) ran once, 2,124 tokens/s and 122 GiB (no flash-attention on that machine).

With --vllm, on 2026-12-03, one H200, vLLM 0.26.0 (CUDA graphs on, each vLLM run warm: a first
pass over the requests compiles), `PYTHONPATH=. python bench/bench_generate.py --vllm --skip a,b,cb`:

  | Qwen2.5-0.5B arch, bf16                     | tokens/s | hf engine / it |
  |---------------------------------------------|---------:|---------------:|
  | hf engine, 1024 slots (warm; cold 72,878)   |   85,490 |                |
  | bare vllm.LLM.generate, defaults            |   31,803 |           2.7x |
  | bare vllm, defaults, detokenize=False       |   28,198 |           3.0x |
  | bare vllm, max_num_seqs=1024                |   32,643 |           2.6x |
  | prmtool's vllm engine, max_num_seqs=1024    |   33,072 |           2.6x |

detokenize=False is no faster (28,198 against 31,803: run-to-run noise), so vLLM is not held
back by detokenizing here; its default max_num_seqs (1024 on this GPU) is already the hf
engine's slot count. prmtool's vllm engine costs nothing over bare vLLM on this run. The hf
engine's 85,490 here against 78,390 on 2026-11-22 is after its decode attention began reading
only the cache positions that active sequences fill (generate.py), in another lease.

The 1.5B architecture on 2026-12-06, one H200, vLLM 0.26.0, `PYTHONPATH=. python
bench/bench_generate.py --vllm --arch 1.5b --skip a,b,cb` (7 min 18 s in all, two vLLM starts):

  | Qwen2.5-1.5B arch, bf16                     | tokens/s | hf engine / it |
  |---------------------------------------------|---------:|---------------:|
  | hf engine, 1024 slots (warm; cold 41,725)   |   52,200 |                |
  | bare vllm.LLM.generate, defaults            |   28,320 |           1.8x |
  | bare vllm, defaults, detokenize=False       |   26,655 |           2.0x |
  | bare vllm, max_num_seqs=1024                |   32,711 |           1.6x |
  | prmtool's vllm engine, max_num_seqs=1024    |   23,260 |           2.2x |

(hf engine peak 23.7 GiB.) The last two rows ran on one vLLM instance, one after the other, on
identical requests and sampling parameters, yet differ by 29%. Nothing in prmtool's path
accounts for it: it adds `stop=[]` and, after vLLM returns, copies the token ids into its
Completions. On the 0.5B run above the two rows were equal (32,643 and 33,072), and the issue's
first 1.5B run had them the other way round (20,271 bare, 22,919 prmtool's engine). Whether
this is vLLM's run-to-run spread or something of prmtool's that shows only on this model is
not settled (`--repeats 3` times each variant three times, alternating the two that share an
instance, and reports the median); until then read the hf engine against vLLM as a range:
1.6 to 2.2x on the 1.5B architecture, 2.6 to 3.0x on the 0.5B.

Side by side at 7B (`--shape`): random-weight Qwen2.5 architectures, bf16, EOS ignored, the hf
engine and bare vLLM (0.26 defaults, `gpu_memory_utilization` 0.88) each in its own process
(one model load and one vLLM start for all the shapes given), each shape warmed up on other
prompts of the same lengths (as many for the hf engine, which sizes its decoder and captures its
graphs by the call; a quarter as many for vLLM, which does both when it starts), then the same
requests timed:

    PYTHONPATH=. python bench/bench_generate.py --arch 7b --shape short,rollout,long
    PYTHONPATH=. python bench/bench_generate.py --arch 0.5b --shape short
    (--engines hf or vllm runs one engine alone; --model-dir a saved folder of the --arch's sizes.
    vLLM's peak is the device's memory in use after its run, the hf engine's what torch reserved)

    short    256 prompts x 128 tokens x n=8, new 16..512
    rollout  512 x 768 x n=4, new 64..768        (label's rollouts from GSM8K-length prefixes)
    long     64 x 1536 x n=8, new 256..2048      (long step prefixes)

The latest measurements close this docstring (2026-12-07, one H200, side by side in one
invocation: hf 1.21x bare vLLM on the short shape, 1.18x on rollout, 1.07x on long, 8.02x at
0.5B); the tables before them record what each change to the engine did, in order.

Before the paged KV cache, on one H100 (hf slots in brackets, each slot then reserving KV for
the longest request and each sample a copy of its prompt's):

  | arch | shape   | hf engine tok/s (slots) | bare vLLM tok/s | hf / vLLM |
  |------|---------|------------------------:|----------------:|----------:|
  | 0.5B | short   |           81,153 (1024) |          20,415 |     3.97x |
  | 7B   | short   |           20,551 (1024) |          20,619 |     1.00x |
  | 7B   | rollout |           12,634  (599) |          17,346 |     0.73x |
  | 7B   | long    |            8,577  (263) |          15,487 |     0.55x |

With the paged cache (kv_cache.py: blocks taken as sequences grow, a prompt's blocks read by its
n samples, prefixes remembered across requests), one H100 80GB, one lease, 2026-12-06, vLLM
0.26.0, torch 2.11, `--arch 7b --shape short,rollout,long` run as `--engines hf` then `--engines
vllm` on the same machine:

  | arch | shape   | hf engine tok/s (slots) | hf peak GiB | bare vLLM tok/s | vLLM GiB | hf / vLLM |
  |------|---------|------------------------:|------------:|----------------:|---------:|----------:|
  | 7B   | short   |           24,611 (1024) |        54.5 |          19,408 |     75.0 |     1.27x |
  | 7B   | rollout |           16,838 (1024) |        69.4 |          15,779 |     75.0 |     1.07x |
  | 7B   | long    |           12,087  (512) |        69.6 |          14,811 |     75.0 |     0.82x |

1.20x, 1.33x and 1.41x the engine before the cache on the same shapes, no preemption (peak
18,696, 40,800 and 24,752 of 40,961-59,565 blocks of 16 positions), CUDA-graph decode through
the Triton paged kernel. The long shape is still behind: each of a prompt's 8 samples reads the
prompt's 1,536 positions of KV at every step (a prompt's blocks are stored once but read n
times); at 512 sequences of about 2,700 positions that is about 75 GB of KV read per step
against 15 GB of weights. A decode kernel that reads a shared prefix once for all the samples
on it (cascade attention) would cut the prefix's share by 8x; vLLM's own cascade attention
applies only to a prefix common to the whole batch, so not here. (An earlier lease measured the
long shape at 12,416 tokens/s, hf alone.) The 0.5B short shape has not been rerun with the cache.

That kernel now exists (kv_cache.PrefixGroups, kernels.shared_prefix_decode_kernel: a prompt's
samples are one group, its blocks read once per step for all of them) and it did not move the
long shape. One H100 80GB, 2026-12-06 (eighth session), `--arch 7b --shape long --engines
hf,hf-no-cascade --model-dir DIR`, the same folder and requests, each engine in its own process:

  | arch | shape | hf engine tok/s (slots) | peak GiB | hf-no-cascade tok/s | peak GiB | ratio |
  |------|-------|------------------------:|---------:|--------------------:|---------:|------:|
  | 7B   | long  |           12,374  (512) |     70.4 |              12,091 |     70.3 | 1.02x |

2,044 decode steps in 50.5 s against 51.7 s: 24.7 ms a step either way, so the prompt's keys
and values were not what a step waited for (the estimate above counted bytes, not the kernel's
time). At 512 rows a 7B step is about 7.2 TFLOP of matrix products (11 ms at 650 TFLOP/s); the
rest is not accounted for yet. `--profile` is the next measurement: after each hf engine's timed
pass it decodes the requests again (32 new tokens each, eagerly, the prompts cached) under
torch's profiler and prints the kernels by GPU time:

    PYTHONPATH=. python bench/bench_generate.py --arch 7b --shape long --engines hf,hf-no-cascade --profile

Bare vLLM
was not rerun in that lease (the machine was handed back first): against the last lease's
14,811 the long shape stays at about 0.84x.

A correction to the FLOP count above: the long shape's batch does not stay at 512 rows. Its
requests' lengths spread over 256-2,048 tokens and the longest start in the lowest rows, so the
batch drains from the top and a step runs only up to the highest busy row: the engine's own
count (`GenerationStats.decode_rows`, the same requests on the tiny CPU model) is 666,216 rows
over 2,046 steps, 326 a step on average, about 4.6 TFLOP (7 ms at 650 TFLOP/s) of the 24.7 ms.
(That count is with row counts in steps of 64 rows above 64, as they then were; the measured run had
powers of two, about 747,000 rows, 365 a step: a step of 300 busy rows computed 512.) Timed on
one H100 80GB, 2026-12-07, `--arch 7b --shape long --engines hf --model-dir DIR`: 12,175
tokens/s (512 slots, 70.5 GiB peak), 2,044 steps in 51.3 s, 673,840 rows computed for 624,736
tokens: 10% fewer rows than with powers of two and no faster (12,374 then), so at 7B the rows
computed beyond the busy ones were not what a step waited for either.

Where samples end at EOS in any order (rollouts do; these shapes ignore EOS), the busy rows are
scattered, and a step used to compute every row up to the highest busy one. A draining batch
now moves its last rows down into idle ones (`compact_rows`, default on). `--eos-every N` makes
every N-th token id end a sample on both engines, and `--engines hf,hf-no-compaction` runs the
engine with and without moving rows, for that regime:

    PYTHONPATH=. python bench/bench_generate.py --arch 7b --shape long --eos-every 700 \\
        --engines hf,hf-no-compaction,vllm

On the tiny CPU model (64 prompts x 8 samples of up to 1,024 tokens, one token id in 700 ending
a sample) that computed 252,416 rows for 218,411 tokens against 524,288 (24 s against 99 s); not
yet measured on a GPU.

Where a 7B long-shape step goes: `--arch 7b --shape long --engines hf --profile`, one H100 80GB,
2026-12-07 (eleventh session; the timed pass before it: 12,354 tokens/s, 512 slots, 69.7 GiB).
The profiled pass decodes 32 tokens for each of the 512 samples, eagerly: 896 attention calls (28
layers x 32 steps), 690 ms of kernels, 21.6 ms a step at 512 rows:

  | kernels                                                        | GPU ms | share |
  |----------------------------------------------------------------|-------:|------:|
  | matrix products (cuBLAS: aten::mm, addmm for the q/k/v biases) |    342 |   50% |
  | attention: shared_prefix_decode_kernel (the prompts, cascade)  |     79 |   11% |
  | attention: paged_decode_kernel (each sample's own positions)   |     20 |    3% |
  | everything else: elementwise ops, norms' means, the sampler's  |   ~249 |   36% |
  | softmax and cumsum, copies                                     |        |       |

aten::mul alone ran 9,410 times (about ten a layer a step, 7 us each) and aten::copy_ 5,123:
transformers' eager RMSNorm (to float32, square, mean, rsqrt, scale, back), rotary embedding
and residual adds are some twenty small kernels a layer where vLLM runs a few fused ones. So
attention, 14% of a step, was never what the long shape waited for (hence cascade's 1.02x);
the elementwise third is. The matrix products alone, 10.7 ms a step at 512 rows, are about
what 7.8 TFLOP take. The engine now runs with `compile_decode` (its default on CUDA): the
decoder layers torch.compile'd (attention, which writes the cache in place, stays eager inside
them) and captured in the decode graphs as before, so each layer's norms, rotary embedding,
activation and residual adds are a few fused kernels. `hf-eager-decode` runs the eager layers.
Measured side by side in one invocation on one H100 80GB (2026-12-07), as `--engines
hf,hf-compiled --profile` before compiled decoding became the default; the same comparison is now

    PYTHONPATH=. python bench/bench_generate.py --arch 7b --shape long --engines hf-eager-decode,hf --profile

  | engine                        | tokens/s | slots | peak GiB | kernels a step | wall a step |
  |-------------------------------|---------:|------:|---------:|---------------:|------------:|
  | hf, eager decoder layers      |   12,251 |   512 |     70.5 |        21.5 ms |     24.1 ms |
  | hf, compiled (compile_decode) |   13,679 |   512 |     70.4 |        18.2 ms |     20.2 ms |

1.12x (warm-up 33.8 s against 26.0: the compilation). The compiled step's 581 ms of kernels (32
steps): matrix products 343 ms (59%), attention 97, the compiled regions 97 (norms, rotary,
activation, adds: 249 ms eager), the sampler's softmax and cumsum over the 152k vocabulary 31.
Bare vLLM ran this shape at 14,811 tokens/s in an earlier lease on the same kind of card (hf
12,354 then): compiled, about 0.92x of it.

Side by side again on one H100 80GB, 2026-12-07, in one invocation (`--arch 7b --shape
short,rollout,long --engines hf,vllm --model-dir DIR`; then `--arch 0.5b --shape short`), with
compiled decoding, torch's sampler and row counts in steps of 64. The hf warm-up was then a
quarter of the requests, so each timed pass also built its decoder and captured graphs for row
counts the warm-up never ran ("setup s", reported since; the warm-up is now as large as the
timed pass); "steady" leaves that out:

  | arch | shape   | hf tok/s (slots) | setup s | hf GiB | bare vLLM tok/s | vLLM GiB | hf / vLLM | steady |
  |------|---------|-----------------:|--------:|-------:|----------------:|---------:|----------:|-------:|
  | 0.5B | short   |    81,251 (1024) |     1.5 |   13.3 |          34,221 |     74.4 |     2.37x |  3.03x |
  | 7B   | short   |    25,649 (1024) |     1.6 |   55.1 |          22,309 |     75.0 |     1.15x |  1.25x |
  | 7B   | rollout |    18,165 (1024) |     2.4 |   72.1 |          18,673 |     75.0 |     0.97x |  1.02x |
  | 7B   | long    |    14,414  (512) |     1.3 |   70.4 |          15,533 |     75.0 |     0.93x |  0.96x |

The same lease profiled the long shape mid-run (`--profile`, now a window of 32 steps from the
step by which half the decode rows are done: steps 652-683, 399 samples decoding in 448 rows,
the sampling kernel on): 25.7 ms of kernels a step against 25.85 ms of wall time in the timed
pass, so the device never waited on the host. Of the 25.7 ms, 10.3 went to one cuBLAS kernel
for the gate and up projections, 184 us each at 448 rows where 512 rows take 109 (the
microbenchmark in bench_kernels.py's docstring: at 416 and 448 rows a layer's products cost
1.6x what 512 rows' do); attention 7.5 ms (each sample's own positions 5.4, the prompts' shared
blocks 2.1: about 2.7 TB/s of keys and values read); the sampling kernel 0.23 ms. Hence decode
steps in steps of 128 rows, and the sampling kernel on by default. A second lease that day (one
H100 80GB, another machine), `--arch 7b --shape long --engines hf,hf-sampling-kernel` and the
same with steps of 64, then the rollout shape:

  | shape   | engine                                   | tok/s  | setup s | steady |
  |---------|------------------------------------------|-------:|--------:|-------:|
  | long    | hf, rows in steps of 64, torch's sampler | 14,526 |     1.1 | 14,910 |
  | long    | hf, rows in steps of 128                 | 14,647 |     2.2 | 15,426 |
  | long    | hf, steps of 128, sampling kernel (now)  | 15,195 |     2.3 | 16,101 |
  | rollout | hf, steps of 128, sampling kernel (now)  | 19,586 |     1.2 | 20,116 |

Against bare vLLM's tokens/s from the first lease (not side by side): long 0.98x (steady 1.04x),
rollout 1.05x (1.08x). The variant that was `hf-sampling-kernel` is now `hf`;
`hf-torch-sampler` samples with torch.

A timed pass still captured graphs its warm-up had not (the long shape's 2.3 s above): its
requests drain through other row counts (replayed on the tiny CPU model, the short shape's
timed pass ran steps at 8 rows, which its warm-up never reached). A decoder now captures the
graph of every row count it can run at when it is built, as vLLM captures its batch sizes when
it starts (8 to 12 graphs; the first warm-up pays for them). Side by side in one invocation on
one H200 (the device lent an H200 that day), 2026-12-07, `--arch 7b --shape short,rollout,long`
then `--arch 0.5b --shape short`, both `--engines hf,vllm` (vLLM 0.26.0 with
`gpu_memory_utilization` 0.88, each engine in its own process, the random-weight model saved
once for both):

  | arch | shape   | hf tok/s (slots) | setup s | hf GiB | bare vLLM tok/s | vLLM GiB | hf / vLLM |
  |------|---------|-----------------:|--------:|-------:|----------------:|---------:|----------:|
  | 0.5B | short   |   163,665 (1024) |     0.0 |   11.5 |          20,402 |    127.6 |     8.02x |
  | 7B   | short   |    30,287 (1024) |     0.0 |   54.4 |          25,109 |    129.0 |     1.21x |
  | 7B   | rollout |    20,905 (1024) |     0.0 |  103.5 |          17,662 |    129.0 |     1.18x |
  | 7B   | long    |    17,802  (512) |     0.0 |  116.7 |          16,682 |    129.0 |     1.07x |

No timed pass captured a graph (setup 0.0 s); no preemption (at 7B, peaks of 18,696, 40,800
and 24,752 blocks of 40,961, 98,305 and 114,689); nothing ran out of memory. The hf engine's
pool takes 90% of the free memory, capped by what the call's samples could fill, hence its
larger peaks on this card. Bare vLLM at 0.5B spreads the most from lease to lease (20,415,
28,198-34,221 and now 20,402 tokens/s; why was not measured): against the fastest, 34,221, the
hf engine's 163,665 is still 4.8x. The 7B shapes were last side by side on an H100 before the
sampling kernel, steps of 128 rows and graphs captured at build (0.93x to 1.15x, above).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from prmtool.engines import SamplingRequest
from prmtool.engines.hf import HFEngine

QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
QWEN25_15B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
QWEN25_7B = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
    tie_word_embeddings=True,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests, CPU: a smoke run")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--subset-a", type=int, default=6, help="prompts measured for baseline (a)")
    parser.add_argument("--slots", default="1024", help="hf engine max_batch_size; a comma list runs each")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: engine,a,b,cb")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["0.5b", "1.5b", "7b"], default="0.5b", help="the Qwen2.5 architecture")
    parser.add_argument(
        "--shape",
        help="side by side: the hf engine and bare vLLM (defaults, gpu_memory_utilization 0.88), each in its own "
        f"process, on these shapes (comma-separated: {', '.join(SHAPES)}; each sets --prompts, --prompt-len, --n, "
        "--min-tokens, --max-tokens); one process per engine runs them all, one model load and one vLLM start; "
        "prints tokens/s, slots, peak GPU memory and the hf / vLLM ratio of each",
    )
    parser.add_argument(
        "--engines",
        default="hf,vllm",
        help="with --shape: which engines run (hf, vllm; hf-no-cascade: the hf engine with each sample reading "
        "its prompt's keys and values itself; hf-no-compaction: with a draining batch's rows left in place; "
        "hf-eager-decode: with eager decoder layers in decoding, compile_decode=False; hf-torch-sampler: "
        "sampling by torch's softmax and cumulative sum, sampling_kernel=False)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --shape: after each hf engine's timed pass, run its requests again eagerly under torch's "
        "profiler, recording 32 decode steps from --profile-step, and print the kernels by GPU time",
    )
    parser.add_argument(
        "--profile-step",
        type=int,
        help="with --profile: the decode step the profiled window starts at (default: the step by which half "
        "of the shape's decode rows are done, where the sequences are as long as they are on average)",
    )
    parser.add_argument(
        "--eos-every",
        type=int,
        default=0,
        help="with --shape: every N-th token id ends a sample (random weights never pick EOS; with N = 700 a "
        "sample ends after 700 tokens on average, so samples end in any order, as rollouts do); default: EOS "
        "ignored, every sample runs to its max_tokens",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # with --shape: run one engine, print a JSON line
    parser.add_argument(
        "--model-dir",
        help="with --shape: a saved model folder of --arch's sizes to load (default: random weights, saved once)",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also bare vllm.LLM.generate (defaults; max_num_seqs = the hf engine's slots; detokenize=False) "
        "and prmtool's vllm engine, on the same model saved as a folder",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --vllm: timed passes of each vLLM variant after its warm-up; the median is reported and every "
        "pass printed (the two variants that share an instance alternate, so neither always runs last)",
    )
    args = parser.parse_args()
    if args.shape:
        args.shapes = [name for name in args.shape.split(",") if name]
        unknown = sorted(set(args.shapes) - set(SHAPES))
        if unknown:
            parser.error(f"--shape: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    if args.quick:
        args.prompts, args.n, args.prompt_len, args.min_tokens, args.max_tokens = 8, 4, 16, 4, 32
        args.subset_a, args.slots = 2, "16"
    return args


ARCHES = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B, "7b": QWEN25_7B}
# --shape: (prompts, prompt tokens, n, fewest and most new tokens), as issue 39's table.
SHAPES = {
    "short": (256, 128, 8, 16, 512),
    "rollout": (512, 768, 4, 64, 768),
    "long": (64, 1536, 8, 256, 2048),
}


def build_model(quick: bool, device: torch.device, arch: str = "0.5b") -> Qwen2ForCausalLM:
    config = Qwen2Config(**(TINY if quick else ARCHES[arch]), eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    # EOS can never end a sequence: every row runs to its max_new_tokens.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0
    )
    return model


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the whole vocabulary: the engine decodes texts with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def make_requests(args, vocab_size: int) -> list[SamplingRequest]:
    rng = random.Random(args.seed)
    return [
        SamplingRequest(
            prompt_ids=[rng.randrange(vocab_size) for _ in range(args.prompt_len)],
            n=args.n,
            max_tokens=rng.randint(args.min_tokens, args.max_tokens),
            seed=index,
        )
        for index in range(args.prompts)
    ]


class Timer:
    """Wall time of a GPU region (synchronized) and the peak memory allocated in it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.peak_gib = float("nan")
        self.seconds = time.perf_counter() - self.start


def run_engine(model, tokenizer, requests, slots, device):
    engine = HFEngine(model, tokenizer, ignore_eos=True, max_batch_size=slots)
    runs = []
    for label in ("cold", "warm"):  # cold includes allocating the slot pool and capturing the graph
        with Timer(device) as timer:
            results = engine.sample(requests)
        tokens = sum(c.num_tokens for samples in results for c in samples)
        expected = sum(r.n * r.max_tokens for r in requests)
        assert tokens == expected, f"engine generated {tokens} tokens, requests asked for {expected}"
        runs.append(dict(run=label, tokens=tokens, seconds=timer.seconds, peak_gib=timer.peak_gib))
        print(
            f"  hf engine ({slots} slots) {label}: {tokens} tokens in {timer.seconds:.1f} s, {engine.last_stats}",
            flush=True,
        )
    engine.close()
    return runs[-1] | {"cold_seconds": runs[0]["seconds"]}


def run_generate_per_prompt(model, requests, args, device):
    """Baseline (a): one generate(num_return_sequences=n) per prompt, on the first few prompts."""
    subset = requests[: args.subset_a]
    tokens = 0
    with Timer(device) as timer:
        for request in subset:
            input_ids = torch.tensor([request.prompt_ids], device=device)
            output = model.generate(
                input_ids,
                num_return_sequences=request.n,
                max_new_tokens=request.max_tokens,
                min_new_tokens=request.max_tokens,
            )
            tokens += output[:, input_ids.shape[1] :].numel()
    print(f"  (a) per-prompt generate: {tokens} tokens in {timer.seconds:.1f} s over {len(subset)} prompts", flush=True)
    return dict(tokens=tokens, seconds=timer.seconds, peak_gib=timer.peak_gib, prompts=len(subset))


def run_generate_static_batch(model, requests, args, device):
    """Baseline (b): all prompts in one padded generate; rows run to the longest max_tokens."""
    input_ids = torch.tensor([r.prompt_ids for r in requests], device=device)
    longest = max(r.max_tokens for r in requests)
    with Timer(device) as timer:
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_return_sequences=args.n,
            max_new_tokens=longest,
            min_new_tokens=longest,
        )
    assert output.shape == (len(requests) * args.n, args.prompt_len + longest)
    useful = sum(r.n * r.max_tokens for r in requests)
    print(
        f"  (b) static-batch generate: {useful} requested tokens ({output.shape[0] * longest} generated) in "
        f"{timer.seconds:.1f} s",
        flush=True,
    )
    return dict(tokens=useful, seconds=timer.seconds, peak_gib=timer.peak_gib)


def run_continuous_batching(model, requests, args, device):
    """transformers' continuous batching: each sample as its own request (prefix sharing is on)."""
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens, eos_token_id=None
    )
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
        warmup_seconds = time.perf_counter() - start
        with Timer(device) as timer:
            for request in requests:
                for _ in range(request.n):
                    manager.add_request(input_ids=request.prompt_ids, max_new_tokens=request.max_tokens)
            finished, tokens = 0, 0
            total = sum(r.n for r in requests)
            while finished < total:
                result = manager.get_result(timeout=60)
                if result is None:
                    raise RuntimeError(f"continuous batching stalled after {finished} of {total} results")
                if result.is_finished():
                    finished += 1
                    tokens += len(result.generated_tokens)
    print(
        f"  (cb) continuous batching: {tokens} tokens in {timer.seconds:.1f} s (+{warmup_seconds:.1f} s warm-up)",
        flush=True,
    )
    return dict(tokens=tokens, seconds=timer.seconds, peak_gib=timer.peak_gib, warmup_seconds=warmup_seconds)


def run_vllm(model, tokenizer, requests, args) -> dict[str, dict]:
    """Bare vllm.LLM.generate beside prmtool's vllm engine, on the model saved as a folder.
    Each vLLM instance is timed warm: a first pass over the requests compiles and warms up."""
    import gc
    import tempfile

    import vllm

    from prmtool.engines.vllm import VLLMEngine

    folder = tempfile.mkdtemp(prefix="bench-vllm-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    slots = int(args.slots.split(",")[0])
    prompts = [{"prompt_token_ids": r.prompt_ids} for r in requests]

    def params(detokenize: bool = True):
        return [
            vllm.SamplingParams(
                n=r.n, temperature=1.0, top_p=1.0, max_tokens=r.max_tokens, seed=r.seed, ignore_eos=True,
                detokenize=detokenize,
            )
            for r in requests
        ]  # fmt: skip

    def warmed_up(name: str, generate) -> dict:
        """One warm-up pass (compilation, CUDA graphs, the prefix cache), then args.repeats timed ones."""
        generate()
        return {"name": name, "generate": generate, "seconds": []}

    def run_passes(variants: list[dict]) -> dict[str, dict]:
        # Passes alternate between the variants: a drift over time (clocks, caches) hits each alike.
        for _ in range(args.repeats):
            for variant in variants:
                torch.cuda.synchronize()
                start = time.perf_counter()
                outputs = variant["generate"]()
                variant["seconds"].append(time.perf_counter() - start)
                variant["tokens"] = sum(len(o.token_ids) for out in outputs for o in out.outputs)
                print(f"  {variant['name']}: {variant['tokens'] / variant['seconds'][-1]:,.0f} tokens/s", flush=True)
        return {
            v["name"]: dict(tokens=v["tokens"], seconds=statistics.median(v["seconds"]), peak_gib=float("nan"))
            for v in variants
        }

    def bare_defaults() -> dict[str, dict]:
        llm = vllm.LLM(model=folder, dtype="bfloat16", seed=0, gpu_memory_utilization=0.6)
        return run_passes(
            [
                warmed_up("vllm", lambda: llm.generate(prompts, params(), use_tqdm=False)),
                warmed_up("vllm-nodetok", lambda: llm.generate(prompts, params(False), use_tqdm=False)),
            ]
        )  # llm goes with this frame: vLLM's engine process ends, and its GPU memory with it

    results = bare_defaults()
    gc.collect()
    torch.cuda.empty_cache()
    engine = VLLMEngine(folder, dtype="bfloat16", ignore_eos=True, max_num_seqs=slots, gpu_memory_utilization=0.6)

    def through_engine():
        completions = engine.sample(requests)
        return [
            type("Out", (), {"outputs": [type("O", (), {"token_ids": c.token_ids}) for c in s]}) for s in completions
        ]

    results |= run_passes(
        [
            warmed_up(f"vllm@{slots}", lambda: engine.llm.generate(prompts, params(), use_tqdm=False)),
            warmed_up("prmtool-vllm", through_engine),
        ]
    )
    engine.close()
    return results


def with_shape(args, shape: str) -> argparse.Namespace:
    """args with one shape's sizes (and --quick's tiny ones)."""
    shaped = argparse.Namespace(**vars(args))
    shaped.prompts, shaped.prompt_len, shaped.n, shaped.min_tokens, shaped.max_tokens = SHAPES[shape]
    if args.quick:
        shaped.prompts, shaped.n, shaped.prompt_len, shaped.min_tokens, shaped.max_tokens = 8, 4, 16, 4, 32
    return shaped


def side_by_side(args) -> None:
    """--shape: each engine in its own process on the same requests; the table of issue 39."""
    import subprocess
    import sys
    import tempfile

    engines = [e for e in args.engines.split(",") if e]
    folder = args.model_dir
    if "vllm" in engines and not folder:  # vLLM loads a model folder: the random weights are saved once, for both
        folder = tempfile.mkdtemp(prefix="bench-generate-")
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
        model = build_model(args.quick, device, args.arch)
        model.save_pretrained(folder)
        build_tokenizer(model.config.vocab_size).save_pretrained(folder)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
    rows = {}  # (engine, shape) -> result
    for engine in engines:
        command = [sys.executable, __file__, "--worker", engine, "--shape", ",".join(args.shapes), "--arch", args.arch]
        command += ["--slots", args.slots, "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        command += ["--profile"] if args.profile else []
        command += ["--profile-step", str(args.profile_step)] if args.profile_step is not None else []
        command += ["--eos-every", str(args.eos_every)] if args.eos_every else []
        command += ["--model-dir", folder] if folder else []
        print(f"$ {' '.join(command)}", flush=True)
        # The worker touches CUDA before vLLM starts its engine process: forking then fails
        # ("Cannot re-initialize CUDA in forked subprocess", seen on an H100), so vLLM spawns.
        environment = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
        # Lines as they come: a run cut short (a lent GPU taken back) still shows each shape done.
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) as worker:
            for line in worker.stdout:
                if not line.startswith("RESULT "):
                    print(line, end="", flush=True)
                    continue
                row = json.loads(line[len("RESULT ") :])
                rows[engine, row["shape"]] = row
                print(f"  {engine}, {row['shape']}: {row['tokens_per_second']:,.0f} tokens/s, {row['slots']} slots, "
                      f"{row['peak_gib']:.1f} GiB, {row['seconds']:.1f} s", flush=True)  # fmt: skip
        if worker.returncode != 0:
            print(f"  {engine}: failed (exit {worker.returncode})", flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.arch} architecture, bf16, {gpu}")
    print(f"{'shape':<9}{'requests':<30}{'engine':<19}{'tokens/s':>10}{'slots':>7}{'peak GiB':>10}{'seconds':>9}"
          f"{'setup s':>9}")  # fmt: skip
    for shape in args.shapes:
        shaped = with_shape(args, shape)
        sizes = f"{shaped.prompts} x {shaped.prompt_len} x n={shaped.n}, {shaped.min_tokens}..{shaped.max_tokens}"
        for engine in engines:
            row = rows.get((engine, shape))
            if row:
                print(
                    f"{shape:<9}{sizes:<30}{engine:<19}{row['tokens_per_second']:>10,.0f}{row['slots']:>7}"
                    f"{row['peak_gib']:>10.1f}{row['seconds']:>9.1f}{row['setup_seconds']:>9.1f}"
                )
        for engine in engines:
            if engine != "vllm" and (engine, shape) in rows and ("vllm", shape) in rows:
                ours, theirs = rows[engine, shape], rows["vllm", shape]
                steady = ours["tokens"] / max(1e-9, ours["seconds"] - ours["setup_seconds"])
                print(f"{shape:<9}{engine} / vLLM: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x "
                      f"({steady / theirs['tokens_per_second']:.2f}x without the setup)")  # fmt: skip
    if os.environ.get("OUT"):
        name = f"bench_generate_{args.arch}_{'-'.join(args.shapes)}_{'-'.join(engines)}.json"
        path = os.path.join(os.environ["OUT"], name)
        with open(path, "w") as handle:
            json.dump(dict(args=vars(args), gpu=gpu, rows=[dict(engine=e, **row) for (e, _), row in rows.items()]),
                      handle, indent=1)  # fmt: skip


def worker(args) -> None:
    """One engine, alone in this process, over every shape of --shape: for each, a warm-up pass
    over other prompts of the same lengths, then the timed pass; prints a RESULT line of JSON per
    shape."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    vocab = (TINY if args.quick else ARCHES[args.arch])["vocab_size"]
    stop_ids = list(range(args.eos_every - 1, vocab, args.eos_every)) if args.eos_every else None
    if args.worker.startswith("hf"):
        if args.model_dir:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
            ).to(device)
        else:
            model = build_model(args.quick, device, args.arch)
        engine = HFEngine(
            model,
            build_tokenizer(vocab),
            ignore_eos=not stop_ids,
            eos_token_ids=stop_ids,
            max_batch_size=int(args.slots.split(",")[0]),
            shared_prefix_attention=args.worker != "hf-no-cascade",
            compact_rows=args.worker != "hf-no-compaction",
            compile_decode=False if args.worker == "hf-eager-decode" else None,  # None: the engine's default
            sampling_kernel=False if args.worker == "hf-torch-sampler" else None,  # None: the engine's default
        )
    else:
        import vllm

        llm = vllm.LLM(model=args.model_dir, dtype="bfloat16", seed=0, gpu_memory_utilization=0.88)

    def generate(batch, on_progress=None):
        if args.worker.startswith("hf"):
            results = engine.sample(batch, on_progress)
            return sum(c.num_tokens for samples in results for c in samples)
        params = [
            vllm.SamplingParams(n=r.n, temperature=1.0, top_p=1.0, max_tokens=r.max_tokens, seed=r.seed,
                                ignore_eos=not stop_ids, stop_token_ids=stop_ids)
            for r in batch
        ]  # fmt: skip
        outputs = llm.generate([{"prompt_token_ids": r.prompt_ids} for r in batch], params, use_tqdm=False)
        return sum(len(o.token_ids) for out in outputs for o in out.outputs)

    for shape in args.shapes:
        shaped = with_shape(args, shape)
        warmup = make_requests(argparse.Namespace(**(vars(shaped) | {"seed": args.seed + 1})), vocab)
        # Its longest request as long as the timed pass's: the hf engine sizes its decoder by it.
        warmup[0] = dataclasses.replace(warmup[0], max_tokens=shaped.max_tokens)
        if not args.worker.startswith("hf"):
            # vLLM builds its cache and captures its graphs when it starts: a quarter warms it.
            # The hf engine sizes its decoder (and captures a graph per row count) by the call:
            # its warm-up is as large as the timed pass, which then pays for neither.
            warmup = warmup[: max(8, len(warmup) // 4)]
        requests = make_requests(shaped, vocab)
        expected = sum(r.n * r.max_tokens for r in requests)
        started = time.perf_counter()
        generate(warmup)
        print(f"  {args.worker}, {shape}: warm-up {time.perf_counter() - started:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # The hf engine reports progress once a decode step (and once a prefill): the wall time
        # of each, to time the steps of the window --profile looks at.
        marks: list[float] = []
        setup_before = engine.setup_seconds() if args.worker.startswith("hf") else 0.0
        with Timer(device) as timer:
            tokens = generate(requests, lambda done, new: marks.append(time.perf_counter()))
        setup = 0.0
        if args.worker.startswith("hf"):
            stats = engine.last_stats
            # What the warm-up left to do: building a decoder, capturing a row count's graph.
            setup = engine.setup_seconds() - setup_before
            print(f"  hf engine, {shape}: {stats}; decoder setup and graph captures in the timed pass: {setup:.1f} s",
                  flush=True)  # fmt: skip
            if engine.compile_decode:  # compiled graphs; a recompile limit hit leaves shapes eager
                from torch._dynamo.utils import counters

                print(f"  torch.compile: {dict(counters['stats'])}, {dict(counters['recompiles'])}", flush=True)
            slots = stats.num_slots
            peak = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
        else:
            slots = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
            free, total = torch.cuda.mem_get_info() if device.type == "cuda" else (0, 0)
            peak = (total - free) / 2**30  # vLLM's engine runs in a process of its own: the device's use
        # Every sample runs to its max_tokens unless stop ids end it earlier.
        assert tokens == expected or (stop_ids and tokens < expected), f"{args.worker}: {tokens} tokens on {shape}"
        row = dict(shape=shape, tokens=tokens, seconds=timer.seconds, tokens_per_second=tokens / timer.seconds,
                   slots=slots, peak_gib=peak, setup_seconds=setup)  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
        if args.profile and args.worker.startswith("hf"):
            at_step = args.profile_step if args.profile_step is not None else half_the_rows_step(requests)
            last = min(at_step + PROFILED_STEPS, len(marks) - 1)  # a short run ends before the window does
            if last > at_step:
                wall = 1000 * (marks[last] - marks[at_step]) / (last - at_step)
                print(f"  timed pass, steps {at_step}..{last - 1}: {wall:.2f} ms a step (wall)", flush=True)
            profile_decode(engine, requests, device, at_step)


PROFILED_STEPS = 32


def half_the_rows_step(requests: list[SamplingRequest]) -> int:
    """The decode step by which half of the requests' decode rows are done (every sample runs to
    its max_tokens): where a step's sequences are about as long as they are on average."""
    rows = [sum(r.n for r in requests if r.max_tokens > step) for step in range(max(r.max_tokens for r in requests))]
    total, done = sum(rows), 0
    for step, count in enumerate(rows):
        done += count
        if 2 * done >= total:
            return step
    return 0


def profile_decode(engine, requests, device, at_step: int) -> None:
    """Where the hf engine's decode time goes: the timed requests again, decoded eagerly (a CUDA
    graph's replay hides its kernels), with torch's profiler recording steps at_step to
    at_step + 31 (counted as the engine reports progress: once a decode step, once a prefill);
    prints the kernels by GPU time (CPU time on a CPU) and their time a step."""
    at_step = max(1, at_step)  # the profiler warms up on the step before the window
    decoder = engine.decoder
    graphs, decoder.use_cuda_graph = decoder.use_cuda_graph, False
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=at_step - 1, warmup=1, active=PROFILED_STEPS, repeat=1)
    decoding = []  # per progress report: the samples that got a token
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:

        def on_progress(done, new):
            decoding.append(new)
            profiler.step()

        engine.sample(requests, on_progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
    decoder.use_cuda_graph = graphs
    assert engine.decoder is decoder, "the profiled call must run on the timed call's decoder"
    sampled = decoding[at_step : at_step + PROFILED_STEPS]
    print(f"  {len(sampled)} eager decode steps from step {at_step}, {sum(sampled) / max(1, len(sampled)):.0f} "
          "samples decoding a step:", flush=True)  # fmt: skip
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = profiler.key_averages()
    print(events.table(sort_by=sort, row_limit=20), flush=True)
    if device.type == "cuda":
        # Kernels only: ranges marked on the GPU (the profiler's steps, compiled regions) span them.
        kernels = [e for e in events if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
        busy, what = sum(e.self_device_time_total for e in kernels), "kernels"
    else:
        busy, what = sum(e.self_cpu_time_total for e in events), "CPU time"
    print(f"  eager {what}: {busy / 1000 / max(1, len(sampled)):.2f} ms a step", flush=True)


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    if args.shape:
        return side_by_side(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    skip = set(filter(None, args.skip.split(",")))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {gpu}", flush=True)
    model = build_model(args.quick, device, args.arch)
    tokenizer = build_tokenizer(model.config.vocab_size)
    requests = make_requests(args, model.config.vocab_size)
    print(
        f"{len(requests)} prompts x {args.prompt_len} tokens x n={args.n}, max_tokens "
        f"{args.min_tokens}..{args.max_tokens}: "
        f"{sum(r.n * r.max_tokens for r in requests)} tokens requested",
        flush=True,
    )
    results, labels = {}, {}
    phases = []
    if "engine" not in skip:
        for slots in map(int, args.slots.split(",")):
            phases.append((f"engine@{slots}", lambda m, r, a, d, slots=slots: run_engine(m, tokenizer, r, slots, d)))
            labels[f"engine@{slots}"] = f"hf engine, {slots} slots (warm)"
    phases += [("a", run_generate_per_prompt), ("b", run_generate_static_batch), ("cb", run_continuous_batching)]
    for name, phase in phases:
        if name in skip:
            continue
        try:
            results[name] = phase(model, requests, args, device)
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            print(f"  {name}: failed: {type(error).__name__}: {error}", flush=True)

    if args.vllm:
        try:
            results |= run_vllm(model, tokenizer, requests, args)
        except Exception as error:
            print(f"  vllm: failed: {type(error).__name__}: {error}", flush=True)
    slots_first = int(args.slots.split(",")[0])
    labels |= {
        "vllm": "bare vllm.LLM.generate, defaults",
        "vllm-nodetok": "bare vllm, defaults, detokenize=False",
        f"vllm@{slots_first}": f"bare vllm, max_num_seqs={slots_first}",
        "prmtool-vllm": f"prmtool vllm engine, max_num_seqs={slots_first}",
    }
    rate = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    labels |= {
        "a": f"(a) generate per prompt (extrapolated from {results.get('a', {}).get('prompts', 0)} prompts)",
        "b": "(b) static-batch generate",
        "cb": "(cb) transformers continuous batching",
    }
    print()
    print(f"{'method':<52}{'tokens/s':>12}{'peak GiB':>10}")
    for name, r in results.items():
        print(f"{labels[name]:<52}{rate[name]:>12,.0f}{r['peak_gib']:>10.1f}")
    for name in (n for n in results if n.startswith("engine@")):
        print(
            f"{labels[name]}: cold run (pool allocation + graph capture included) "
            f"{results[name]['tokens'] / results[name]['cold_seconds']:,.0f} tokens/s"
        )
        for baseline, target in (("a", 40), ("b", 2), ("cb", None), *((v, None) for v in labels if "vllm" in v)):
            if baseline in rate:
                goal = f" (target >= {target}x)" if target else ""
                print(f"  ratio to {baseline}: {rate[name] / rate[baseline]:.1f}x{goal}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_generate.json"), "w") as handle:
            json.dump(
                dict(
                    args=vars(args),
                    results=results,
                    tokens_per_second=rate,
                    gpu=gpu,
                    transformers=transformers.__version__,
                    torch=torch.__version__,
                ),
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
