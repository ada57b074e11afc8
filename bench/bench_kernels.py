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
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
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
