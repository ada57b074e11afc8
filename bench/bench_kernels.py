"""The fused Hopper kernels of `prmtool score` (prmtool/engines/hf/hopper.py) against the unfused
path they replace, one forward's worth of work at a time, on the Qwen2.5-1.5B shapes.

  swiglu   silu(x @ gate^T) * (x @ up^T), 16,384 tokens x 1,536 -> 8,960: one Triton kernel
           against cuBLAS's two products plus Inductor's SiLU*mul kernel
  head     log p(target) through the 151,936-word output head for 16,384 tokens: one Triton
           kernel (tiles reduced to max and sum of exponentials) against cuBLAS float32 logits
           plus the one-pass log-normalizer
  sample   a decode step's next tokens, 512 rows of 151,936 bf16 logits: one Triton kernel
           (sampling.inverse_cdf_tokens) against torch's cast, softmax, cumsum and search; the
           line gives how many of the 512 tokens agree (they may differ within rounding)

Each line gives the median time of both, the speed-up, and the fused result's error against
the unfused one. `--sweep` also times a few other tile shapes and pipeline depths.

    PYTHONPATH=. python bench/bench_kernels.py            # on an H100/H200 (about a minute)
    PYTHONPATH=. python bench/bench_kernels.py --quick    # tiny shapes on CPU: the torch fallbacks
    PYTHONPATH=. python bench/bench_kernels.py --matmul-rows   # the table below

`--matmul-rows` times the matrix products of one Qwen2.5-7B decoder layer (q, k and v as one
3584 -> 4608 product, o, gate, up, down) and the output head at each row count a decode step may
run, through torch (cuBLAS), and marks the counts the hf engine's decode steps use
(generate.row_counts). Measured 2026-12-07 on one H100 80GB (microseconds; the layer column is
qkv + o + 2 x gate + down):

  | rows | qkv  | o    | gate  | down  | layer | head   |    | rows | qkv  | o    | gate  | down  | layer | head   |
  |-----:|-----:|-----:|------:|------:|------:|-------:|----|-----:|-----:|-----:|------:|------:|------:|-------:|
  |    8 | 25.4 | 24.5 |  64.4 |  66.1 |   245 |    385 |    |  384 | 40.2 | 31.8 |  90.9 |  95.0 |   349 |    651 |
  |   64 | 26.3 | 24.5 |  64.5 |  67.8 |   248 |    396 |    |  416 | 51.5 | 32.8 | 204.4 | 135.5 |   629 |    747 |
  |  128 | 26.1 | 24.9 |  66.3 |  72.3 |   256 |    405 |    |  448 | 39.5 | 40.0 | 205.5 | 132.7 |   623 |    771 |
  |  192 | 36.0 | 31.0 |  74.6 |  76.2 |   292 |    423 |    |  480 | 40.2 | 37.5 | 110.4 | 103.6 |   402 |    810 |
  |  256 | 29.5 | 29.4 |  77.3 |  78.0 |   292 |    445 |    |  512 | 39.4 | 33.8 | 108.9 | 104.3 |   395 |    831 |
  |  288 | 33.6 | 28.3 |  83.3 |  87.3 |   316 |    519 |    |  576 | 45.4 | 48.3 | 133.1 | 191.6 |   552 |    939 |
  |  320 | 41.5 | 39.2 | 124.6 |  80.6 |   411 |    521 |    |  640 | 46.1 | 45.6 | 134.2 | 134.5 |   495 |   1060 |
  |  352 | 42.4 | 30.8 | 109.2 |  93.5 |   385 |    641 |    |  768 | 54.2 | 42.5 | 147.7 | 151.0 |   543 |   1236 |

A layer costs about the same from 8 to 128 rows (the weights' reading), and between multiples
of 128 cuBLAS's choice of kernel is sometimes slow: 448 rows took 623 us where 512 took 395, and
320 took 411 where 384 took 349. Every multiple of 128 up to 1,024 cost less than any larger
count, hence decode steps in steps of 128 rows (ROW_COUNT_STEP); the steps of 64 they replace
ran 448 and 320. (The table timed the same products with CUDA events, the median of 30 runs;
the option times them with triton's do_bench, as the other lines.)

Measured 2026-12-02 on one H200, with this script's comparisons run from a scratch copy:
swiglu 1.30 to 1.43 ms against 1.50 to 1.53 ms; head 11.9 ms against 14.6 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from prmtool.engines.hf import hopper
from prmtool.engines.hf.log_probs import choose_target_log_probs, triton_available
from prmtool.engines.hf.sampling import inverse_cdf_tokens, sample_from_logits

QWEN25_15B = dict(tokens=16384, hidden=1536, intermediate=8960, vocab=151936)
QUICK = dict(tokens=40, hidden=64, intermediate=96, vocab=500)
SWEEP = {
    "swiglu": [({}, dict(num_stages=4)), (dict(GROUP_M=16), {}), (dict(GROUP_M=4), {})],
    "head": [({}, dict(num_stages=4)), (dict(GROUP_M=16), {}), (dict(GROUP_M=64), {})],
}


def median_ms(work, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(work, warmup=30, rep=200, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[2]


@contextlib.contextmanager
def tiles(name: str, tile_changes: dict, launch_changes: dict):
    """hopper's tile and launch settings for `name`, changed inside the block."""
    settings = [getattr(hopper, f"{name.upper()}_TILES"), getattr(hopper, f"{name.upper()}_LAUNCH")]
    saved = [dict(s) for s in settings]
    settings[0].update(tile_changes)
    settings[1].update(launch_changes)
    try:
        yield
    finally:
        for setting, old in zip(settings, saved):
            setting.clear()
            setting.update(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script runs")
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes and pipeline depths")
    parser.add_argument(
        "--matmul-rows",
        action="store_true",
        help="only time a 7B decoder layer's matrix products at each row count a decode step may run",
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.matmul_rows:
        return time_matmul_rows(device, quick=args.quick)
    shape = QUICK if device.type == "cpu" else QWEN25_15B
    dtype = torch.bfloat16
    torch.manual_seed(0)
    tokens, hidden, intermediate, vocab = shape["tokens"], shape["hidden"], shape["intermediate"], shape["vocab"]
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    gate = torch.randn(intermediate, hidden, device=device, dtype=dtype) / hidden**0.5
    up = torch.randn(intermediate, hidden, device=device, dtype=dtype) / hidden**0.5
    head = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5
    targets = torch.randint(0, vocab, (tokens,), device=device)
    fused_kernels = hopper.available(device)
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {shape}, "
        f"fused kernels {'on' if fused_kernels else 'off (torch fallbacks)'}",
        flush=True,
    )

    silu_mul = (
        torch.compile(lambda g, u: torch.nn.functional.silu(g) * u)
        if device.type == "cuda"
        else (lambda g, u: torch.nn.functional.silu(g) * u)
    )
    log_normalized = choose_target_log_probs(device, compile=False)

    def unfused_swiglu():
        return silu_mul(x @ gate.T, x @ up.T)

    def unfused_head():
        if device.type == "cuda":
            return log_normalized(torch.mm(x, head.T, out_dtype=torch.float32), targets)
        return log_normalized(x.float() @ head.float().T, targets)

    cases = {
        "swiglu": (unfused_swiglu, lambda: hopper.swiglu(x, gate, up), 2 * 2 * tokens * hidden * intermediate),
        "head": (unfused_head, lambda: hopper.head_target_log_probs(x, head, targets), 2 * tokens * hidden * vocab),
    }
    for name, (unfused, fused, flops) in cases.items():
        expected = unfused().float()
        base = median_ms(unfused, device)
        variants = [({}, {})] + (SWEEP[name] if args.sweep and fused_kernels else [])
        for tile_changes, launch_changes in variants:
            with tiles(name, tile_changes, launch_changes):
                got = fused().float()
                error = ((got - expected).norm() / expected.norm()).item()
                ms = median_ms(fused, device)
                label = f"{name} {tile_changes or ''}{launch_changes or ''}".strip()
            print(
                f"{label:<36} fused {ms:8.3f} ms ({flops / ms / 1e9:5.0f} TFLOP/s)  unfused {base:8.3f} ms  "
                f"{base / ms:5.2f}x  relative error {error:.1e}",
                flush=True,
            )

    time_sampling(device, vocab)


# Qwen2.5-7B's products, (output, input) features: q, k and v as one, the MLP's three, the head.
QWEN25_7B_PRODUCTS = dict(qkv=(4608, 3584), o=(3584, 3584), gate=(18944, 3584), down=(3584, 18944), head=(152064, 3584))
# A decoder layer's products and how often each shape runs (up has gate's shape).
LAYER_PRODUCTS = dict(qkv=1, o=1, gate=2, down=1)
MATMUL_ROWS = [8, 16, 32, 64, 96, *range(128, 1025, 32)]


def time_matmul_rows(device: torch.device, quick: bool) -> None:
    """Microseconds of each product at each row count, and a decoder layer's sum."""
    from prmtool.engines.hf.generate import row_counts

    scale = 64 if quick else 1  # --quick: every size / 64, a few row counts, to check the script runs
    rows_to_time = MATMUL_ROWS[:6] if quick else MATMUL_ROWS
    used = set(row_counts(1024))
    weights = {
        name: torch.randn(out // scale, inp // scale, device=device, dtype=torch.bfloat16) * 0.02
        for name, (out, inp) in QWEN25_7B_PRODUCTS.items()
    }
    print(f"{'rows':>5} {'engine':>6} " + "".join(f"{name:>9}" for name in weights) + f"{'layer':>9}  TFLOP/s")
    for rows in rows_to_time:
        times = {}
        for name, weight in weights.items():
            x = torch.randn(rows, weight.shape[1], device=device, dtype=torch.bfloat16)
            times[name] = 1000 * median_ms(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), device)
        layer = sum(count * times[name] for name, count in LAYER_PRODUCTS.items())
        flops = 2 * rows * sum(count * weights[name].numel() for name, count in LAYER_PRODUCTS.items())
        print(
            f"{rows:>5} {'yes' if rows in used else '':>6} " + "".join(f"{t:9.1f}" for t in times.values())
            + f"{layer:9.1f}  {flops / layer / 1e6:7.1f}",
            flush=True,
        )  # fmt: skip


def time_sampling(device: torch.device, vocab: int) -> None:
    rows = 512 if device.type == "cuda" else 8
    logits = (torch.randn(rows, vocab, device=device) * 3).to(torch.bfloat16)
    temperature = torch.full((rows,), 0.7, device=device)
    top_p = torch.ones(rows, device=device)
    uniform = 1.0 - torch.rand(rows, device=device)

    def torch_sampler():
        return sample_from_logits(logits, temperature, top_p, uniform, False, False, kernel=False)

    base = median_ms(torch_sampler, device)
    if device.type != "cuda" or not triton_available():
        print(f"{'sample':<36} kernel: needs CUDA and Triton  torch {base:8.3f} ms", flush=True)
        return
    expected = torch_sampler()
    got = inverse_cdf_tokens(logits, temperature, uniform)
    ms = median_ms(lambda: inverse_cdf_tokens(logits, temperature, uniform), device)
    agree = int((got == expected).sum())
    print(
        f"{'sample':<36} kernel {ms:8.3f} ms  torch {base:8.3f} ms  {base / ms:5.2f}x  tokens agree {agree} of {rows}",
        flush=True,
    )


if __name__ == "__main__":
    main()
