"""`prmtool generate`: N sampled solutions per problem from a policy model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core.errors import InputError
from prmtool.core.options import (
    ModelSettings,
    Split,
    TraceSettings,
    WorkerSettings,
    finite,
    positive,
    template,
    worker_count,
)
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary, Tracker
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.stage import Stage
from prmtool.engines import choice
from prmtool.engines.loading import EngineOnDemand
from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE
from prmtool.methods.steps import make_splitter, split_steps
from prmtool.methods.thinking import ThinkSplit, parse_think_tags, prompt_opens_thinking, split_trace, think_split_of

if TYPE_CHECKING:
    from prmtool.engines import Engine

RESPONSE_COLUMNS = ("response_id", "response", "steps", "response_tokens", "finish_reason")


def request_seed(seed: int, problem_id: str) -> int:
    """Each problem's own seed, so its samples do not depend on which other problems share
    its batch or shard."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{problem_id}".encode()).digest()[:4], "little")


def generate_rows(
    frame: pl.DataFrame,
    engine: "Engine",
    n: int = 4,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int = 0,
    system_prompt: str | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    stop: tuple[str, ...] = (),
    split: str = "blank-line",
    tracker: Tracker | None = None,
    think: ThinkSplit | None = None,
) -> pl.DataFrame:
    """Pure core: problem rows in, `n` response rows per problem out (problem columns kept).
    All problems of the frame go to the engine in one call. `--split think` also writes
    `thinking_steps` and `finished`; when the model's chat template ends its generation
    prompt with an opened thinking tag, the responses start inside the thinking."""
    from prmtool.engines import SamplingRequest

    splitter = make_splitter(split)
    requests = [
        SamplingRequest(
            prompt_ids=engine.chat_prompt_ids(problem, system_prompt, prompt_template),
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=tuple(stop),
            seed=request_seed(seed, problem_id),
        )
        for problem, problem_id in zip(frame["problem"], frame["problem_id"])
    ]
    done = 0

    def on_progress(requests_done: int, new_tokens: int) -> None:
        nonlocal done
        if tracker is not None:
            tracker.advance(requests_done - done, new_tokens)
        done = requests_done

    completions = engine.sample(requests, on_progress=on_progress)
    if split == "think":
        think = think or ThinkSplit()
        tokenizer = getattr(engine, "tokenizer", None)
        if requests and tokenizer is not None and hasattr(tokenizer, "decode"):
            opened = prompt_opens_thinking(tokenizer.decode(requests[0].prompt_ids[-16:]), think.tags)
            if opened is not None:
                think = ThinkSplit(think.min_step_tokens, think.max_steps, (opened,), opened=True)
    # Ids depend on the problem, the sample's index and every option that shaped it, so two
    # runs with different settings never produce colliding ids.
    settings = json.dumps([n, temperature, top_p, max_tokens, seed, system_prompt, prompt_template, list(stop)])
    rows = {c: [] for c in RESPONSE_COLUMNS}
    thinking = {"thinking_steps": [], "finished": []}
    for problem_id, samples in zip(frame["problem_id"], completions):
        for index, completion in enumerate(samples):
            rows["response_id"].append(hashlib.sha1(f"{problem_id}\x1f{settings}\x1f{index}".encode()).hexdigest()[:16])
            rows["response"].append(completion.text)
            if split == "think":
                trace = split_trace(completion.text, think)
                rows["steps"].append(trace.steps)
                thinking["thinking_steps"].append(trace.thinking_steps)
                # a solution cut at the token limit is not finished, whatever its tags say
                cut = completion.finish_reason == "length"
                thinking["finished"].append(None if trace.finished is None else trace.finished and not cut)
            else:
                rows["steps"].append(split_steps(completion.text, splitter))
            rows["response_tokens"].append(completion.num_tokens)
            rows["finish_reason"].append(completion.finish_reason)
    responses = pl.DataFrame(
        rows,
        schema={
            "response_id": pl.String,
            "response": pl.String,
            "steps": pl.List(pl.String),
            "response_tokens": pl.Int32,
            "finish_reason": pl.String,
        },
    )
    if split == "think":
        responses = responses.with_columns(
            pl.Series("thinking_steps", thinking["thinking_steps"], dtype=pl.Int32),
            pl.Series("finished", thinking["finished"], dtype=pl.Boolean),
        )
    repeated = frame.select(pl.all().repeat_by(n).explode()) if n > 1 else frame
    return pl.concat([repeated, responses], how="horizontal")


def _no_responses_yet(shard) -> None:
    present = [c for c in RESPONSE_COLUMNS if c in shard.schema]
    if present:
        raise InputError(f"{shard.path}: already has column '{present[0]}'; generate takes problem rows")


EXAMPLES = """\b
Examples:
  prmtool generate data_samples/gsm8k/problems -o work/responses --n 4 --max-tokens 256
  prmtool generate work/problems -o work/responses-1.5b --model ./Qwen2.5-Math-1.5B-Instruct --n 16 --verify
  prmtool generate work/problems -o work/responses-qa --prompt-template 'Q: {problem}\\nA:' --stop '\\n\\nQ:'
  prmtool generate work/problems -o work/traces --model ./R1-Distill-7B --split think --max-tokens 8192
"""


@dataclass(kw_only=True)
class GenerateSettings(ModelSettings, WorkerSettings, TraceSettings):
    n: Annotated[int, typer.Option("--n", help="Sampled responses per problem.", min=1)] = 4
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.", min=0, callback=finite)] = 0.7
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].", max=1, callback=positive)] = 1.0
    max_tokens: Annotated[int, typer.Option(help="Most tokens per response.", min=1)] = 1024
    seed: Annotated[int, typer.Option(help="Same seed and inputs give the same responses and ids.", min=0)] = 0
    system_prompt: Annotated[str | None, typer.Option(help="A system message before the problem.")] = None
    prompt_template: Annotated[
        str, typer.Option(help="The user message; {problem} is replaced by the problem.", callback=template)
    ] = DEFAULT_PROMPT_TEMPLATE
    stop: Annotated[
        list[str], typer.Option("--stop", help="A stop string (repeatable); excluded from the response.")
    ] = field(default_factory=list)
    split: Split = "blank-line"
    verify: Annotated[
        bool, typer.Option("--verify", help="Also run verify on the responses (needs reference_answer).")
    ] = False
    verify_timeout: Annotated[
        float,
        typer.Option(help="With --verify: seconds per comparison (at most an hour).", callback=positive, max=3600),
    ] = 5.0


def generate_frame(
    frame: pl.DataFrame, engine: Engine, settings: GenerateSettings | None = None, *, tracker: Tracker | None = None
) -> pl.DataFrame:
    """The per-frame core: problem rows in, `settings.n` response rows per problem out, every
    problem column kept; with `settings.verify`, graded as `prmtool verify` grades them."""
    settings = settings or GenerateSettings()
    result = generate_rows(
        frame,
        engine,
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        system_prompt=settings.system_prompt,
        prompt_template=settings.prompt_template,
        stop=stop_strings(settings.stop),
        split=settings.split,
        tracker=tracker,
        think=think_split_of(settings),
    )
    if settings.verify:
        from prmtool.methods.verification import verify_rows  # Math-Verify loads only when asked for

        result = verify_rows(
            result,
            timeout=settings.verify_timeout,
            workers=worker_count(settings.workers),
            tags=parse_think_tags(settings.think_tags),
        )
    return result


def stop_strings(stop: list[str]) -> tuple[str, ...]:
    """`--stop '\\n'` on the shell means a newline."""
    return tuple(s.encode().decode("unicode_escape") for s in stop)


def run(
    inputs: list[str], output: Path, settings: GenerateSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Sample N solutions per problem from a policy model. Each response row keeps every
    problem column and adds response_id, response, steps, response_tokens and finish_reason."""
    stats = RunStats("generate", quiet=quiet)
    prompt_tokens = choice.stage_prompt_tokens("generate", settings)
    picked = choice.resolve(settings.engine, settings.model, settings.device, prompt_tokens, "generate")
    settings = replace(settings, engine=picked.engine)
    make_splitter(settings.split)  # a bad --split fails before the model loads
    if settings.verify:
        worker_count(settings.workers, stats.warn)  # says so when --workers is capped
    parse_think_tags(settings.think_tags)
    stop = stop_strings(settings.stop)
    arguments = {
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_tokens": settings.max_tokens,
        "seed": settings.seed,
        "system_prompt": settings.system_prompt,
        "prompt_template": settings.prompt_template,
        "stop": list(stop),
        "split": settings.split,
        "verify": settings.verify,
        **(
            {
                "think_tags": settings.think_tags,
                "min_step_tokens": settings.min_step_tokens,
                "max_steps": settings.max_steps,
                "thinking_opened": settings.thinking_opened,
            }
            if settings.split == "think"
            else {}
        ),
        "model": settings.model,
        "engine": settings.engine,
    }
    required = ("problem_id", "problem") + (("reference_answer",) if settings.verify else ())
    engines = EngineOnDemand(
        settings.engine, settings.model, settings.device, settings.trust_remote_code, stats, why=picked.line()
    )

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        tokens_before = tracker.tokens
        tracker.expect_tokens_per_row(settings.n * settings.max_tokens)
        result = generate_frame(frame, engines.get(), settings, tracker=tracker)
        stats.counts["tokens_generated"] += tracker.tokens - tokens_before
        stats.counts.update(f"finish_{r}" for r in result["finish_reason"])
        if settings.verify:
            stats.counts["correct"] += int(result["correct"].sum())
        return result

    stage = MapStage(
        "generate",
        transform,
        arguments,
        required,
        unique_column="problem_id",
        rows_per_input=settings.n,
        extra_checks=[_no_responses_yet],
    )
    with engines:
        run_map_stage(stage, inputs, output, overwrite, stats, partition)
    seconds = stats.summary().seconds
    if seconds and stats.counts["tokens_generated"]:
        stats.counts["tokens_per_second"] = round(stats.counts["tokens_generated"] / seconds)
    return stats.finish()


STAGE = Stage("generate", GenerateSettings, run, EXAMPLES, required=("problem_id", "problem"))
