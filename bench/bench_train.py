"""Training tokens/s and peak GPU memory of `prmtool train` against TRL 1.13's PRMTrainer (the
last TRL that has one), on the same rows, the same model and the same sequences.

Models: random-weight models of the Qwen2.5-0.5B and -1.5B architectures, float32 weights
trained under bf16 autocast on CUDA (TRL's `bf16=True`), gradient checkpointing on (PRMConfig's
default) for both. Rows: --rows labelled responses of random words (a word-level tokenizer, one
token a word): a problem of 32 to 128 tokens and 3 to 12 steps of 16 to 120 tokens, every step
labelled; one epoch each, so both see every row once, whole (no truncation).

  prmtool   the engine `prmtool train` runs (prmtool/engines/hf/training.py) on the examples the
            stage builds: rows packed into --pack-tokens rows without padding, --batch-tokens
            a step (B x the mean row length, so as many steps as TRL's), one forward pass a step
  trl       TRL 1.13.0 `PRMTrainer` on the rows exported as `trl-stepwise` (prmtool's own
            converter), per_device_train_batch_size B, its collator padding each batch to its
            longest row
  trainer   (with --trainer) transformers' Trainer fed prmtool's very packed batches and loss:
            the plain loop against Trainer, the rest equal

Each side runs in its own process (a clean peak-memory count; TRL 1.13 from its own folder).
tokens/s counts the rows' real tokens (no padding) over the training loop's time, model load
and tokenization left out on both sides. Target: prmtool >= 1.5x TRL's tokens/s. Measured on
one H100 80GB (2026-12-06): 0.5B, 256 rows: prmtool 16,587 tokens/s (7.46 GiB), TRL 9,509
(7.65 GiB), 1.74x; Trainer on the same batches 16,401. 1.5B, 192 rows: 11,806 (23.12 GiB)
against 5,590 (23.47 GiB), 2.11x.

TRL 1.13 is not on PyPI's current line and the GPU machine has no network: fetch its wheel
here first, then carry the folder (it is about 0.5 MB):

    bash bench/prepare_train_bench.sh                          # writes bench/wheels/
    PYTHONPATH=. python bench/bench_train.py --trl-wheels bench/wheels    # on the GPU
    PYTHONPATH=. python bench/bench_train.py --quick           # a tiny model on CPU: checks it runs

`--trl-site DIR` takes a folder TRL 1.13 is already installed in (tests/consumers/install.sh
makes .consumers/trl-1.13.0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_generate import ARCHES, TINY  # noqa: E402  (the Qwen2.5 architectures every bench uses)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rows, CPU: a smoke run")
    parser.add_argument("--models", default="0.5b,1.5b", help="comma-separated: 0.5b, 1.5b")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="TRL's per_device_train_batch_size")
    parser.add_argument("--pack-tokens", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--trl-wheels", type=Path, help="a folder with TRL 1.13.0's wheel (prepare_train_bench.sh)")
    parser.add_argument("--trl-site", type=Path, help="a folder TRL 1.13.0 is installed in")
    parser.add_argument("--trainer", action="store_true", help="also time transformers' Trainer on prmtool's batches")
    parser.add_argument(
        "--profile", action="store_true", help="print the CUDA kernels that took most of prmtool's steps 3 to 8"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.rows, args.batch_size, args.pack_tokens = "tiny", 12, 4, 1024
        args.trainer = True
    return args


# ---------------------------------------------------------------- the shared inputs


def build_tokenizer(vocab_size: int):
    """One token per word `tN`: sequence lengths are exact and the same for both sides."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t0")


def prepare(work: Path, name: str, rows: int, seed: int, device: str) -> None:
    """The model folder (random weights) and the rows, as stage input and as TRL's export."""
    import polars as pl
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prmtool.methods.formats import to_trl_stepwise

    config = TINY if name == "tiny" else ARCHES[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**config, pad_token_id=0))
    model.save_pretrained(work / "model")
    # Apart from the model: in its folder, AutoTokenizer would pick Qwen2's tokenizer class by config.json.
    build_tokenizer(config["vocab_size"]).save_pretrained(work / "tokenizer")
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(f"t{rng.randrange(1, config['vocab_size'])}" for _ in range(rng.randint(low, high)))

    problems, steps, labels = [], [], []
    for _ in range(rows):
        problems.append(words(32, 128))
        count = rng.randint(3, 12)
        steps.append([words(16, 120) for _ in range(count)])
        first_error = rng.choice([count] * 3 + list(range(count)))  # a quarter of the rows all good
        labels.append([1 if i < first_error else 0 for i in range(count)])
    frame = pl.DataFrame(
        {"problem": problems, "steps": steps, "step_labels": labels},
        schema={"problem": pl.String, "steps": pl.List(pl.String), "step_labels": pl.List(pl.Int8)},
    )
    frame.write_parquet(work / "rows.parquet")
    (work / "trl" / "train").mkdir(parents=True)
    to_trl_stepwise(frame)[0].write_parquet(work / "trl" / "train" / "part-00000.parquet")


def examples_of(work: Path):
    import polars as pl
    from transformers import AutoTokenizer

    from prmtool.methods.training import build_examples

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    examples, _ = build_examples(
        pl.read_parquet(work / "rows.parquet"),
        tokenizer,
        target="label",
        scope="all",
        separator="\n",
        max_length=1_000_000,
    )
    return examples


def batch_tokens(examples, args) -> int:
    """Tokens per prmtool step: TRL's batch size times the mean row, in whole packed rows."""
    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    rows = max(1, round(args.batch_size * mean / args.pack_tokens))
    return rows * args.pack_tokens


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# ---------------------------------------------------------------- each side, in its own process


def run_prmtool(work: Path, args) -> dict:
    from prmtool.engines.hf.training import train
    from prmtool.methods.training import TrainingConfig

    examples = examples_of(work)
    config = TrainingConfig(
        base=str(work / "model"),
        learning_rate=args.learning_rate,
        epochs=1.0,
        batch_tokens=batch_tokens(examples, args),
        pack_tokens=args.pack_tokens,
        save_steps=0,
        device=device_name(),
        seed=args.seed,
    )
    losses = []
    profiler = None
    if args.profile:  # steps 3 to 8 (after two warm-up steps), kernels by total GPU time
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        schedule = torch.profiler.schedule(wait=1, warmup=1, active=6, repeat=1)
        profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        profiler.start()

    def on_step(report):
        losses.append(report.loss)
        if profiler is not None:
            profiler.step()

    result = train(examples, config, work / "prmtool-out", resume=False, on_step=on_step)
    measured = {
        "tokens": result["tokens"],
        "seconds": result["seconds"],
        "steps": result["steps"],
        "peak_gib": peak_memory(),
        "losses": [losses[0], losses[-1]],
    }
    if profiler is not None:
        profiler.stop()
        measured["profile"] = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    return measured


def run_trl(work: Path, args) -> dict:
    import time

    import datasets
    import torch
    import trl
    from transformers import AutoModelForTokenClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.prm import PRMConfig, PRMTrainer

    assert trl.__version__ == "1.13.0", trl.__version__
    cuda = torch.cuda.is_available()
    dataset = datasets.load_dataset(
        "parquet", data_files=str(work / "trl/train/*.parquet"), split="train", cache_dir=str(work / "hf-cache")
    )
    config = PRMConfig(
        output_dir=str(work / "trl-out"),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=None,  # whole rows, as prmtool trains them
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    model = AutoModelForTokenClassification.from_pretrained(work / "model", num_labels=2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    trainer = PRMTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    padded = [0]
    collate = trainer.data_collator

    def counting(features):  # what TRL's collator hands the model, padding included
        batch = collate(features)
        padded[0] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **_):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer.add_callback(Losses())
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "padded_tokens": padded[0],
        "seconds": seconds,
        "steps": result.global_step,
        "peak_gib": peak_memory(),
        "losses": [losses[0], losses[-1]] if losses else [],
    }


def run_trainer(work: Path, args) -> dict:
    """transformers' Trainer over prmtool's packed batches and loss: the loop, nothing else."""
    import time

    import torch
    from transformers import Trainer, TrainingArguments

    from prmtool.engines.hf.training import collate, load_for_training, packed_loss
    from prmtool.methods.training import TrainingConfig, epoch_batches

    examples = examples_of(work)
    tokens_per_step = batch_tokens(examples, args)
    rows = epoch_batches([len(e.input_ids) for e in examples], args.pack_tokens, args.seed, 0)
    per_step = max(1, tokens_per_step // args.pack_tokens)
    steps = [rows[i : i + per_step] for i in range(0, len(rows), per_step)]
    cuda = torch.cuda.is_available()
    model = load_for_training(TrainingConfig(base=str(work / "model"), device=device_name()))

    class PackedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return packed_loss(model, inputs, model.device)

    def to_inputs(batch_rows):
        return collate(examples, batch_rows[0])

    arguments = TrainingArguments(
        output_dir=str(work / "trainer-out"),
        num_train_epochs=1,
        per_device_train_batch_size=1,
        learning_rate=args.learning_rate,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = PackedTrainer(model=model, args=arguments, train_dataset=steps, data_collator=to_inputs)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(examples[i].input_ids) for row in rows for i in row)
    return {"tokens": tokens, "seconds": seconds, "steps": result.global_step, "peak_gib": peak_memory()}


SIDES = {"prmtool": run_prmtool, "trl": run_trl, "trainer": run_trainer}


def run_side(side: str, work: Path, args, site: Path | None = None) -> dict:
    """One side in a fresh process: its own peak memory, and TRL 1.13 first on its path."""
    command = [sys.executable, __file__, "--side", side, "--work", str(work)]
    command += ["--batch-size", str(args.batch_size), "--pack-tokens", str(args.pack_tokens)]
    command += ["--learning-rate", str(args.learning_rate), "--seed", str(args.seed)]
    command += ["--profile"] if args.profile and side == "prmtool" else []
    path = [str(site)] if site is not None else []
    environment = {
        **os.environ,
        # the caller's path kept after ours (packages installed beside the system's, e.g. --target)
        "PYTHONPATH": os.pathsep.join([*path, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def trl_site(args, scratch: Path) -> Path:
    if args.trl_site is not None:
        return args.trl_site
    if args.trl_wheels is None:
        installed = ROOT / ".consumers" / "trl-1.13.0"
        if (installed / ".complete").exists():
            return installed
        raise SystemExit("give --trl-wheels DIR (bash bench/prepare_train_bench.sh) or --trl-site DIR")
    site = scratch / "trl-site"
    wheels = sorted(str(w) for w in args.trl_wheels.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels],
        check=True,
    )
    return site


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(SIDES[args.side](args.work, args)))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        site = trl_site(args, Path(scratch))
        for name in args.models.split(","):
            work = Path(scratch) / name
            work.mkdir()
            prepare(work, name, args.rows, args.seed, device)
            results = {"prmtool": run_side("prmtool", work, args), "trl": run_side("trl", work, args, site)}
            if args.trainer:
                results["trainer"] = run_side("trainer", work, args)
            report(name, results, args)


def report(name: str, results: dict, args) -> None:
    trl = results["trl"]
    print(f"\n{name}: {args.rows} rows, {trl['tokens']:,} tokens; TRL batches of {args.batch_size} rows are "
          f"{1 - trl['tokens'] / trl['padded_tokens']:.1%} padding")  # fmt: skip
    for side, result in results.items():
        rate = result["tokens"] / result["seconds"]
        losses = result.get("losses") or []
        loss = f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
        print(
            f"  {side:<8} {rate:>10,.0f} tokens/s  {result['seconds']:8.1f} s  {result['steps']:>5} steps  "
            f"peak {result['peak_gib']:.2f} GiB{loss}"
        )
    assert results["prmtool"]["tokens"] == trl["tokens"], "both sides must train on the same tokens"
    ratio = (results["prmtool"]["tokens"] / results["prmtool"]["seconds"]) / (trl["tokens"] / trl["seconds"])
    memory = results["prmtool"]["peak_gib"] / trl["peak_gib"] if trl["peak_gib"] else float("nan")
    print(f"  prmtool / TRL 1.13 PRMTrainer: {ratio:.2f}x tokens/s, {memory:.2f} of the peak memory")
    if "profile" in results["prmtool"]:
        print(results["prmtool"]["profile"])
    if "trainer" in results:
        trainer = results["trainer"]
        loop = (results["prmtool"]["tokens"] / results["prmtool"]["seconds"]) / (trainer["tokens"] / trainer["seconds"])
        print(f"  plain loop / transformers' Trainer on the same packed batches: {loop:.2f}x tokens/s")


if __name__ == "__main__":
    main()
