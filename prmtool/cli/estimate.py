"""What a recipe will cost before it runs: rows and generated tokens per stage, for `prmtool run
--dry-run`, and the time they take at a throughput (given, or measured by earlier runs here).

Counts are upper bounds where the outcome decides: every response is assumed wrong (a first-error
search runs for each), every search runs to full depth, every rollout runs to max-tokens, and
responses that do not exist yet are assumed to have STEPS_PER_RESPONSE steps (STEPS_PER_TRACE for
reasoning traces under --split think).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prmtool.core.errors import InputError
from prmtool.core.outputs import replace_atomically

STEPS_PER_RESPONSE = 8  # assumed for responses a recipe has not generated yet
STEPS_PER_TRACE = 40  # a reasoning trace under --split think: its default --max-steps
MODEL_STAGES = {"generate", "label", "intervene"}  # the stages whose cost is generated tokens
# A run that generated fewer tokens measures mostly its model load and start-up, not a rate.
MIN_MEASURED_TOKENS = 1_000


@dataclass
class Size:
    rows: int | None  # None: unknown (an input that cannot be counted without reading it)
    problems: int | None


@dataclass
class StageCost:
    label: str
    rows_in: int | None
    tokens: int | None  # generated tokens, at most (None: unknown)
    how: str  # the formula, in words


def count_input(path: str) -> Size:
    """Rows and problems of an external input: Parquet footers, or the lines of a JSONL file."""
    from prmtool.core import shards

    candidate = Path(path)
    if candidate.suffix in (".jsonl", ".ndjson") and candidate.is_file():
        with candidate.open("rb") as lines:
            rows = sum(1 for line in lines if line.strip())
        return Size(rows, rows)  # an import: one row per problem
    try:
        found = shards.open_inputs([path])
    except Exception:
        return Size(None, None)
    rows = sum(shard.rows for shard in found)
    try:
        import polars as pl

        problems = pl.concat([pl.scan_parquet(s.path).select("problem_id") for s in found]).collect()
        return Size(rows, problems["problem_id"].n_unique())
    except Exception:
        return Size(rows, None)


def _times(*factors: int | None) -> int | None:
    return None if any(f is None for f in factors) else math.prod(factors)  # type: ignore[arg-type]


def stage_cost(stage: str, settings, size: Size) -> tuple[StageCost, Size]:
    """The cost of one stage given the size of its input, and the size of its output."""
    rows, problems = size.rows, size.problems
    tokens, how, out = 0, "no sampling", size
    if stage == "generate":
        tokens = _times(rows, settings.n, settings.max_tokens)
        how = f"{settings.n} responses x {settings.max_tokens} tokens per problem"
        out = Size(_times(rows, settings.n), problems)
    elif stage == "label":
        method, k, max_tokens = settings.method, settings.k, settings.max_tokens
        steps = STEPS_PER_TRACE if getattr(settings, "split", None) == "think" else STEPS_PER_RESPONSE
        probes = {"binary": (steps - 1).bit_length() + 1, "mc": steps}
        from prmtool.methods import labeling

        drop = labeling.check_rule(settings.rule, settings.bad_below) == "drop"
        if drop and method in probes:  # the drop rule's budget: up to --max-k rollouts a level
            probes["binary"] = labeling.drop_levels(steps)  # a wrong response's places: its steps
            k = settings.max_k or labeling.MAX_K_PER_K * k
        if method in probes:
            tokens = _times(rows, probes[method], k, max_tokens)
            unit = "levels" if drop and method == "binary" else "prefixes"
            most = "up to " if drop else ""
            how = f"{probes[method]} {unit} x {most}{k} rollouts x {max_tokens} tokens per response"
        elif method == "omegaprm":
            tokens = _times(problems, settings.search_budget + settings.screen_rollouts, max_tokens)
            how = f"{settings.screen_rollouts} + {settings.search_budget} rollouts x {max_tokens} tokens per question"
        else:  # judge, or consensus: a binary search and the judge
            tokens = _times(rows, settings.judge_samples, max_tokens)
            how = f"{settings.judge_samples} critiques x {max_tokens} tokens per response"
            if method == "consensus":
                search = _times(rows, probes["binary"], k, max_tokens)
                tokens = None if tokens is None or search is None else tokens + search
                how = f"{probes['binary']} prefixes x {k} rollouts x {max_tokens} tokens, and {how}"
    elif stage == "intervene":
        per_candidate = settings.proposer_max_tokens + settings.verify_rollouts * settings.max_tokens
        tokens = _times(rows, settings.candidates, per_candidate)
        how = (
            f"{settings.candidates} candidates x ({settings.proposer_max_tokens} + {settings.verify_rollouts} "
            f"rollouts x {settings.max_tokens}) tokens per response"
        )
    elif stage == "score":
        how = "no sampling: one forward pass per model over each response"
    elif stage == "filter" and settings.method == "prof" and settings.keep is not None:
        out = Size(_times(problems, settings.keep), problems)
    if stage in ("import",):
        how = "reads the input"
    return StageCost("", rows, tokens, how), out


# -------------------------------------------------------------------- measured throughput
#
# Every model stage that runs here (alone or in a recipe) records its generated tokens per
# second under its stage, engine, device and model, the latest run replacing the one before:
# label's rollouts (verified as they go) run at another rate than generate's samples, and a
# rate measured on the hf engine says nothing of vLLM's or of another device's.


def throughput_file() -> Path:
    """Where runs keep the throughput they measured: PRMTOOL_CACHE_DIR, else the user's cache
    folder."""
    if os.environ.get("PRMTOOL_CACHE_DIR"):
        return Path(os.environ["PRMTOOL_CACHE_DIR"]) / "throughput.json"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prmtool" / "throughput.json"


def engine_and_device(stage: str, settings) -> tuple[str, str]:
    """The engine and device a stage's settings run on here: --engine auto resolved as the
    stage resolves it, the device as the engine picks it (CUDA when there is one)."""
    from prmtool.engines import EngineError, choice

    model = getattr(settings, "policy", None) if stage == "score" else getattr(settings, "model", None)
    device = settings.device
    if device is None:
        device = "cuda" if choice.cuda_available() else "cpu"
    try:
        engine = choice.resolve(
            settings.engine, model, settings.device, choice.stage_prompt_tokens(stage, settings), stage
        ).engine
    except EngineError:
        engine = settings.engine
    return engine, device


def throughput_key(settings, stage: str = "generate") -> str:
    model = getattr(settings, "model", None) or "embedded SmolLM2-135M-Instruct"
    engine, device = engine_and_device(stage, settings)
    return f"{stage}|{engine}|{device}|{model}"


def tokens_shape(settings) -> dict:
    """The settings that set how many tokens a row takes (samples, rollouts, their length): a
    run's tokens per row say something of another run only where these are the same."""
    names = ("n", "k", "max_tokens", "method", "max_k", "rule", "steps")
    return {name: getattr(settings, name) for name in names if isinstance(getattr(settings, name, None), (int, str))}


def record_throughput(
    settings, tokens: int, seconds: float, *, stage: str = "generate", rows: int | None = None
) -> None:
    """Remember a model stage's generated tokens per second on this machine, for --dry-run, and
    the rows it read (a whole run's, not a resumed one's), which give its tokens per row."""
    if tokens < MIN_MEASURED_TOKENS or seconds <= 0:
        return
    path = throughput_file()
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known[throughput_key(settings, stage)] = {
            "tokens_per_second": tokens / seconds,
            "tokens": tokens,
            "seconds": round(seconds, 1),
            **({"rows": rows, "shape": tokens_shape(settings)} if rows else {}),
            "when": time.strftime("%Y-%m-%d %H:%M"),
        }
        text = json.dumps(known, indent=1, sort_keys=True).encode()
        replace_atomically(path, lambda handle: handle.write(text))
    except (OSError, ValueError, InputError):  # a cache: never fail a run over it
        pass


def measured_throughput(settings, stage: str = "generate") -> dict | None:
    """The latest measurement for this stage, engine, device and model, with `basis` saying
    what it rests on; else the latest of another model stage of the same model, engine and
    device (said so); None when this machine has measured neither."""
    try:
        known = json.loads(throughput_file().read_text())
    except (OSError, ValueError):
        return None
    key = throughput_key(settings, stage)
    _, engine, device, model = key.split("|", 3)
    record = known.get(key)
    source = stage
    if record is None:
        others = [
            (value, name.split("|", 1)[0])
            for name, value in known.items()
            if name.split("|", 1)[-1] == key.split("|", 1)[1] and isinstance(value, dict)
        ]
        if not others:
            return None
        record, source = max(others, key=lambda pair: str(pair[0].get("when", "")))
    over = (
        f", over {record['tokens']:,} tokens in {record['seconds']:,.0f} s, model load included"
        if "tokens" in record
        else ""
    )
    elsewhere = "" if source == stage else f", no {stage} run measured yet"
    basis = f"measured here {record.get('when', '?')}: {source} on {engine}, {device}{over}{elsewhere}"
    return {**record, "basis": basis, "source": source}


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
