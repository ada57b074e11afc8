"""Benchmarks of `prmtool label`.

    python bench/bench_label.py economy            # CPU: rollout tokens of binary vs mc
    python bench/bench_label.py overhead           # GPU: label vs the bare engine on the same requests
    python bench/bench_label.py judge              # GPU: rows/s of --method judge (LLM-as-judge)
    python bench/bench_label.py schedule           # CPU: overhead's workload as waves of engine slots
    python bench/bench_label.py fidelity           # CPU: first errors of every --rule under noisy rollouts
    python bench/bench_label.py long               # GPU: the label regime at 7B, against bare vLLM

economy: the same wrong responses labeled by first-error binary search and by per-step MC
(Math-Shepherd), with a scripted policy whose rollouts reach the right answer with probability
p unless their prefix holds the injected wrong step, and whose rollout length shrinks with the
prefix (less is left to write). Prints the generated tokens of each, their ratio, and how often
the two methods find the same first error. Targets: agreement >= 0.95 at <= 35% of mc's tokens.

overhead: a random-weight Qwen2.5-0.5B (bf16) labels wrong responses with `--method binary`
through the hf engine (`--engine vllm`: vLLM); every request label sends is recorded, then the
bare engine (hf: `engine.sample`; vllm: `vllm.LLM.generate` itself) samples the identical list
of requests in one call. Prints both wall times and label's throughput as a fraction of the
bare engine's for each of `--modes` (default: all four): lockstep rounds (one engine call per
round), continuous rounds (a search's next probe goes out as soon as its own results are
verified), each with and without speculation (idle slots sample the probes a search may ask
next; the labels are the same, and each mode says so). The first mode must be one without
speculation: what it asks is the work the bare engine replays. A lockstep run also prints the
wall time of each engine call and label's work between them. Targets: >= 0.9 at 512
responses, >= 0.95 at 2,048 (vllm).

Measured on one H200 (one H100 where the row says so), random weights (no rollout is ever
right, so every search runs to full depth and staged sampling always draws all k = 8), vLLM
0.26.0, 11,440 rollouts in 2,860 requests each at 512 responses. Compare ratios within one
run (one card, one bare replay), not across rows of different runs:

  | engine, responses, max_tokens | rounds                 | label s | bare s | label / bare | when           |
  |-------------------------------|------------------------|--------:|-------:|-------------:|----------------|
  | hf, 512, 128                  | lockstep               |   22.71 |  18.75 |        0.826 | 2026-12-06 (h) |
  | hf, 512, 128                  | lockstep+speculation   |   18.49 |  18.75 |        1.014 | 2026-12-06 (h) |
  | hf, 512, 128                  | continuous+speculation |   20.46 |  18.75 |        0.916 | 2026-12-06 (h) |
  | hf, 512, 128                  | lockstep               |   22.16 |  19.76 |        0.892 | 2026-12-06 (h) |
  | hf, 512, 128                  | lockstep+speculation   |   19.70 |  19.76 |        1.003 | 2026-12-06 (h) |
  | vllm, 2,048, 64               | lockstep               |  114.40 | 105.72 |        0.924 | 2026-12-06 (f) |
  | vllm, 2,048, 64               | lockstep+speculation   |  100.72 | 105.72 |        1.050 | 2026-12-06 (f) |
  | vllm, 512, 64                 | lockstep               |   27.36 |  26.53 |        0.970 | 2026-12-06 (f) |
  | vllm, 512, 64                 | lockstep+speculation   |   29.20 |  26.53 |        0.909 | 2026-12-06 (f) |
  | hf, 512, 128                  | lockstep               |   23.89 |  18.06 |        0.756 | 2026-12-06 (f) |
  | hf, 512, 128                  | lockstep+speculation   |   20.43 |  18.06 |        0.884 | 2026-12-06 (f) |
  | hf, 512, 128                  | continuous+speculation |   20.27 |  18.06 |        0.891 | 2026-12-06 (f) |
  | hf, 512, 128                  | lockstep               |   25.22 |  18.63 |        0.739 | 2026-12-06 (g) |
  | hf, 512, 128                  | lockstep+speculation   |   20.90 |  18.63 |        0.891 | 2026-12-06 (g) |
  | vllm, 2,048, 64               | lockstep               |  137.50 | 126.01 |        0.916 | 2026-12-06 (d) |
  | vllm, 2,048, 64               | lockstep+speculation   |  135.42 | 126.01 |        0.931 | 2026-12-06 (d) |
  | vllm, 2,048, 64               | continuous             |  153.42 | 126.01 |        0.821 | 2026-12-06 (d) |
  | vllm, 512, 64                 | lockstep               |   37.36 |  33.37 |        0.893 | 2026-12-06 (d) |
  | vllm, 512, 64                 | lockstep+speculation   |   38.27 |  33.37 |        0.872 | 2026-12-06 (d) |
  | vllm, 512, 64                 | continuous             |   37.50 |  33.37 |        0.890 | 2026-12-06 (d) |
  | hf, 512, 128                  | lockstep               |   28.49 |  19.12 |        0.671 | 2026-12-06 (e) |
  | hf, 512, 128                  | lockstep+speculation   |   22.15 |  19.12 |        0.863 | 2026-12-06 (e) |
  | hf, 512, 128                  | continuous             |   21.99 |  19.12 |        0.869 | 2026-12-06 (e) |
  | hf, 512, 128                  | continuous+speculation |   21.72 |  19.12 |        0.880 | 2026-12-06 (e) |
  | hf, 512, 128                  | lockstep               |   27.57 |  19.10 |        0.693 | 2026-12-06 (c) |
  | hf, 512, 128                  | lockstep+speculation   |   21.86 |  19.10 |        0.874 | 2026-12-06 (c) |
  | hf, 512, 128                  | continuous+speculation |   22.82 |  19.10 |        0.837 | 2026-12-06 (c) |
  | hf, 512, 128                  | lockstep               |   26.90 |  18.07 |        0.672 | 2026-12-04 (b) |
  | hf, 512, 128                  | lockstep+speculation   |   21.09 |  18.07 |        0.857 | 2026-12-04 (b) |
  | hf, 512, 128                  | continuous             |   26.51 |  18.07 |        0.682 | 2026-12-04 (b) |
  | hf, 512, 128                  | continuous+speculation |   22.98 |  18.07 |        0.787 | 2026-12-04 (b) |
  | hf, 512, 128                  | lockstep               |   25.32 |  18.63 |        0.736 | 2026-12-04     |
  | hf, 512, 128                  | continuous             |   25.28 |  17.55 |        0.694 | 2026-12-04     |
  | hf, 512, 128                  | lockstep               |   23.74 |  17.20 |        0.724 | 2026-12-03     |
  | hf, 512, 128                  | continuous             |   29.91 |  17.87 |        0.598 | 2026-12-03 (a) |
  | vllm, 512, 64                 | continuous             |   32.35 |  24.05 |        0.743 | 2026-12-03 (a) |

  (hf: `python bench/bench_label.py overhead --responses 512 --max-tokens 128`; vllm: `...
  --engine vllm --responses 512 --max-tokens 64 --modes continuous`.) (a): before verification
  moved off the engine's thread. (b): one run, all four modes against one bare replay; the
  speculation rows sampled 464 rollouts ahead of their round, 2 of them never asked for
  (lockstep: 7 engine calls instead of 8), and 2,556 ahead, 438 unused (continuous). Label's
  host work, measured inside the runs: verification 0.3-0.8 s, tokenizing the next probes'
  prefixes 0.5-1.1 s, of 21-27 s. (c): one H100, one run, `--modes lockstep,lockstep+speculation,
  continuous+speculation`, after speculation reached one level further (the rests of both next
  probes too): lockstep sampled the same 464 rollouts ahead, 2 unused, in 7 engine calls, as in
  (b) (its idle slots were all taken by the nearer probes); continuous 2,562 ahead, 1,076
  unused. vLLM's wheels were being installed on the host during the continuous run.
  (d): one H100, vLLM 0.26.0, `--engine vllm --responses 2048,512 --max-tokens 64 --modes
  lockstep,lockstep+speculation,continuous`, one vLLM start for all six runs (1 min 53 s from
  `vllm.LLM` to ready, compilation 25 s of it), each run (label's and the bare replay) starting
  with vLLM's prefix cache emptied. 2,048 responses: 45,536 rollouts in 11,384 requests, 2,914,304
  tokens; label's host work blocking the engine in lockstep+speculation: verification 1.28 s,
  tokenizing the next prefixes 2.32 s (one `encode` per prefix then; now one batched call, below).
  Continuous rounds lose through vLLM, for reasons not yet measured apart: 1,150 verification
  passes of a few requests each (5.6 s on threads) share the interpreter with vLLM's own host
  loop, and the gate keeps vLLM's queue short, so its scheduler may idle between a request's end
  and its follow-up's arrival. (e): the same lease, before (d), `--responses 512 --max-tokens 128
  --modes lockstep,lockstep+speculation,continuous,continuous+speculation`: continuous rounds with
  their gate (below), first measured here, went from 0.682 and 0.787 (b) to 0.869 and 0.880.
  (f): one H200, a later lease, after the batched tokenizing and the hf engine's decoder reuse
  (below); hf: `--responses 512 --max-tokens 128 --modes lockstep,lockstep+speculation,
  continuous+speculation`; vllm: `--engine vllm --responses 512,2048 --max-tokens 64 --modes
  lockstep,lockstep+speculation`, one vLLM start. Decoders the hf engine built: lockstep 3 in
  0.55 s (4 before the reuse), lockstep+speculation 1 in 0.12 s, the bare replay 1 in 0.13 s.
  Label's host work blocking the engine, lockstep+speculation: hf at 512 0.29 s verifying and
  0.12 s tokenizing; vllm at 2,048 0.72 s verifying and 0.40 s tokenizing (2.32 s in (d), one
  `encode` per prefix on an H100 host). Through vLLM at 2,048 label with speculation beat the
  bare replay of its own requests (1.050): vLLM sampled the 11,384 requests given at once more
  slowly (27,567 tokens/s) than the same work in label's eight rounds (28,933). vLLM's
  run-to-run spread is wide on these machines (two passes of identical requests on one instance
  differed by 29% in bench_generate's 1.5B run), so rows of a few percent apart in one run are
  not told apart by it. (g): one H100, the same code with each engine call timed, `--responses
  512 --max-tokens 128 --modes lockstep,lockstep+speculation`: with speculation label spent 20.50 s
  in its 7 engine calls (1.90, 6.23, 1.63, 5.51, 1.47, 2.74, 1.01 s: each probe's first stage of
  2 rollouts, then its other 6) and 0.40 s between them, against the bare replay's 18.63 s in one
  call; lockstep alone 24.83 s in 8 calls and 0.40 s between them.
  (h): one H100, a later session, after the hf engine's split admission (below), two runs on one
  warm machine: `--modes lockstep,lockstep+speculation,continuous+speculation`, then `--modes
  lockstep,lockstep+speculation`. Decode steps, the same as on the CPU: lockstep 1,792, the
  default 1,536, continuous with speculation 1,536, the bare replay 1,536. The default's 7
  engine calls took 1.89, 4.95, 1.69, 4.24, 1.45, 2.82, 1.03 s (in (g) the second and fourth
  took 6.23 and 5.51 s) and label's work between them 0.42 s. Label at or a little above its
  bare replay (1.014, 1.003) is run-to-run spread on equal decode steps, not label beating it.

  Without speculation the targets are far off, and host work is not what is missing: at this
  size the workload is bounded by its chain of dependent samples. A search over 16 steps makes
  4 probes one after another, each in two stages (2 rollouts, then the other 6 once both
  failed), so its last rollouts cannot start before 7 others of 128 tokens have ended: 1,024
  decode steps in a chain, against the 1,430 steps (1,464,320 tokens / 1,024 slots) in which
  the bare engine does all the work at once. Towards the end of the chain too few searches are
  left to fill the slots. Speculation shortens the chain where slots are idle (a probe's second
  stage and both possible next probes are sampled beside its first stage): 0.672 -> 0.857 in
  lockstep, label's default, on an H200, and 0.693 -> 0.874 on an H100.

  Targets, as of 2026-12-06, all met. vllm at 2,048 responses, (f) on one H200: label's default,
  lockstep with speculation, 1.050 (lockstep alone 0.924; on an H100 in (d), before the batched
  tokenizing, 0.931); vllm at 512 (f): 0.909 default, 0.970 lockstep alone ((d): 0.872 and 0.893).
  hf at 512, (h) on one H100: 1.014 and 1.003 for the default in two runs (0.916 with continuous
  rounds and speculation); before the split admission 0.884 (f, H200) and 0.891 (g, H100).
  What was lost there was not host work: in (g) label spent 0.40 s between its engine calls and
  20.50 s in them, against 18.63 s for the bare replay. It was the hf engine's admission: a
  request's samples started only once all of them fitted in free slots, so each round of second
  stages (512 requests of n=6, 3,072 samples) fitted 170 requests (1,020 samples) into 1,024
  slots and took four generations of 128 tokens where three hold the work, the fourth running 12
  samples; twice in the run. Since 2026-12-06 (between (g) and (h)) the engine starts the
  samples that fit and keeps the rest first in line (each sample draws from its own stream, so
  no token changes). Counted on a CPU with the tiny model (`overhead --quick --responses 512
  --max-tokens 128`; the engine's decode steps, each of which runs every slot, busy or idle),
  before -> after: lockstep 2,048 -> 1,792, lockstep with speculation (the default) 1,792 ->
  1,536, continuous with speculation 1,536 both times, and the bare replay 1,536 both times
  (that CPU's label / bare, which says little of a GPU's: lockstep 0.798 -> 0.935, the default
  0.886 -> 0.966). In (g) the default's two four-generation calls took 6.23 and 5.51 s against
  1.63 s for a call of one generation; in (h) they took 4.95 and 4.24 s, and the default's
  whole run 18.49 s against (g)'s 20.90 s.
  Other changes before: the next probes' prefixes are tokenized in one
  batched call of the Rust tokenizer over all cores (`Engine.continuation_ids_batch`: 10,240
  prefixes of this workload in 0.92 s instead of 1.69 s on 2 CPU cores; a real BPE tokenizer,
  SmolLM2's, 3.2 s instead of 6.3 s for 11,384). And the hf engine keeps its decoder for a call
  whose prompts are shorter than the ones it was sized for (before, each lockstep round whose
  longest request fell in another 128-token step built a new KV cache and captured new CUDA
  graphs, which the bare replay's one call does once); each run prints its decoders built and
  their set-up seconds, and with the hf engine its decode steps.

schedule: overhead's workload (wrong responses of 4-16 steps, k = 8, no rollout ever right) run
through label's own code on a WaveEngine: `--slots` samples side by side, each lasting one
wave, as every rollout of a random-weight model runs to max_tokens; continuous rounds follow
the hf engine's queue. It counts the waves each mode needs against the bare engine's
ceil(samples / slots), a model of the GPU run without its per-step costs, in seconds on a CPU.
Its ratios sat above the GPU's (lockstep 0.857 against 0.693 measured on an H100, lockstep
with speculation 1.000 against 0.874) but ranked the modes as the GPU did, so it is where a
scheduling change is tried before a lease. Part of that gap was the hf engine's admission,
which the model never copied: a request's samples waited for room for all of them. Since the
engine starts those that fit, its decode steps on this workload (CPU, `overhead --quick`) are
the model's waves times max_tokens: lockstep 14 waves and 1,792 steps, lockstep with
speculation 12 and 1,536, and a GPU then measured the default at its bare replay's time
(1.014, (h)), as the model's 12 waves against 12 said. `python bench/bench_label.py schedule` (1,024
slots; continuous modes move by a wave between runs, as verification runs on threads):

  | responses | rounds                 | waves | bare waves | label / bare | continuous, before its gate |
  |----------:|------------------------|------:|-----------:|-------------:|-----------------------------|
  |       512 | lockstep               |    14 |         12 |        0.857 |                             |
  |       512 | lockstep+speculation   |    12 |         12 |        1.000 |                             |
  |       512 | continuous             |    14 |         12 |        0.857 | 14 waves, 0.857             |
  |       512 | continuous+speculation | 13-14 |         12 |  0.857-0.923 | 14 waves, 0.857             |
  |     2,048 | lockstep               |    46 |         45 |        0.978 |                             |
  |     2,048 | lockstep+speculation   |    46 |         45 |        0.978 |                             |
  |     2,048 | continuous             |    45 |         45 |        1.000 | 49 waves, 0.918             |
  |     2,048 | continuous+speculation |    45 |         45 |        1.000 | 50 waves, 0.900             |

  The gate (2026-12-06; on a GPU in (e) and (h), overhead above): continuous rounds hand the engine probes
  only while it has free slots, the searches with the longest chains of probes left first;
  before it, a round's probes queued in the engine in the order they came and long chains
  waited behind short ones. A gate of two batches (one running, one queued) was worse, 15
  to 16 waves at 512. In the model lockstep with speculation (label's default) stays best at 512 and
  continuous rounds lead at 2,048; the GPU has the last word (overhead, above).

fidelity: how well each labeling rule finds a person's first error when rollouts recover. The
step structures of ProcessBench's GSM8K sample (data_samples/processbench-gsm8k; its 207
responses with a human first error, each keeping its number of steps and that error; `--data
FILE` reads other ProcessBench-format JSON or JSONL, `steps` and `label`) are labeled by
`label_rows` itself, with a scripted policy whose rollouts are right with probability p_good
before the human first error and p_bad once the prefix holds it (one seeded stream per sample,
as the real engines draw), k = 8, on a grid of (p_good, p_bad), for every rule (`any-success`,
today's default until 2026-12-06; `--bad-below 0.35`; `drop`) and both `binary` and `mc`.
Prints first-error exactness, the too-early and too-late shares, and the rollouts, with their
ratio to any-success's binary search; `--json OUT` writes one record per (p_good, p_bad, rule,
method). Targets (issue 41): the drop rule's binary search exact >= 0.95 at (0.7, 0.1), >= 0.9
at (0.4, 0.1) and (0.9, 0.3), >= 0.8 at (0.7, 0.3), at most 3x any-success's rollouts; 1.000
at (0.7, 0.0) with no more rollouts than any-success.

With the rates learned from the run's other responses (a first wave of an eighth of the drop
searches, then a prior over (p_good, p_bad) fitted to them for the rest; docs/algorithms.md, "The
drop rule") and a step called the error only on k rollouts from its prefix, `python
bench/bench_label.py fidelity --methods binary` (2026-12-07, `--confidence 0.9 --max-k 32`, the
defaults), drop's binary search, exact at rollouts x any-success's: 1.000 at 0.85, 0.952 at 1.06,
0.942 at 2.35, 0.913 at 2.57, 0.952 at 1.37 for the five rows below in order: every target met.
At 0.95: 1.000 at 0.90, 0.976 at 1.18, 0.966 at 3.02, 0.928 at 3.26, 0.976 at 1.56.

Before the learned prior, `python bench/bench_label.py fidelity`, 2026-12-06 (`--confidence 0.8
--max-k 32`, the defaults then), binary search:

  | p_good, p_bad | any-success exact | bad-below 0.35 exact | drop exact, early, late | drop rollouts / any-success's |
  |---------------|------------------:|---------------------:|------------------------:|------------------------------:|
  | 0.7, 0.0      |             1.000 |                0.986 |   0.981, 0.019, 0.000   |          2,339 / 2,594 = 0.90 |
  | 0.7, 0.1      |             0.420 |                0.908 |   0.961, 0.024, 0.014   |          3,372 / 2,742 = 1.23 |
  | 0.7, 0.3      |             0.111 |                0.527 |   0.841, 0.034, 0.126   |          6,423 / 2,252 = 2.85 |
  | 0.4, 0.1      |             0.401 |                0.623 |   0.831, 0.092, 0.077   |          8,866 / 3,018 = 2.94 |
  | 0.9, 0.3      |             0.111 |                0.536 |   0.913, 0.005, 0.082   |          3,250 / 2,204 = 1.47 |

  (Before, stages of k/4, `--confidence 0.95`, a budget of 6k for each level and two more:
  0.990, 0.990, 0.957, 0.947, 0.986 exact at 1.65, 2.23, 6.05, 6.11, 2.69x.) Met: (0.7, 0.1),
  (0.7, 0.3) and (0.9, 0.3), each within 3x. Not met: (0.4, 0.1) at 0.831 (0.9 wanted; 0.874 at
  4.2x with `--confidence 0.95`) and (0.7, 0.0) at 0.981 (1.000 wanted). What bounds them: a search
  told both true rates still needs 1.8x any-success's rollouts for 0.894 at (0.4, 0.1); learning
  the rates from the response's own rollouts makes each comparison a two-sample one, about twice
  that; and a rule that allows recovery cannot read one right rollout as proof of a good prefix,
  the one thing that makes any-success exact when nothing recovers. docs/algorithms.md, "The drop
  rule", has the whole table, the other settings and what else was tried. Per-step MC (`mc`)
  under the drop rule: 0.990, 0.952, 0.870, 0.884, 0.971 exact at 3.4-5.2x.

  Told the rates (`--rates-known`: the search weighs each place with the policy's p_good and
  p_bad instead of integrating them out; 2026-12-06, ninth session), the same search does far
  better than the figure above said (that one was at --confidence 0.8):

  | p_good, p_bad | --confidence 0.8 | 0.95 | 0.99 | 0.999 |
  |---|---|---|---|---|
  | 0.7, 0.0 | 0.942 at 0.32x | 0.995 at 0.41x | 0.995 at 0.52x | **1.000 at 0.66x** |
  | 0.7, 0.1 | 0.879 at 0.49x | 0.942 at 0.74x | | |
  | 0.7, 0.3 | 0.860 at 1.30x | **0.961 at 2.23x** | | |
  | 0.4, 0.1 | 0.816 at 1.36x | **0.937 at 2.44x** | 0.957 at 3.37x | 0.966 at 4.57x |
  | 0.9, 0.3 | 0.855 at 0.54x | **0.961 at 0.90x** | | |

  So every target is within reach of a search that knows the rates, though no one confidence
  meets them all ((0.7, 0.0) needs 0.999, where (0.4, 0.1) costs 4.6x): the next step is a
  prior over the two rates learned from the rollouts of the run's other responses (a policy's
  recovery rate is much the same across problems), with a high confidence that a probe's budget
  caps. The missing rollouts are the price of not knowing the rates, not of the test.

long: the label regime at the scale users work: a random-weight Qwen2.5-7B (bf16; `--arch`)
labels 256 wrong responses of 8-16 steps and 1,000-3,000 tokens (words of the word-level
tokenizer, one token each), k = 8 rollouts of up to 1,024 tokens, every --eos-every-th token id
ending a rollout (300: about 300 tokens each, a 7B's length on GSM8K; 0: EOS ignored, every
rollout runs to 1,024). Random weights never write a right answer, so each rollout's answer is a
seeded coin (ScriptedAnswers): right with --p-good (0.7) from a prefix before the response's
wrong step, --p-bad (0.0) from one holding it; the seed is the one `Rollouts` gives the prefix,
so every method sees the same answers for the same prefix, and the GPU still generates every
token. Methods, each in labelled responses per GPU-hour, rollouts and tokens per response, peak
GPU memory and first errors as (c)'s:
  (a) `label --method binary` (any-success, as (b) and (c)) on the hf engine (`--engine hf`) and
      on prmtool's vllm engine, in each of `--modes` (default label's own, lockstep+speculation);
  (b) the same search driven naively on bare vLLM: one `generate` per round, all k rollouts of
      every open search's middle step, prefix cache on (vLLM's default);
  (c) Math-Shepherd's per-step MC on bare vLLM: k rollouts after every step, one `generate`,
      on the first --mc-responses (its rate is per response).
Each engine runs in its own process (hf, then vllm: one vLLM start for (a), (b) and (c)), and
every timed run follows a warm-up on other responses of the same lengths. Targets (issue 39):
(a) >= 1.3x (b) and >= 3x (c), first errors as (c)'s on >= 95% of responses, nothing out of
memory on an 80 GB card.

    PYTHONPATH=. python bench/bench_label.py long --engine hf --mc-responses 64 \\
        --modes lockstep+speculation,continuous+speculation --results long.jsonl
    PYTHONPATH=. python bench/bench_label.py long --engine vllm --mc-responses 64 --results long.jsonl

Measured 2026-12-07 on one H100 80GB, one lease, the defaults above: the hf engine's process
as in the first command; then the vllm process alone for (b) and (c) (`--worker vllm --methods
b,c --mc-responses 64`, the lease's time being short; (a) on prmtool's vllm engine not run):

  | method | seconds | responses / GPU-hour | rollouts / response | tokens / response | tok/s | peak GiB |
  |--------|--------:|---------------------:|--------------------:|------------------:|------:|---------:|
  | (a) hf engine, lockstep+speculation (label's default) | 132.1 | 6,975 | 20.2 | 5,883 | 11,398 | 75.1 |
  | (a) hf engine, continuous+speculation                 | 201.3 | 4,579 | 19.4 | 5,468 |  6,956 | 72.1 |
  | (b) naive binary search on bare vLLM                  | 133.9 | 6,883 | 28.5 | 8,280 | 15,831 | 74.0 |
  | (c) per-step MC on bare vLLM, first 64 responses      | 104.5 | 2,205 | 94.3 | 27,264 | 16,699 | 74.0 |

  (a) / (b) = 1.01x: the 1.3x target is not met. (a) / (c) = 3.16x: met. First errors: (b) and (c)
  agree on all 64; (a)'s were not printed by that build, but the coins depend on the seeds alone,
  not on the tokens, so replaying the same searches on the CPU with an engine that returns
  placeholder rollouts gives the GPU's (b) and (c) lists exactly, and (a)'s agree with (c) on all
  64 (and with the injected wrong step on all 256). Peak: the hf engine's is what torch reserved
  (its KV pool takes 90% of the free memory), vLLM's the device's use; nothing ran out of memory.
  Why (a) is no faster than (b): it draws 29% fewer rollouts (staged sampling stops at the first
  right one of two), but at 72% of vLLM's tokens/s. Lockstep rounds end with their longest rollout
  (one in 30 runs to 1,024 tokens), so each of label's engine calls (six in a CPU replay of the
  same searches on 1,024 slots) ends with a tail of a few rows decoding for hundreds of steps; at
  (b)'s tokens/s (a) would take 95 s, 1.41x. Continuous rounds have no such barrier but ran slower
  (201 s), for reasons the run did not show; each (a) run now prints its engine calls' seconds and
  the hf engine's summed GenerationStats (decode steps, prefills, preemptions), the next lease's
  first question.
  After the run, on the CPU (the tiny model, 64 responses of 100-300 tokens, 512 slots, a KV
  cache of 8,192 tokens): speculation and continuous feeding filled the engine's slots past what
  its cache held, so probes sampled ahead took blocks from asked-for samples, which were
  preempted and computed again: lockstep with speculation generated 31,954 tokens (125
  preemptions) where lockstep alone generated 22,639 (32), continuous with speculation 39,809
  (153). The hf engine's sampling_capacity now counts the samples its cache held when it last
  ran out: 22,639 (32) and 23,810 (48), the labels unchanged, and nothing changes where memory
  is ample. Whether the H100 run was bound by memory, the next run's preemption count will say.
  Two more changes since (2026-12-07, fifteenth session; CPU only, no lease came): between calls
  the hf engine's capacity is the most a call may have (its max_batch_size, or what memory held),
  no longer the last decoder's slots. Continuous rounds hand a call only that many samples and
  the call sizes its decoder by what it is first handed, so the warm-up's few samples capped the
  timed run: on the CPU (`long --quick --responses 64 --max-tokens 128 --eos-every 40`) the
  continuous run decoded on 128 of its 1,024 slots (820 decode steps), now on 512 (697). It also
  lets lockstep with speculation fill a whole call from the first round (768 -> 384 decode steps,
  but 53,689 -> 89,265 tokens sampled, 1,044 of 1,754 rollouts sampled ahead never asked for): at
  0.5B extra rows cost little, at 7B nearly their share, which only a GPU run can weigh. And each
  timed run starts with the engine's prefix cache emptied (`reset_prefix_cache`): before, a run
  found the prompts of the runs before it (other modes, other methods) still cached.
  Then one run on one H100 80GB (another machine; the last minutes of that session's device
  time), with both changes: `long --engine hf --mc-responses 64 --modes continuous` (continuous
  rounds without speculation, which draw the fewest rollouts): 157.6 s, **5,848** labelled
  responses / GPU-hour, 17.9 rollouts and 5,177 tokens a response (as the CPU replay said),
  8,409 tokens/s, 77.2 GiB peak, no preemptions, first errors the injected wrong step on 256 of
  256 (so (c)'s on all 64). Slower than the default's 132.1 s and the naive loop's 133.9 s of the
  lease before, for want of parallel work: one probe per search in flight leaves 256 searches
  about 281 samples decoding a step on average (1,553,656 rows over 5,524 steps; at most 525 of
  the 1,024 slots), where a 7B step costs about as much at 512 rows as at 281, and the naive loop
  hands vLLM all k rollouts of every open search at once (2,048 samples a round). At this size
  label needs more work side by side than its searches ask for, which is what speculation adds;
  the next lease runs lockstep+speculation and continuous+speculation after the capacity change,
  which lets speculation fill a whole call from the first round.
  What did it instead: under any-success only whether some rollout is right matters, so in
  continuous rounds a probe's k rollouts now go out as k requests, each verified as it ends, and
  the first right one settles the probe and stops the rest (`run_searches`, `Probe.until_right`):
  a good prefix waits for its quickest right rollout, not the slowest of a stage, and the labels
  are the same. On the CPU replay (`long --quick --responses 64 --max-tokens 128 --eos-every 40
  --modes continuous`) decode steps went from 697 to 354 (the naive loop's: 512). Then one H100
  80GB, one lease (2026-12-07, sixteenth session), `long --engine hf --modes
  continuous,...` and `long --engine vllm --methods a,b --modes continuous`, side by side:

  | method | seconds | responses / GPU-hour | rollouts / response | tokens / response | tok/s | peak GiB |
  |--------|--------:|---------------------:|--------------------:|------------------:|------:|---------:|
  | (a) vllm engine, continuous (first right rollout settles) |  94.6 | **9,746** | 15.9 | 3,923 | 10,621 | 74.0 |
  | (a) hf engine, continuous (first right rollout settles)   | 194.3 |     4,743 | 16.0 | 3,975 |  5,237 | 73.0 |
  | (b) naive binary search on bare vLLM                       | 160.0 |     5,760 | 28.5 | 8,324 | 13,320 | 74.0 |

  (a) on the vllm engine / (b) = **1.69x**: the 1.3x target is met, on prmtool's vllm engine.
  Against (c) of the earlier lease (2,205 an hour, another H100): 4.4x. First errors: the injected
  wrong step on all 256 responses for all three (and so (c)'s on its 64, which depend on the
  seeds alone). (b)'s four engine calls took 47.2, 44.7, 42.5 and 24.7 s: each round waits for
  the slowest of its 2,048 rollouts. The tokens count finished rollouts only (a stopped
  rollout's tokens are not returned by either engine): the hf engine generated 1,189,943 tokens
  in all where label counted 1,017,512. The hf engine lost for another reason than the search:
  3,147 decode steps (5,524 before) took 61.7 ms each on average (28.5 ms before), as 7,407
  single-rollout requests ran their own prefills (524 prefill passes, 397,249 tokens computed,
  7.1M cached ones read), each pass stopping every sample's decoding meanwhile. Since then the
  engine admits requests whose prompt another admitted one is prefilling as that one's twins:
  they sample from its prefill, as a request's own samples do (`GenerationStats.twin_requests`;
  CPU replay above: 1,808 prefilled prompts -> 226, 18,712 prefill tokens -> 5,573); not yet
  measured on a GPU (that lease's device time was spent). lockstep+speculation and
  continuous+speculation on the hf engine were stopped unmeasured to leave time for the vLLM runs.
  Where that run's prefill time went, replayed on the CPU at the GPU run's lengths (2026-12-07,
  eighteenth session; no GPU was lent): `long --quick --engine hf --responses 64 --max-tokens 1024
  --eos-every 300 --response-words 1000,3000 --modes continuous --methods a` (the tiny model: the
  engine's counts, not its time). Before twins (0a55074's parent) the continuous run's 267
  prefill passes computed 397,227 positions for 95,680 prompt tokens: a pass is right-padded to
  its longest uncached prompt, and a probe's single-rollout requests, each a prompt of its own,
  sat beside a new response's whole prompt, so 4.2 positions were computed for each token (and
  1.67M cached positions read). With twins: 159 passes, 84,229 positions for 82,254 tokens
  (138,496 cached read), and the same 3,662 decode steps. The GPU run's 524 passes would then have
  computed about 1.6M positions, tens of seconds at 7B, which is about what its 61.7 ms a step
  has beyond a decode step's cost; the next GPU run says whether the hf engine now keeps up.
  `continuous+speculation` on the same replay: 2,066 decode steps (of 270 rows on average, 115
  without speculation) and 465,150 tokens sampled where continuous alone sampled 311,573.

judge: `label --method judge` (one engine call for every row: the critic's prompt is the problem
and the numbered steps) on ProcessBench's GSM8K sample repeated to --responses rows. Measured
2026-12-04 on one H200 with the hf engine and a random-weight Qwen2.5-0.5B (bf16; it never stops
early, so every critique runs to --max-tokens; prompts are the sample's words, about 185 words of
steps per row, each word one token of the bench's word-level tokenizer):

  | rows  | critiques x max_tokens | seconds | rows/s | generated tokens/s |
  |------:|------------------------|--------:|-------:|-------------------:|
  | 2,048 | 1 x 512                |   23.18 |   88.4 |             45,240 |
  | 1,024 | 4 x 1,024              |   62.70 |   16.3 |             66,893 |

  (`python bench/bench_label.py judge --responses 2048 --max-tokens 512`; `... --responses 1024
  --max-tokens 1024 --judge-samples 4`.) A real critic stops at its verdict, so these are
  floors for a 0.5B critic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for bench_generate's model builders

from prmtool.core.options import default_workers  # noqa: E402
from prmtool.engines import Completion, Engine, SamplingRequest  # noqa: E402
from prmtool.methods.labeling import label_rows  # noqa: E402
from prmtool.methods.rollouts import Probe, Rollouts, RolloutSettings  # noqa: E402
from prmtool.methods.verification import verify_responses  # noqa: E402


def wrong_responses(
    count: int,
    min_steps: int,
    max_steps: int,
    seed: int = 0,
    words_per_step: int = 8,
    response_words: tuple[int, int] | None = None,
) -> pl.DataFrame:
    """`count` wrong responses of min_steps..max_steps steps of random words, one marked WRONG;
    `response_words` (fewest, most): each response's length drawn from it instead (steps then
    share it evenly), as a word is a token of bench_generate's tokenizer."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        n = rng.randint(min_steps, max_steps)
        if response_words is not None:
            words_per_step = rng.randint(*response_words) // n
        wrong_at = rng.randrange(n)
        steps = [
            " ".join(f"t{rng.randrange(100, 5000)}" for _ in range(words_per_step))
            + (" WRONG" if i == wrong_at else "")
            for i in range(n)
        ]
        problem = " ".join(f"t{rng.randrange(100, 5000)}" for _ in range(16)) + f" P{index // 4}"
        rows.append(
            {
                "problem_id": f"p{index // 4}",
                "problem": problem,
                "reference_answer": "42",
                "response_id": f"r{index}",
                "steps": steps,
                "correct": False,
                "true_first_error": wrong_at,
            }
        )
    return pl.DataFrame(rows)


class ScriptedPolicy(Engine):
    """Rollouts right with probability p unless the prefix holds WRONG; shorter from later prefixes."""

    def __init__(self, p: float, tokens_per_remaining_step: int = 40):
        self.tokenizer, self.p, self.per_step = None, p, tokens_per_remaining_step
        self.steps_of: dict[str, int] = {}

    def chat_prompt_ids(self, problem, system_prompt=None, prompt_template=None):
        return [ord(c) for c in problem] + [0]

    def continuation_ids(self, prompt_ids, partial_answer):
        return list(prompt_ids) + [ord(c) for c in partial_answer]

    def sample(self, requests, on_progress=None):
        results = []
        for request in requests:
            end = request.prompt_ids.index(0)
            prefix = "".join(map(chr, request.prompt_ids[end + 1 :]))
            done_steps = prefix.count("\n\n")
            remaining = max(1, 12 - done_steps)
            rng = random.Random(request.seed)
            samples = []
            for _ in range(request.n):
                right = "WRONG" not in prefix and rng.random() < self.p
                tokens = self.per_step * remaining
                samples.append(Completion(f"\\boxed{{{42 if right else 41}}}", [], tokens, "stop"))
            results.append(samples)
        return results

    def score(self, requests):
        raise NotImplementedError


def economy(args) -> None:
    frame = wrong_responses(args.responses, 3, 12)
    settings = RolloutSettings(workers=2)
    # Today's rule, any-success: the policy never recovers, and the ratio is the searches' own.
    binary = label_rows(frame, ScriptedPolicy(args.p), "binary", k=args.k, settings=settings, rule="any-success")
    per_step = label_rows(frame, ScriptedPolicy(args.p), "mc", k=args.k, settings=settings, rule="any-success")
    agreement = (binary["first_error"] == per_step["first_error"]).mean()
    truth = (binary["first_error"] == frame["true_first_error"]).mean()
    ratio = binary["label_tokens"].sum() / per_step["label_tokens"].sum()
    print(f"{args.responses} wrong responses of 3-12 steps, k={args.k}, p={args.p}")
    print(f"mc:     {per_step['label_rollouts'].sum():,} rollouts, {per_step['label_tokens'].sum():,} tokens")
    print(f"binary: {binary['label_rollouts'].sum():,} rollouts, {binary['label_tokens'].sum():,} tokens")
    print(f"binary tokens / mc tokens: {ratio:.1%} (target <= 35%)")
    print(
        f"first-error agreement binary vs mc: {agreement:.3f} (target >= 0.95); binary vs injected truth: {truth:.3f}"
    )


# label's ways of running its searches: rounds, and whether idle slots sample ahead
MODES = {
    "lockstep": ("lockstep", False),
    "lockstep+speculation": ("lockstep", True),
    "continuous": ("continuous", False),
    "continuous+speculation": ("continuous", True),
}


def chosen_modes(text: str) -> list[str]:
    modes = text.split(",")
    if unknown := [mode for mode in modes if mode not in MODES]:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (expected some of {', '.join(MODES)})")
    return modes


class WaveEngine(ScriptedPolicy):
    """overhead's GPU workload as a schedule, on CPU: `slots` samples run side by side, each for
    one wave (a random-weight model's rollout always runs to max_tokens), and no rollout is ever
    right. Lockstep rounds take ceil(samples / slots) waves each; continuous ones follow the hf
    engine's order (a queue, follow-ups to its front; a request handed back once all its samples
    ran). The bare engine needs ceil(all samples / slots) waves."""

    def __init__(self, slots: int):
        super().__init__(p=0.0)
        self.slots, self.waves = slots, 0

    def sampling_capacity(self) -> int:
        return self.slots

    def sample(self, requests, on_progress=None):
        self.waves += -(-sum(request.n for request in requests) // self.slots)
        return super().sample(requests)

    def sample_continuously(self, requests, on_done, on_progress=None, longest=None):
        from prmtool.engines import Cancel

        queue = [[key, request, request.n] for key, request in enumerate(requests)]  # samples not started
        running: dict[int, tuple] = {}  # key -> (request, samples still running)
        next_key = len(queue)
        while queue or running:
            free = self.slots
            for entry in queue:
                take = min(free, entry[2])
                entry[2], free = entry[2] - take, free - take
                running[entry[0]] = entry[1]
                if not free:
                    break
            self.waves += 1
            started = {entry[0] for entry in queue if entry[2] == 0}
            queue = [entry for entry in queue if entry[2] > 0]
            waiting = {entry[0] for entry in queue}
            finished = [(key, super(WaveEngine, self).sample([running.pop(key)])[0]) for key in started - waiting]
            answer = on_done(finished)
            for _ in range(50):  # verification is fast next to a wave: collect what it makes ready
                time.sleep(0.002)
                more = on_done([])
                answer += more
                if not more and len(running) + len(queue) > 0:
                    break
            cancelled = {item.key for item in answer if isinstance(item, Cancel)}
            queue = [entry for entry in queue if entry[0] not in cancelled]
            new = [item for item in answer if not isinstance(item, Cancel)]
            queue[:0] = [[next_key + index, request, request.n] for index, request in enumerate(new)]
            next_key += len(new)


def schedule(args) -> None:
    """The waves each mode needs on overhead's workload (WaveEngine), against the bare engine's."""
    settings = RolloutSettings(max_tokens=args.max_tokens, temperature=1.0, workers=args.workers)
    print("| responses | rounds | waves | bare waves | label / bare |")
    for responses in [int(count) for count in str(args.responses).split(",")]:
        frame = wrong_responses(responses, 4, 16, words_per_step=40)
        for name in chosen_modes(args.modes):
            rounds, speculate = MODES[name]
            engine = WaveEngine(args.slots)
            labeled = label_rows(
                frame, engine, "binary", k=args.k, settings=settings, continuous=rounds == "continuous",
                speculate=speculate, rule="any-success",
            )  # fmt: skip
            bare = -(-int(labeled["label_rollouts"].sum()) // args.slots)
            print(f"| {responses} | {name} | {engine.waves} | {bare} | {bare / engine.waves:.3f} |", flush=True)


class PassThroughEngine(Engine):
    """An engine that hands every call to `inner`: the wrappers below change sampling alone."""

    def __init__(self, inner: Engine):
        self.inner, self.tokenizer = inner, inner.tokenizer

    def chat_prompt_ids(self, *args, **kwargs):
        return self.inner.chat_prompt_ids(*args, **kwargs)

    def continuation_ids(self, *args, **kwargs):
        return self.inner.continuation_ids(*args, **kwargs)

    def continuation_ids_batch(self, *args, **kwargs):
        return self.inner.continuation_ids_batch(*args, **kwargs)

    def sample(self, requests, on_progress=None):
        return self.inner.sample(requests, on_progress)

    def sampling_capacity(self):
        return self.inner.sampling_capacity()

    def score(self, requests):
        return self.inner.score(requests)


class RecordingEngine(PassThroughEngine):
    """Passes every call through to the real engine and keeps the requests, follow-ups included,
    and the hf engine's decode steps (each runs every slot, busy or idle: the GPU time's unit)."""

    def __init__(self, inner: Engine):
        super().__init__(inner)
        self.requests, self.calls, self.decode_steps = [], 0, 0

    def _count_steps(self) -> None:
        stats = getattr(self.inner, "last_stats", None)
        self.decode_steps += stats.decode_steps if stats is not None else 0

    def sample(self, requests, on_progress=None):
        self.calls += 1
        self.requests.extend(requests)
        results = self.inner.sample(requests, on_progress)
        self._count_steps()
        return results

    def sample_continuously(self, requests, on_done, on_progress=None, longest=0):
        self.calls += 1
        self.requests.extend(requests)

        def recorded(finished):
            answer = on_done(finished)
            self.requests.extend(item for item in answer if isinstance(item, SamplingRequest))
            return answer

        self.inner.sample_continuously(requests, recorded, on_progress, longest)
        self._count_steps()


def timed_method(cls, name: str) -> list[float]:
    """Wrap `cls.name` to record each call's wall time, in a list the caller clears between runs."""
    seconds: list[float] = []
    method = getattr(cls, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(cls, name, timed)
    return seconds


def setup_of(engine) -> tuple[int, float] | None:
    """(decoders built, seconds building them) so far, for the hf engine; None for vLLM."""
    if not hasattr(engine, "setup_seconds"):
        return None
    return engine.decoders_built, engine.setup_seconds()


def print_setup(engine, before: tuple[int, float] | None) -> None:
    after = setup_of(engine)
    if before is not None and after is not None:
        built, seconds = after[0] - before[0], after[1] - before[1]
        print(f"  engine set-up: {built} decoders built, {seconds:.2f} s (caches, CUDA graphs)")


def overhead(args) -> None:
    import torch
    from bench_generate import build_model, build_tokenizer

    from prmtool.engines import SamplingRequest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.quick, device)
    tokenizer = build_tokenizer(model.config.vocab_size)
    if args.engine == "vllm":
        import tempfile

        import vllm

        from prmtool.engines.vllm import VLLMEngine, options_from_environment, sampling_params_kwargs, tokens_prompt

        folder = tempfile.mkdtemp(prefix="bench-label-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        options = {"max_num_seqs": args.slots, "gpu_memory_utilization": 0.6, **options_from_environment()}
        print(f"vllm options: {options}", flush=True)
        engine = VLLMEngine(folder, ignore_eos=True, **options)
        engine.tokenizer = tokenizer  # the word-level tokenizer as built (vLLM's reload encodes nothing)

        def bare(requests):  # vllm.LLM.generate itself, not prmtool's engine
            params = [vllm.SamplingParams(**sampling_params_kwargs(r, ignore_eos=True)) for r in requests]
            outputs = engine.llm.generate([tokens_prompt(r.prompt_ids) for r in requests], params, use_tqdm=False)
            return sum(len(o.token_ids) for out in outputs for o in out.outputs)

        def cold_start():  # every run starts with vLLM's prefix cache empty: none reuses another's prefixes
            engine.llm.reset_prefix_cache()
    else:
        from prmtool.engines.hf import HFEngine

        engine = HFEngine(model, tokenizer, ignore_eos=True, max_batch_size=args.slots)

        def bare(requests):
            return sum(c.num_tokens for samples in engine.sample(requests) for c in samples)

        def cold_start():  # the hf engine caches no prefixes between calls (only its decoder's buffers)
            pass

    # warm-up: pools, graph capture, compilation, the verifier's worker processes
    verify_responses(["\\boxed{1}"] * 4, ["1"] * 4, workers=args.workers)
    verifying = timed_method(Rollouts, "results_of")  # the rollouts' verification passes
    preparing = timed_method(Rollouts, "requests_for")  # prompts of the next probes (tokenizing)
    engine_calls = timed_method(RecordingEngine, "sample")  # label's lockstep calls, not the bare replay's
    bare([SamplingRequest([5] * 64, n=8, max_tokens=32, seed=s) for s in range(64)])
    settings = RolloutSettings(max_tokens=args.max_tokens, temperature=1.0, workers=args.workers)
    # The work label needs is what it asks without speculation: the bare engine samples exactly
    # those requests (speculation adds requests, some unused; the labels are the same).
    modes = chosen_modes(args.modes)
    if MODES[modes[0]][1]:
        raise SystemExit("--modes: the first mode must be one without speculation (it records the work)")
    table = []  # (responses, mode, label s, bare s, ratio)
    for responses in [int(count) for count in str(args.responses).split(",")]:
        frame = wrong_responses(responses, 4, 16, words_per_step=40)
        print(
            f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; engine {args.engine}; "
            f"{responses} wrong responses of 4-16 steps, k={args.k}, max_tokens={args.max_tokens}",
            flush=True,
        )
        bare_seconds = None
        for name in modes:
            rounds, speculate = MODES[name]
            recorder = RecordingEngine(engine)
            verifying.clear(), preparing.clear(), engine_calls.clear()
            if device.type == "cuda":
                torch.cuda.synchronize()
            counts: dict[str, int] = {}
            cold_start()
            setup_before = setup_of(engine)
            started = time.perf_counter()
            labeled = label_rows(
                frame,
                recorder,
                "binary",
                k=args.k,
                settings=settings,
                continuous=rounds == "continuous",
                speculate=speculate,
                counts=counts,
                rule="any-success",  # the workload measured below (no rollout of random weights is right)
            )
            label_seconds = time.perf_counter() - started
            print(
                f"label, {name} ({recorder.calls} engine calls): {labeled['label_rollouts'].sum():,} rollouts used "
                f"in {len(recorder.requests):,} requests sent, {labeled['label_tokens'].sum():,} tokens, "
                f"{label_seconds:.2f} s ({labeled['label_tokens'].sum() / label_seconds:,.0f} tok/s)"
            )
            print_setup(engine, setup_before)
            if recorder.decode_steps:
                print(f"  decode steps: {recorder.decode_steps:,}")
            if rounds == "lockstep":  # where label's time goes: in the engine's calls, or between them
                inside = sum(engine_calls)
                print(
                    f"  engine calls {inside:.2f} s ({', '.join(f'{s:.2f}' for s in engine_calls)}), "
                    f"label's work between them {label_seconds - inside:.2f} s"
                )
            if speculate:
                print(
                    f"  speculation: {counts.get('speculative_rollouts', 0):,} rollouts sampled ahead, "
                    f"{counts.get('speculative_rollouts_unused', 0):,} of them never asked for "
                    f"({counts.get('speculative_tokens_unused', 0):,} tokens of those that finished)"
                )
            if bare_seconds is None:
                first_labels = labeled
                cold_start()
                setup_before = setup_of(engine)
                started = time.perf_counter()
                tokens = bare(recorder.requests)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                bare_seconds = time.perf_counter() - started
                print(f"  bare engine, the same requests in one call: {tokens:,} tokens, {bare_seconds:.2f} s "
                      f"({tokens / bare_seconds:,.0f} tok/s)")  # fmt: skip
                print_setup(engine, setup_before)
                if getattr(engine, "last_stats", None) is not None:
                    print(f"  bare engine's decode steps: {engine.last_stats.decode_steps:,}")
            else:
                same = labeled.select("step_mc", "first_error").equals(first_labels.select("step_mc", "first_error"))
                print(f"  labels as in {modes[0]}: {same}")
            where = "blocking the engine" if rounds == "lockstep" else "on worker threads, beside the engine"
            print(f"  verification: {sum(verifying):.2f} s in {len(verifying)} passes ({where})")
            print(f"  preparing requests (tokenizing prefixes, on the engine's thread): {sum(preparing):.2f} s")
            print(f"  label throughput / bare engine throughput: {bare_seconds / label_seconds:.3f}", flush=True)
            table.append((responses, name, label_seconds, bare_seconds, bare_seconds / label_seconds))
    print("\n| engine, responses, max_tokens | rounds | label s | bare s | label / bare |")
    for responses, name, label_seconds, bare_seconds, ratio in table:
        row = f"{args.engine}, {responses}, {args.max_tokens}"
        print(f"| {row} | {name} | {label_seconds:.2f} | {bare_seconds:.2f} | {ratio:.3f} |")
    engine.close()


class BareEngine(Engine):
    """An engine whose `sample` is a bare `generate` (vLLM's own, or the hf engine's sample on
    the CPU smoke run): what the naive drivers of (b) and (c) call, one call per round."""

    def __init__(self, tokenizer, generate, stats_from=None):
        self.tokenizer, self.generate, self.calls = tokenizer, generate, 0
        self.stats_from = stats_from  # the hf engine behind `generate`: its decode steps get printed

    @property
    def last_stats(self):
        return getattr(self.stats_from, "last_stats", None)

    def sample(self, requests, on_progress=None):
        self.calls += 1
        return self.generate(requests)

    def score(self, requests):
        raise NotImplementedError


def naive_binary_search(frame: pl.DataFrame, engine: Engine, k: int, settings: RolloutSettings) -> list[int]:
    """(b): first-error binary search with one engine call per round over every open search, no
    staging, no speculation, no continuous rounds: the loop a researcher writes over vLLM.
    A wrong response's last prefix has MC 0, so the first error lies in [0, steps - 1]."""
    steps = frame["steps"].to_list()
    rollouts = Rollouts(engine, frame["problem"].to_list(), steps, frame["reference_answer"].to_list(),
                        frame["response_id"].to_list(), "\n\n", settings)  # fmt: skip
    low, high = [0] * len(steps), [len(s) - 1 for s in steps]
    while True:
        open_rows = [row for row in range(len(steps)) if low[row] < high[row]]
        if not open_rows:
            return low
        middles = {row: (low[row] + high[row]) // 2 for row in open_rows}
        for result in rollouts.run([Probe(row, middles[row] + 1, k) for row in open_rows]):
            row = result.probe.row
            if result.correct > 0:  # MC(through the middle step) > 0: the error is to its right
                low[row] = middles[row] + 1
            else:
                high[row] = middles[row]


def per_step_mc(frame: pl.DataFrame, engine: Engine, k: int, settings: RolloutSettings) -> list[int]:
    """(c): Math-Shepherd: k rollouts after every step, one engine call; a step's label is bad
    when none of its rollouts is right, and the first bad step is the first error."""
    steps = frame["steps"].to_list()
    rollouts = Rollouts(engine, frame["problem"].to_list(), steps, frame["reference_answer"].to_list(),
                        frame["response_id"].to_list(), "\n\n", settings)  # fmt: skip
    probes = [Probe(row, i + 1, k) for row in range(len(steps)) for i in range(len(steps[row]))]
    first_error = [len(s) - 1 for s in steps]
    for result in reversed(rollouts.run(probes)):
        if result.correct == 0:
            first_error[result.probe.row] = result.probe.prefix_steps - 1
    return first_error


class ScriptedAnswers(PassThroughEngine):
    """The model's real rollouts, each ending in an answer a seeded coin picks: right with
    probability p_good from a prefix without the response's WRONG step, p_bad from one holding
    it. Random weights never write a right answer, so without this every search runs to full
    depth and staged sampling always draws all k; with it the searches do what a policy that
    solves the problem from a sound prefix p_good of the time makes them do, while the GPU
    generates every token. The coin is seeded by the request's seed and the sample's number,
    which `Rollouts` fixes by the response and the prefix, so (a), (b) and (c) see the same
    answers for the same prefix. Counts the rollouts and tokens generated through it, each
    engine call's seconds and, from the hf engine, its GenerationStats over the calls."""

    def __init__(self, inner: Engine, wrong_id: int, p_good: float, p_bad: float):
        super().__init__(inner)
        self.wrong_id, self.p_good, self.p_bad = wrong_id, p_good, p_bad
        self.clear()

    def clear(self) -> None:
        self.rollouts = self.tokens = 0
        self.call_seconds: list[float] = []
        self.engine_stats: dict[str, int] = {}

    @contextmanager
    def _call(self):
        started = time.perf_counter()
        yield
        self.call_seconds.append(time.perf_counter() - started)
        stats = getattr(self.inner, "last_stats", None)
        for field in dataclasses.fields(stats) if stats is not None else []:
            value, before = getattr(stats, field.name), self.engine_stats.get(field.name, 0)
            if type(value) is int:  # counts are summed over the calls, sizes and peaks the largest
                sized = field.name in SIZES or field.name.startswith("peak_")
                self.engine_stats[field.name] = max(before, value) if sized else before + value

    def _answered(self, request: SamplingRequest, completions: list[Completion]) -> list[Completion]:
        p = self.p_bad if self.wrong_id in request.prompt_ids else self.p_good
        self.rollouts += len(completions)
        self.tokens += sum(completion.num_tokens for completion in completions)
        answered = []
        for number, completion in enumerate(completions, start=request.first_sample):
            right = random.Random(f"{request.seed}:{number}").random() < p
            answered.append(dataclasses.replace(completion, text=f"{completion.text} \\boxed{{{42 if right else 41}}}"))
        return answered

    def sample(self, requests, on_progress=None):
        with self._call():
            results = self.inner.sample(requests, on_progress)
        return [self._answered(request, completions) for request, completions in zip(requests, results)]

    def sample_continuously(self, requests, on_done, on_progress=None, longest=0):
        keyed = list(requests)  # keys count up in the order requests are given, follow-ups included

        def answered(finished):
            answer = on_done([(key, self._answered(keyed[key], completions)) for key, completions in finished])
            keyed.extend(item for item in answer if isinstance(item, SamplingRequest))
            return answer

        with self._call():
            self.inner.sample_continuously(requests, answered, on_progress, longest)


# GenerationStats fields that are sizes, not counts of work
SIZES = ("num_slots", "cache_length", "kv_blocks", "samples_when_full")


def marked_tokenizer(vocab_size: int):
    """bench_generate's word-level tokenizer with its last id spelled WRONG, so a prompt's ids
    show whether its prefix holds a response's wrong step."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size - 1)} | {"WRONG": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def long_prefixes(args) -> None:
    """The label regime at 7B: long step prefixes, k rollouts of up to --max-tokens, ended by
    one id in --eos-every (0: none, every rollout runs to --max-tokens) and answered by
    ScriptedAnswers. One engine per process: `--engine hf` runs (a) on the hf engine; `--engine
    vllm` runs (a) on prmtool's vllm engine, then (b) and (c) on bare vLLM (prefix cache on), on
    one vLLM instance."""
    import subprocess

    if args.worker is None:
        engines = [e for e in args.engine.split(",") if e]
        rows = []
        for engine in engines:
            command = [sys.executable, __file__, "long", "--worker", engine, "--responses", str(args.responses),
                       "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--arch", args.arch,
                       "--workers", str(args.workers), "--mc-responses", str(args.mc_responses),
                       "--p-good", str(args.p_good), "--p-bad", str(args.p_bad),
                       "--eos-every", str(args.eos_every), "--modes", args.modes,
                       "--methods", args.methods,
                       "--response-words", ",".join(map(str, args.response_words))]  # fmt: skip
            command += ["--quick"] if args.quick else []
            print(f"$ {' '.join(command)}", flush=True)
            # The worker builds the model on the GPU before vLLM starts its engine process, which
            # then cannot fork (bench_generate's side_by_side says so too): vLLM spawns.
            environment = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
            # the worker's lines are shown as they come (a run takes minutes); its RESULT lines are kept
            with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment) as worker:
                for line in worker.stdout:
                    if line.startswith("RESULT "):
                        rows.append(json.loads(line[7:]))
                    else:
                        print(line, end="", flush=True)
            if worker.returncode != 0:
                print(f"  {engine}: failed (exit {worker.returncode})", flush=True)
        if args.results:  # runs of other invocations (the hf and vllm processes in two leases) join the table
            results = Path(args.results)
            earlier = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
            with results.open("a") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            rows = earlier + rows
        reference = next((row for row in rows if row["method"].startswith("(c)")), None)
        ends = f"1 id in {args.eos_every} ends a rollout" if args.eos_every else "EOS ignored"
        print(f"\n{args.responses} responses, {args.arch}, k={args.k}, max_tokens={args.max_tokens}, {ends}, "
              f"rollouts right with p={args.p_good} before the wrong step and {args.p_bad} after it"
              f" ((c): the first {args.mc_responses})")  # fmt: skip
        print("| method | responses | seconds | labelled responses / GPU-hour | rollouts / response | "
              "tokens / response | tok/s | peak GiB | first errors as (c) |")  # fmt: skip
        for row in rows:
            # agreement over the responses (c) labelled: the first --mc-responses
            agree = "" if reference is None else f"{agreement(row['first_error'], reference['first_error']):.3f}"
            count = len(row["first_error"])
            print(f"| {row['method']} | {count} | {row['seconds']:.1f} | {count / row['seconds'] * 3600:,.0f} | "
                  f"{row['rollouts'] / count:,.1f} | {row['tokens'] / count:,.0f} | "
                  f"{row['tokens'] / row['seconds']:,.0f} | {row['peak_gib']:.1f} | {agree} |")  # fmt: skip
        return

    import torch
    from bench_generate import build_model

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    model = build_model(args.quick, device, args.arch)
    vocab = model.config.vocab_size
    tokenizer = marked_tokenizer(vocab)
    ignore_eos = args.eos_every == 0
    if not ignore_eos:  # the generation config's EOS ids: both engines stop at them (vLLM reads the saved folder's)
        model.generation_config.eos_token_id = list(range(args.eos_every - 1, vocab - 1, args.eos_every))
    frame = wrong_responses(args.responses, 8, 16, response_words=args.response_words)
    warmup = wrong_responses(max(4, args.responses // 16), 8, 16, seed=1, response_words=args.response_words)
    settings = RolloutSettings(max_tokens=args.max_tokens, temperature=1.0, workers=args.workers)
    verify_responses(["\\boxed{1}"] * 4, ["1"] * 4, workers=args.workers)

    def answered(engine: Engine) -> ScriptedAnswers:
        return ScriptedAnswers(engine, vocab - 1, args.p_good, args.p_bad)

    def timed(method, engine: ScriptedAnswers, run, rows: pl.DataFrame = frame) -> None:
        run(warmup.head(max(1, warmup.height * rows.height // frame.height)))  # other responses, same lengths
        engine.clear()
        cold_start()  # no run finds the prefixes of an earlier run (another mode, another method) cached
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        hf_engine = getattr(engine.inner, "stats_from", None) or engine.inner  # the bare replays' too
        setup_before = setup_of(hf_engine)
        started = time.perf_counter()
        first_error = run(rows)
        seconds = time.perf_counter() - started
        if device.type == "cuda" and args.worker == "hf":
            peak = torch.cuda.max_memory_reserved() / 2**30
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            peak = (total - free) / 2**30  # vLLM's engine runs in a process of its own: the device's use
        else:
            peak = float("nan")
        print(f"  {method}: {seconds:.1f} s, {engine.rollouts:,} rollouts, {engine.tokens:,} tokens", flush=True)
        calls = engine.call_seconds
        print(f"    {len(calls)} engine calls, {sum(calls):.1f} s ({', '.join(f'{s:.1f}' for s in calls)}), "
              f"label's work between them {seconds - sum(calls):.1f} s", flush=True)  # fmt: skip
        if engine.engine_stats:  # where the hf engine's time went: steps, prefills, recomputed samples
            print("    hf engine: " + ", ".join(f"{name} {value:,}" for name, value in engine.engine_stats.items()))
        print_setup(hf_engine, setup_before)
        if method.startswith("(a)") and "speculative_rollouts" in label_counts:
            print(f"    speculation: {label_counts['speculative_rollouts']:,} rollouts sampled ahead, "
                  f"{label_counts['speculative_rollouts_unused']:,} never asked for "
                  f"({label_counts.get('speculative_tokens_unused', 0):,} tokens of those that finished)")  # fmt: skip
        row = dict(method=method, seconds=seconds, peak_gib=peak, first_error=[int(e) for e in first_error],
                   rollouts=engine.rollouts, tokens=engine.tokens)  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)

    label_counts: dict[str, int] = {}  # the last label run's summary counts (speculation's cost)
    cold_start = None  # the engine's prefix cache reset: set below, before the first timed run

    def label(engine: ScriptedAnswers, name: str):
        rounds, speculate = MODES[name]

        def run(rows: pl.DataFrame) -> list[int]:
            label_counts.clear()
            # the rule (b) and (c) apply: a prefix is bad when none of its k rollouts is right
            return label_rows(
                rows, engine, "binary", k=args.k, settings=settings, rule="any-success",
                continuous=rounds == "continuous", speculate=speculate, counts=label_counts,
            )["first_error"].to_list()  # fmt: skip

        return run

    if args.worker == "hf":
        from prmtool.engines.hf import HFEngine

        engine = answered(HFEngine(model, tokenizer, ignore_eos=ignore_eos, max_batch_size=args.slots))
        cold_start = engine.inner.reset_prefix_cache
        for name in chosen_modes(args.modes):
            timed(f"(a) prmtool label --method binary, hf engine, {name}", engine, label(engine, name))
        # no vLLM on the CPU: (b) and (c) drive the hf engine's own sample, for the smoke run
        bare = answered(BareEngine(tokenizer, engine.inner.sample, stats_from=engine.inner))
        if args.quick and "b" in args.methods:
            timed("(b) naive binary search, one sample() per round (hf, smoke)", bare,
                  lambda rows: naive_binary_search(rows, bare, args.k, settings))  # fmt: skip
        if args.quick and "c" in args.methods:
            timed("(c) per-step MC, one sample() (hf, smoke)", bare,
                  lambda rows: per_step_mc(rows, bare, args.k, settings), frame.head(args.mc_responses))  # fmt: skip
        return
    import tempfile

    import vllm

    from prmtool.engines.vllm import VLLMEngine, sampling_params_kwargs, tokens_prompt

    folder = tempfile.mkdtemp(prefix="bench-label-long-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    inner = VLLMEngine(folder, ignore_eos=ignore_eos, gpu_memory_utilization=0.88)
    inner.tokenizer = tokenizer  # the word-level tokenizer as built
    engine = answered(inner)
    cold_start = inner.llm.reset_prefix_cache
    for name in chosen_modes(args.modes) if "a" in args.methods else []:
        timed(f"(a) prmtool label --method binary, vllm engine, {name}", engine, label(engine, name))

    def generate(requests):
        params = [vllm.SamplingParams(**sampling_params_kwargs(r, ignore_eos=ignore_eos)) for r in requests]
        outputs = inner.llm.generate([tokens_prompt(r.prompt_ids) for r in requests], params, use_tqdm=False)
        return [
            [Completion(text=tokenizer.decode(o.token_ids), token_ids=list(o.token_ids), num_tokens=len(o.token_ids),
                        finish_reason=o.finish_reason or "length") for o in out.outputs]
            for out in outputs
        ]  # fmt: skip

    bare = answered(BareEngine(tokenizer, generate))
    if "b" in args.methods:
        timed("(b) naive binary search on bare vLLM", bare,
              lambda rows: naive_binary_search(rows, bare, args.k, settings))  # fmt: skip
    if "c" in args.methods:
        timed("(c) Math-Shepherd per-step MC on bare vLLM", bare,
              lambda rows: per_step_mc(rows, bare, args.k, settings), frame.head(args.mc_responses))  # fmt: skip


def agreement(first_errors: list[int], reference: list[int]) -> float:
    return sum(a == b for a, b in zip(first_errors, reference)) / max(1, len(reference))


def judge(args) -> None:
    """Rows/s of `label --method judge` on ProcessBench's GSM8K sample (its problems and steps,
    repeated to --responses rows): one critique per row with a random-weight Qwen2.5-0.5B,
    which never emits EOS, so every critique runs to --max-tokens (the slowest case)."""
    import torch
    from bench_generate import build_model, build_tokenizer

    from prmtool.engines.hf import HFEngine
    from prmtool.methods.judging import judge_rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.quick, device)
    engine = HFEngine(model, build_tokenizer(model.config.vocab_size), max_batch_size=args.slots)
    sample = pl.read_ndjson(Path(__file__).resolve().parents[1] / "data_samples/processbench-gsm8k/gsm8k.jsonl")
    repeats = -(-args.responses // sample.height)
    frame = pl.concat([sample] * repeats).head(args.responses)
    frame = frame.with_columns(
        response_id=pl.format("r{}", pl.int_range(pl.len())),
        correct=pl.lit(False),  # every row asked
    ).select("problem", "steps", "response_id", "correct")
    judge_rows(frame.head(8), engine, max_tokens=8)  # warm-up: graph capture, pools
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    judged = judge_rows(frame, engine, samples=args.judge_samples, max_tokens=args.max_tokens, temperature=1.0)
    seconds = time.perf_counter() - started
    prompt_words = sum(len(" ".join(steps).split()) for steps in frame["steps"]) / frame.height
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {frame.height} rows "
        f"(ProcessBench GSM8K steps, {prompt_words:.0f} words of steps per row), {args.judge_samples} critique(s) of "
        f"{args.max_tokens} tokens each"
    )
    print(
        f"judge: {seconds:.2f} s, {frame.height / seconds:,.1f} rows/s, "
        f"{judged['label_tokens'].sum() / seconds:,.0f} generated tokens/s"
    )


FIDELITY_GRID = ((0.7, 0.0), (0.7, 0.1), (0.7, 0.3), (0.4, 0.1), (0.9, 0.3))
FIDELITY_RULES = (("any-success", None), ("bad-below 0.35", 0.35), ("drop", None))
PROCESSBENCH_GSM8K = Path(__file__).resolve().parents[1] / "data_samples/processbench-gsm8k/gsm8k.jsonl"


def step_structures(path: Path) -> pl.DataFrame:
    """Wrong responses with the step structure of ProcessBench-format rows (JSON or JSONL with
    `steps` and `label`, the index of the first wrong step, -1 for none): each keeps its number
    of steps and its human first error, its step texts replaced by markers the scripted policy
    reads (only the structure matters here). Rows without an error are left out."""
    try:
        if path.suffix == ".jsonl":
            source = pl.read_ndjson(path)
        else:
            source = pl.read_json(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a usage error
        raise SystemExit(f"--data {path}: not ProcessBench-format JSON or JSONL ({error})")
    if missing := [column for column in ("steps", "label") if column not in source.columns]:
        raise SystemExit(f"--data {path}: no column {', '.join(missing)} (expected ProcessBench's steps and label)")
    rows = []
    for index, (steps, first_error) in enumerate(zip(source["steps"].to_list(), source["label"].to_list())):
        if first_error is None or first_error < 0 or not steps or first_error >= len(steps):
            continue
        rows.append(
            {
                "problem_id": f"q{index}",
                "problem": f"Question {index}?",
                "reference_answer": "42",
                "response_id": f"r{index}",
                "steps": [f"Step {i}." + (" ERROR" if i == first_error else "") for i in range(len(steps))],
                "correct": False,
                "human_first_error": first_error,
            }
        )
    if not rows:
        raise SystemExit(f"--data {path}: no row with a first error (label >= 0)")
    return pl.DataFrame(rows)


class NoisyPolicy(ScriptedPolicy):
    """Rollouts right with probability p_good before the human first error and p_bad once the
    prefix holds it; one random stream per (seed, sample number), as the real engines draw, so
    a staged probe's later stages continue its first (SamplingRequest.first_sample)."""

    def __init__(self, p_good: float, p_bad: float):
        super().__init__(p_good)
        self.p_bad = p_bad

    def sample(self, requests, on_progress=None):
        results = []
        for request in requests:
            prefix = "".join(map(chr, request.prompt_ids[request.prompt_ids.index(0) + 1 :]))
            p = self.p_bad if "ERROR" in prefix else self.p
            samples = []
            for number in range(request.first_sample, request.first_sample + request.n):
                right = random.Random(f"{request.seed}:{number}").random() < p
                samples.append(Completion(f"\\boxed{{{42 if right else 41}}}", [], 1, "stop"))
            results.append(samples)
        return results


@contextmanager
def rates_known(p_good: float, p_bad: float):
    """The drop rule's search told the scripted policy's two rates instead of integrating them
    out (`fidelity --rates-known`): what a prior learned from the run's own rollouts could at
    best approach."""
    from prmtool.methods import progress

    def log_evidence(counts, first_bad, prior=None):  # told the rates, no prior is needed
        correct = np.array([c for c, _ in counts], dtype=float)
        missed = np.array([m - c for c, m in counts], dtype=float)
        good, bad = (correct * np.log(max(p, 1e-9)) + missed * np.log(max(1 - p, 1e-9)) for p in (p_good, p_bad))
        good_before = np.concatenate([[0.0], np.cumsum(good)])  # prefixes before f are good
        bad_from = np.concatenate([[0.0], np.cumsum(bad)])
        first_bad = np.asarray(first_bad)
        return good_before[first_bad] + bad_from[-1] - bad_from[first_bad]

    original, progress.log_evidence = progress.log_evidence, log_evidence
    try:
        yield
    finally:
        progress.log_evidence = original


def fidelity_records(
    frame: pl.DataFrame,
    grid,
    methods,
    k: int,
    workers: int,
    confidence: float = 0.9,
    max_k: int | None = None,
    known: bool = False,
) -> list[dict]:
    """One record per (p_good, p_bad, rule, method): first-error exactness, too-early and
    too-late shares against the human first errors, and the rollouts spent, all through
    label_rows itself. `known`: the drop rule's search is told the two rates (rates_known)."""
    settings = RolloutSettings(workers=workers)
    truth = frame["human_first_error"]
    records = []
    for p_good, p_bad in grid:
        for rule_name, bad_below in FIDELITY_RULES:
            rule = "bad-below" if bad_below is not None else rule_name
            told = known and rule == "drop"
            for method in methods:
                with rates_known(p_good, p_bad) if told else nullcontext():
                    labeled = label_rows(
                        frame, NoisyPolicy(p_good, p_bad), method, k=k, settings=settings, rule=rule,
                        bad_below=bad_below, confidence=confidence, max_k=max_k,
                    )  # fmt: skip
                found = labeled["first_error"]
                records.append(
                    {
                        "p_good": p_good,
                        "p_bad": p_bad,
                        "rule": rule_name + (", rates known" if told else ""),
                        "method": method,
                        "exact": float((found == truth).mean()),
                        "early": float((found < truth).mean()),
                        "late": float((found > truth).mean()),
                        "rollouts": int(labeled["label_rollouts"].sum()),
                    }
                )
    return records


def fidelity(args) -> None:
    """First-error fidelity of each rule under a noisy scripted policy (see the module's docstring)."""
    import json

    path = Path(args.data) if args.data else PROCESSBENCH_GSM8K
    frame = step_structures(path)
    grid = FIDELITY_GRID
    if args.quick:
        frame, grid = frame.head(24), grid[:2]
    methods = args.methods.split(",")
    if unknown := [method for method in methods if method not in ("binary", "mc")]:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (expected binary, mc)")
    steps = frame["steps"].list.len()
    print(
        f"{frame.height} wrong responses from {path.name} ({steps.median():.0f} steps median, {steps.max()} most), "
        f"human first errors; k={args.k}, drop: --confidence {args.confidence}, --max-k {args.max_k or 4 * args.k}"
    )
    records = fidelity_records(
        frame, grid, methods, args.k, args.workers, args.confidence, args.max_k, known=args.rates_known
    )
    baseline = "binary" if "binary" in methods else methods[0]  # today's rule with this search
    today = {
        (r["p_good"], r["p_bad"]): r["rollouts"]
        for r in records
        if (r["rule"], r["method"]) == ("any-success", baseline)
    }
    print(f"\n| p_good, p_bad | rule | method | exact | too early | too late | rollouts | / any-success {baseline} |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        ratio = r["rollouts"] / today[(r["p_good"], r["p_bad"])] if today[(r["p_good"], r["p_bad"])] else float("nan")
        print(
            f"| {r['p_good']}, {r['p_bad']} | {r['rule']} | {r['method']} | {r['exact']:.3f} | {r['early']:.3f} | "
            f"{r['late']:.3f} | {r['rollouts']:,} | {ratio:.2f} |"
        )
    if args.json:
        Path(args.json).write_text("".join(json.dumps(record) + "\n" for record in records))
        print(f"\n{len(records)} records written to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["economy", "overhead", "judge", "schedule", "fidelity", "long"])
    parser.add_argument("--responses", default=None, help="overhead: a comma list runs each size on one engine")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--p", type=float, default=0.7, help="economy: chance a rollout from a good prefix is right")
    parser.add_argument("--max-tokens", type=int, default=None, help="rollout length (default 256; long: 1024)")
    parser.add_argument("--slots", type=int, default=1024)
    parser.add_argument(
        "--quick", action="store_true", help="overhead: a tiny model (CPU smoke run); fidelity: 24 rows, 2 grid points"
    )
    parser.add_argument(
        "--engine",
        default=None,
        help="overhead: the engine measured, hf or vllm (default hf); long: a comma list, each in its own process "
        "(default hf,vllm)",
    )
    parser.add_argument("--arch", choices=["0.5b", "1.5b", "7b"], default="7b", help="long: the Qwen2.5 architecture")
    parser.add_argument(
        "--mc-responses",
        type=int,
        default=None,
        help="long: (c) labels only the first N responses (default: all); rates are per response, and the "
        "agreement is over those N (every step x k rollouts: at 7B, 256 responses are about 25M tokens)",
    )
    parser.add_argument(
        "--p-good", type=float, default=0.7, help="long: chance a rollout from a prefix before the wrong step is right"
    )
    parser.add_argument("--p-bad", type=float, default=0.0, help="long: the same from a prefix holding it")
    parser.add_argument(
        "--eos-every",
        type=int,
        default=300,
        help="long: every N-th token id ends a rollout (random weights never pick EOS; about N tokens each, as a "
        "7B's on GSM8K; 0: EOS ignored, every rollout runs to --max-tokens)",
    )
    parser.add_argument(
        "--results",
        help="long: a JSON-lines file each run's rows are added to; the table covers every row in it (run the "
        "hf and vllm engines in two invocations, the same settings, and the agreement with (c) still prints)",
    )
    parser.add_argument(
        "--response-words",
        default=None,
        help="long: the fewest and most words (tokens) of a response, FEWEST,MOST (default 1000,3000; --quick: "
        "40,120; --quick with 1000,3000 replays the GPU run's lengths on the CPU, for the engine's counts)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # long: the one engine this process runs
    parser.add_argument(
        "--modes",
        default=None,
        help="overhead: label runs, in order (default: all four); the first (one without speculation) is what the "
        "bare engine replays; long: (a)'s runs (default lockstep+speculation, label's default)",
    )
    parser.add_argument("--judge-samples", type=int, default=1, help="judge: critiques per row")
    parser.add_argument(
        "--data", help="fidelity: ProcessBench-format JSON or JSONL (steps, label); default: its GSM8K sample"
    )
    parser.add_argument("--json", help="fidelity: write one JSON record per (p_good, p_bad, rule, method) here")
    parser.add_argument(
        "--methods",
        default=None,
        help="fidelity: label methods, a comma list (default binary,mc); long: which of a,b,c run (default all "
        "three): the vllm engine's process runs those, the hf engine's (a), and (b) and (c) on itself under --quick",
    )
    parser.add_argument("--confidence", type=float, default=0.9, help="fidelity: the drop rule's --confidence")
    parser.add_argument("--max-k", type=int, default=None, help="fidelity: the drop rule's --max-k (default 4k)")
    parser.add_argument(
        "--rates-known",
        action="store_true",
        help="fidelity: tell the drop rule's search the scripted policy's two rates (what a learned prior could "
        "at best reach)",
    )
    parser.add_argument("--workers", type=int, default=default_workers(), help="verification processes (default: CPUs)")
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (1024 if args.which == "long" else 256)
    if args.which == "economy":
        args.responses = int(args.responses or 500)
        economy(args)
    elif args.which == "schedule":
        args.responses = args.responses or "512,2048"
        args.modes = args.modes or ",".join(MODES)
        schedule(args)
    elif args.which == "fidelity":
        args.methods = args.methods or "binary,mc"
        fidelity(args)
    elif args.which == "judge":
        args.responses = int(args.responses or 1024)
        judge(args)
    elif args.which == "long":
        args.responses = int(args.responses or 256)
        args.mc_responses = min(args.mc_responses or args.responses, args.responses)
        args.engine = args.engine or ("hf" if args.quick else "hf,vllm")
        args.modes = args.modes or "lockstep+speculation"
        args.methods = args.methods or "a,b,c"
        words = args.response_words or ("40,120" if args.quick else "1000,3000")
        try:
            fewest, most = (int(word) for word in words.split(","))
        except ValueError:
            raise SystemExit(f"--response-words {words!r}: expected FEWEST,MOST, two whole numbers") from None
        if not 0 < fewest <= most:
            raise SystemExit(f"--response-words {words!r}: expected 0 < FEWEST <= MOST")
        args.response_words = (fewest, most)
        long_prefixes(args)
    else:
        args.responses = args.responses or 512
        args.modes = args.modes or ",".join(MODES)
        args.engine = args.engine or "hf"
        if args.engine not in ("hf", "vllm"):
            raise SystemExit(f"--engine {args.engine!r}: overhead measures one engine, hf or vllm")
        overhead(args)


if __name__ == "__main__":
    main()
