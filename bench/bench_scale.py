"""How `prmtool label` scales over the GPUs of one host: one GPU, every GPU through
`--executor ray --gpus-per-task 1`, and every GPU through `xargs -P` with one
`CUDA_VISIBLE_DEVICES` and one `--shard-index` per process.

The job: `label --method binary --rule any-success --k 8` on wrong responses of 4 to 16 steps (as bench_label.py's
overhead job), with a random-weight Qwen2.5-0.5B saved with `save_pretrained` (a word-level
tokenizer beside it), every rollout running to --max-tokens. Each way runs the same command
line in fresh processes, model load included. Prints rollouts/s and the scaling efficiency
(throughput on N GPUs / (N x one GPU's)); target >= 0.9. Checks that each N-GPU output equals
the one-GPU run row for row (the seeds make labels independent of the partitioning).

    python bench/bench_scale.py --responses 4096          # a host with several GPUs
    python bench/bench_scale.py --quick                   # CPU: two processes, a tiny model

Not measured yet: no machine with more than one GPU has been lent (2026-12-04). Size
--responses so that one GPU works about a minute.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_label import wrong_responses  # noqa: E402


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def save_model(folder: Path, quick: bool, texts: list[str]) -> None:
    """The model folder the commands load: random weights, and a byte-level BPE tokenizer
    trained on the job's own texts (a word-level one would not survive the reload: transformers
    rebuilds a Qwen2 folder's tokenizer as BPE). The vocabulary is the tokenizer's, so the
    output head is smaller than Qwen2.5's; the layers are the architecture's."""
    import torch
    from bench_generate import ARCHES, TINY
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>")
    shape = {**(TINY if quick else ARCHES["0.5b"]), "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=None, bos_token_id=None, pad_token_id=0))
    # EOS never ends a rollout: every one runs to --max-tokens
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)
    model.to(torch.float32 if quick else torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def label_command(inputs: Path, output: Path, model: Path, args, *extra: str) -> list[str]:
    device = "cpu" if args.quick else "cuda"
    return [
        sys.executable, "-m", "prmtool", "label", str(inputs), "-o", str(output), "--method", "binary",
        "--rule", "any-success",  # the workload measured (no rollout of random weights is right)
        "--model", str(model), "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--temperature", "1.0",
        "--device", device, "-q", *extra,
    ]  # fmt: skip


def timed(command: list[str] | str, env: dict | None = None, shell: bool = False) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **(env or {})}, shell=shell, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {command if shell else shlex.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def rows(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "*.parquet").sort("response_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=4096)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model, two processes")
    args = parser.parse_args()
    if args.quick:
        args.responses, args.max_tokens = min(args.responses, 16), min(args.max_tokens, 8)
    count = 2 if args.quick else gpu_count()
    if count < 2:
        raise SystemExit(f"this benchmark needs 2 or more GPUs; found {count}")

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    inputs = work / "responses"
    inputs.mkdir()
    frame = wrong_responses(args.responses, 4, 16, words_per_step=40).drop("true_first_error")
    save_model(work / "model", args.quick, frame["problem"].to_list() + frame["steps"].explode().to_list())
    for shard in range(count * 4):  # several shards per partition: input-shard partitions stay even
        frame.gather_every(count * 4, offset=shard).write_parquet(inputs / f"part-{shard:05d}.parquet")
    one_gpu = {"CUDA_VISIBLE_DEVICES": "0"} if not args.quick else {}

    seconds = {"1 GPU": timed(label_command(inputs, work / "one", work / "model", args), one_gpu)}
    ray = label_command(inputs, work / "ray", work / "model", args, "--executor", "ray", "--num-shards", str(count))
    if not args.quick:
        ray += ["--gpus-per-task", "1"]
    seconds[f"{count} GPUs, ray"] = timed(ray)
    per_process = label_command(inputs, work / "xargs", work / "model", args, "--shard-index", "{}")
    per_process += ["--num-shards", str(count)]
    line = " ".join(part if part == "{}" else shlex.quote(part) for part in per_process)
    visible = "" if args.quick else "CUDA_VISIBLE_DEVICES={}"  # xargs puts the index in place of {}
    xargs = f"seq 0 {count - 1} | xargs -P {count} -I{{}} env {visible} {line}"
    seconds[f"{count} GPUs, xargs -P"] = timed(xargs, shell=True)

    reference = rows(work / "one")
    rollouts = int(reference["label_rollouts"].sum())
    print(f"{args.responses} wrong responses, k={args.k}, max_tokens={args.max_tokens}: {rollouts:,} rollouts")
    for way, taken in seconds.items():
        gpus = 1 if way == "1 GPU" else count
        rate = rollouts / taken
        efficiency = rate / (gpus * rollouts / seconds["1 GPU"])
        print(f"  {way:<20} {taken:8.1f} s  {rate:10,.1f} rollouts/s  scaling efficiency {efficiency:.2f}")
    for folder in ("ray", "xargs"):
        merged = rows(work / folder)
        same = merged.select(reference.columns).equals(reference)
        print(f"  {folder} output equals the one-GPU run row for row: {same}")


if __name__ == "__main__":
    main()
