"""`prmtool run RECIPE.yaml`: a whole pipeline as one resumable command.

A recipe names a work directory and lists stages; each stage is the same subcommand a user
would type, with the options written as YAML keys:

    workdir: work/quickstart
    input: data_samples/gsm8k/test_sample.jsonl    # the first stage's input
    stages:
      - stage: import
        preset: gsm8k
      - stage: generate
        n: 2
        max-tokens: 128
      - stage: filter
        rejects: "{workdir}/06-filter-rejects"      # {workdir} and {dir} (this stage's output)

A top-level `model:` (or `prmtool run --model`) is the policy model of every stage that takes
one and does not name its own: generate's, label's and intervene's --model, score's --policy.
A top-level `engine:` (or `--engine`) is those stages' --engine, likewise.

Stage number i writes `WORKDIR/NN-NAME/` (NAME: the stage, or its `name:`) and reads the
previous stage's output unless its `input:` names an earlier stage or a path. Options: `key:
value` becomes `--key value`, `key: true` the flag `--key`, `key: false` nothing (or `--no-key`
for a switch that is on by default, such as label's `speculate`), a list a repeated option.

What runs: before a stage runs, its exact command line and a fingerprint of each input (an
upstream `_SUCCESS` manifest less its time stamp, or a hash of a file's bytes) are recorded in
`NN-NAME/_RECIPE.json`. A stage whose `_SUCCESS` and record both match is skipped; a changed
option or input reruns it with --overwrite, and since its manifest then changes, every later
stage too (options that change only its speed, SPEED_ONLY, rerun nothing); a stage interrupted
mid-way resumes from its finished shards.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from prmtool.cli import estimate
from prmtool.core import shards
from prmtool.core.errors import InputError, StageError, exit_code_of
from prmtool.core.options import worker_count
from prmtool.core.outputs import check_outputs, exclusive_lock, input_roots, plain_name
from prmtool.engines.choice import one_engine_per_model
from prmtool.engines.loading import keep_models_loaded
from prmtool.methods.verification import start_workers
from prmtool.stages import STAGES

RESERVED = {"stage", "name", "input"}
# Options the recipe sets itself (-o is the stage's folder, eval's --json its report) or that
# would stop the stage instead of running it (--help, --version): a recipe may not set them.
RECIPES_OWN = {"output", "o", "json", "overwrite", "help", "h", "version"}
# Commands a recipe may end with that read a stage's output and write a report, not shards:
# the report file stands in for _SUCCESS.
REPORTS = {"eval": "eval.json"}
RECORD = "_RECIPE.json"
# The option each stage takes the policy model by (a recipe's `model:` fills it in).
POLICY_OPTION = {"generate": "model", "label": "model", "intervene": "model", "score": "policy"}
# Stages that verify rollouts in worker processes while a model is loaded.
VERIFY_ROLLOUTS = {"label", "intervene"}


@dataclass
class Step:
    number: int  # 1-based, as in the directory name
    stage: str
    name: str
    inputs: list[str]  # paths, resolved
    options: dict
    directory: Path

    @property
    def label(self) -> str:
        return f"{self.number:02d}-{self.name}"

    def argv(self) -> list[str]:
        """The command line, as a user would type it after `prmtool`."""
        if self.stage in REPORTS:
            argv = [self.stage, *self.inputs, "--json", str(self.directory / REPORTS[self.stage])]
        else:
            argv = [self.stage, *self.inputs, "-o", str(self.directory)]
        for key, value in self.options.items():
            flag = f"--{key}"
            if value is True:
                argv.append(flag)
            elif value is False:
                argv += [f"--no-{key}"] if f"--no-{key}" in switches_off(self.stage) else []
            elif value is None:
                continue
            elif isinstance(value, list):
                for item in value:
                    argv += [flag, _text(item)]
            else:
                argv += [flag, _text(value)]
        return argv


@dataclass
class Recipe:
    path: Path
    workdir: Path
    steps: list[Step] = field(default_factory=list)

    def find(self, name: str, option: str) -> Step:
        for step in self.steps:
            if name in (step.name, step.label, step.stage):
                return step
        raise InputError(
            f"{self.path}: {option} {name!r}: no such stage (stages: {', '.join(s.label for s in self.steps)})"
        )


@functools.cache
def switches_off(stage: str) -> frozenset[str]:
    """The `--no-KEY` halves of a stage's on-by-default switches (label's `--no-speculate`):
    what `key: false` turns into, where a missing flag would leave the switch on."""
    import typer.main

    from prmtool.cli.commands import app

    command = typer.main.get_command(app).commands.get(stage)
    return frozenset(opt for param in getattr(command, "params", []) for opt in getattr(param, "secondary_opts", []))


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def load_recipe(
    path: Path,
    overrides: list[str] = (),
    workdir: Path | None = None,
    model: str | None = None,
    engine: str | None = None,
) -> Recipe:
    """Parse and check a recipe; `overrides` are `stage.option=value` (`--set`), `model` and
    `engine` replace the recipe's `model:` and `engine:`."""
    document = read_yaml(path)
    if not isinstance(document, dict) or not isinstance(document.get("stages"), list) or not document["stages"]:
        raise InputError(f"{path}: a recipe is a mapping with a non-empty `stages:` list")
    unknown = set(document) - {"workdir", "input", "model", "engine", "stages", "description"}
    if unknown:
        raise InputError(
            f"{path}: unknown top-level key {sorted(unknown)[0]!r} (expected workdir, input, model, engine, stages, "
            f"description)"
        )
    for key in ("workdir", "input", "model", "engine", "description"):
        if document.get(key) is not None and not isinstance(document[key], str):  # `workdir: 123`
            raise InputError(f"{path}: {key}: expected a path or name as text, not {document[key]!r}")
    model = model or document.get("model")
    engine = engine or document.get("engine")
    recipe = Recipe(path=path, workdir=Path(workdir or document.get("workdir") or "work"))
    if recipe.workdir.exists() and not recipe.workdir.is_dir():
        raise InputError(f"{recipe.workdir}: the workdir exists and is not a directory")
    previous: list[str] | None = None
    if document.get("input") is not None:
        previous = [beside(path, document["input"])]
    names: dict[str, Step] = {}
    for number, entry in enumerate(document["stages"], start=1):
        where = f"{path}: stage {number}"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise InputError(f"{where}: each stage is a mapping with a `stage:` key")
        stage = entry["stage"]
        if stage not in STAGES and stage not in REPORTS:
            known = ", ".join([*STAGES, *REPORTS])
            raise InputError(f"{where}: unknown stage {stage!r} (expected one of {known})")
        name = plain_name(str(entry.get("name") or stage), f"{where}: name:")  # it names a directory
        if name in names:
            raise InputError(f"{where}: a second stage named {name!r}; give one a `name:`")
        directory = recipe.workdir / f"{number:02d}-{name}"
        inputs = _stage_inputs(entry.get("input"), names, previous, where, path)
        options = {str(k): v for k, v in entry.items() if k not in RESERVED}
        if model is not None and stage in POLICY_OPTION:
            options.setdefault(POLICY_OPTION[stage], str(model))  # a stage's own model wins
        if engine is not None and stage in POLICY_OPTION:
            options.setdefault("engine", str(engine))
        step = Step(number, stage, name, inputs, options, directory)
        names[name] = names[step.label] = step
        recipe.steps.append(step)
        previous = [str(directory)]
    for override in overrides:
        _apply_override(recipe, override)
    for step in recipe.steps:
        owned = sorted(RECIPES_OWN & set(step.options))
        if owned:
            raise InputError(
                f"{path}: stage {step.label}: {owned[0]}: not an option a recipe may give (it sets -o WORKDIR/NN-NAME "
                "and --overwrite itself, and --help or --version would stop the stage instead of running it)"
            )
    for step in recipe.steps:  # placeholders last, so --set values may use them too
        step.options = {k: _fill(v, recipe.workdir, step.directory) for k, v in step.options.items()}
    return recipe


EXPANDED_NODES_MAX = 10_000  # a recipe is a few dozen nodes; aliases may not blow it up


def read_yaml(path: Path):
    """A recipe's YAML, refusing undecodable bytes and aliases that expand past a small size (a
    few hundred bytes of nested aliases can stand for billions of nodes)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > EXPANDED_NODES_MAX:
                raise InputError(
                    f"{path}: its aliases expand past {EXPANDED_NODES_MAX:,} YAML nodes; write the recipe out"
                )
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None
    except RecursionError:
        raise InputError(f"{path}: its YAML nests too deeply") from None


def _expanded_size(node, sizes: dict) -> int:
    """Nodes in the document once every alias is written out; each shared node counted once."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = EXPANDED_NODES_MAX + 1  # a node that contains itself expands forever
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = min(size, EXPANDED_NODES_MAX + 1)
    return sizes[id(node)]


def beside(recipe_path: Path, spec) -> str:
    """An input path written in a recipe, relative to the recipe file (so a recipe runs the same
    from any directory); absolute paths stay as they are."""
    text = str(spec)
    if os.path.isabs(text) or text == "-":
        return text
    return os.path.normpath(recipe_path.parent / text)


def _stage_inputs(spec, names: dict[str, Step], previous: list[str] | None, where: str, path: Path) -> list[str]:
    if spec is None:
        if previous is None:
            raise InputError(f"{where}: no input: give the recipe an `input:` or the stage one")
        return previous
    specs = spec if isinstance(spec, list) else [spec]
    # An earlier stage's name stands for its output directory; anything else is a path.
    return [str(names[s].directory) if s in names else beside(path, s) for s in map(str, specs)]


def _apply_override(recipe: Recipe, override: str) -> None:
    target, equals, raw = override.partition("=")
    stage_name, dot, option = target.partition(".")
    if not equals or not dot or not option:
        raise InputError(f"--set {override!r}: expected STAGE.OPTION=VALUE, e.g. --set generate.n=8")
    step = recipe.find(stage_name, "--set")
    value = yaml.safe_load(raw) if raw else ""
    if option == "input":
        step.inputs = [str(v) for v in (value if isinstance(value, list) else [value])]
    else:
        step.options[option] = value


def _fill(value, workdir: Path, directory: Path):
    if isinstance(value, str):
        return value.replace("{workdir}", str(workdir)).replace("{dir}", str(directory))
    if isinstance(value, list):
        return [_fill(v, workdir, directory) for v in value]
    return value


# ---------------------------------------------------------------------------- planning


def fingerprint(path: str) -> str:
    """What an input is, for deciding whether a stage must rerun: a stage directory by its
    `_SUCCESS` manifest (less the time stamp), a file by a hash of its bytes, another directory
    by its files' sizes and times."""
    source = Path(path)
    manifest = shards.read_manifest(source) if source.is_dir() else None
    if manifest is not None:
        manifest.pop("finished", None)
        text = json.dumps(manifest, sort_keys=True)
    elif source.is_dir():
        files = sorted(f for f in source.rglob("*") if f.is_file() and not f.name.startswith("."))
        text = json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    elif source.exists():  # by content: a file edited in place, even to the same size, is new
        text = json.dumps([str(source.resolve()), shards.content_digest(source)])
    else:
        text = "missing"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Options that change how a stage runs, never what it writes (no stage's manifest holds them),
# each with whether it takes a value: a recipe changed only in these skips the stage as it was.
SPEED_ONLY = {
    "--workers": True,
    "--rounds": True,
    "--speculate": False,
    "--no-speculate": False,
    "--executor": True,
    "--gpus-per-task": True,
    "--cpus-per-task": True,
}


def deciding_argv(argv: list[str]) -> list[str]:
    """A stage's command line less its SPEED_ONLY options: what decides whether it reruns."""
    kept, skip_value = [], False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token in SPEED_ONLY:
            skip_value = SPEED_ONLY[token]
        else:
            kept.append(token)
    return kept


def record_of(step: Step) -> dict:
    return {"argv": step.argv(), "inputs": {p: fingerprint(p) for p in step.inputs}}


def read_record(step: Step) -> dict | None:
    try:
        return json.loads((step.directory / RECORD).read_text())
    except (OSError, ValueError):
        return None


def decide(step: Step, forced: bool) -> str:
    """skip (complete and unchanged), resume (interrupted, unchanged), run (new) or rerun
    (changed options or input, or --from: recomputed with --overwrite)."""
    old = read_record(step)
    complete = (step.directory / REPORTS.get(step.stage, shards.MANIFEST)).exists()
    if forced:
        return "rerun" if complete or old is not None else "run"
    if old is not None and old.get("pending_overwrite"):
        return "rerun"  # an --overwrite rerun was interrupted: its old shards are stale
    new = record_of(step)
    same = (
        old is not None
        and isinstance(old.get("argv"), list)
        and deciding_argv(old["argv"]) == deciding_argv(new["argv"])
        and old.get("inputs") == new["inputs"]
    )
    if same:
        return "skip" if complete else "resume"
    if old is None and not complete and not step.directory.exists():
        return "run"
    return "rerun"


# ---------------------------------------------------------------------------- running

EXAMPLES = """\b
Examples:
  prmtool run recipes/quickstart.yaml
  prmtool run recipes/quickstart.yaml --dry-run
  prmtool run recipes/quickstart.yaml --model ./Qwen2.5-Math-1.5B-Instruct --workdir runs/qwen
  prmtool run recipes/quickstart.yaml --model ./Qwen2.5-Math-1.5B-Instruct --engine vllm --workdir runs/qwen-vllm
  prmtool run recipes/gsm8k-7b.yaml --model ./Qwen2.5-7B-Instruct --dry-run
  prmtool run recipes/prof.yaml --set generate.n=16 --set filter.remove=8 --workdir runs/prof-n16
  prmtool run recipes/omegaprm-gsm8k.yaml --from label --until export
"""


def command(
    recipe_path: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="A recipe YAML file (see recipes/).", show_default=False)
    ],
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="Recompute this stage and every later one, even if complete.", show_default=False),
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.", show_default=False)] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (each stage's command and what will happen) and stop.")
    ] = False,
    overrides: Annotated[
        list[str], typer.Option("--set", help="Override an option: STAGE.OPTION=VALUE (repeatable).")
    ] = [],
    tokens_per_second: Annotated[
        float | None,
        typer.Option(
            "--tokens-per-second",
            help=(
                "--dry-run: the generation throughput to estimate times with (default: what earlier runs "
                "measured here for the stage's model, engine and device)."
            ),
            min=0.001,
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=(
                "The policy model of every stage that takes one (generate, label, intervene; score's --policy), "
                "unless the stage names its own."
            ),
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="The engine (hf, vllm or auto) of every stage that runs a model, unless the stage names its own.",
            show_default=False,
        ),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Work directory (default: the recipe's workdir).", show_default=False),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Pass --quiet to every stage; print only the plan lines.")
    ] = False,
) -> None:
    """Run a pipeline recipe: each stage writes WORKDIR/NN-STAGE/; complete, unchanged stages
    are skipped, changed ones rerun with everything after them, interrupted ones resume."""
    console = Console(stderr=True, highlight=False)
    from prmtool.cli.commands import typed_argv

    typed = typed_argv.get()
    recipe = load_recipe(recipe_path, overrides, workdir, model, engine)
    check_recipe(recipe)  # every stage's options and inputs, before the first stage runs
    first = recipe.find(from_stage, "--from").number if from_stage else None
    last = recipe.find(until, "--until").number if until else len(recipe.steps)
    if first is not None and first > last:
        raise InputError(f"--from {from_stage} comes after --until {until}")
    # engines, devices and models checked before any record is touched; one engine per model
    try:
        engines = preflight(recipe, first, last)
    except InputError as exc:
        if not dry_run:
            raise
        engines = {}
        console.print(f"note: the run would stop before its first stage: {exc}", markup=False, soft_wrap=True)
    # One run of a workdir at a time: a second `prmtool run` there fails at once, touching nothing.
    held = contextlib.nullcontext() if dry_run else exclusive_lock(recipe.workdir, "`prmtool run`")
    with held, keep_models_loaded(), one_engine_per_model(engines):  # a model loaded once serves every stage
        _run_steps(recipe, recipe_path, first, last, dry_run, quiet, console, typed, tokens_per_second)


def check_recipe(recipe: Recipe) -> None:
    """Parse every stage's command line as the stage itself will (unknown options, values of
    the wrong type or out of range), check that inputs no stage produces exist, and that the
    workdir is a place the recipe may write. All before any stage runs, in --dry-run too."""
    produced = {os.path.abspath(step.directory) for step in recipe.steps}  # and, as they come, side outputs
    external: list[str] = []
    written: dict[str, Path] = {}  # every path a stage writes, by stage and option
    for step in recipe.steps:
        call = parse_step(recipe, step, step.argv())
        try:
            if not isinstance(call, ReportCall):
                call.stage.validate(call.settings)
        except InputError as exc:
            raise InputError(f"{recipe.path}: stage {step.label}: {exc}") from None
        for spec in step.inputs:
            if os.path.abspath(spec) in produced:
                continue
            if not (glob.glob(spec) if glob.has_magic(spec) else Path(spec).exists()):
                raise InputError(f"{recipe.path}: stage {step.label}: input {spec}: no such file or directory")
            external.append(spec)
        written[f"stage {step.label}"] = step.directory
        values = {} if isinstance(call, ReportCall) else vars(call.settings)  # a report writes in its folder
        for name, value in values.items():  # --rejects, --tree-output, --hf-dataset, --report: paths it writes
            if isinstance(value, Path) and str(value) != "-":
                written[f"stage {step.label} --{name.replace('_', '-')}"] = value
                produced.add(os.path.abspath(value))  # a later stage may read it (an earlier stage's rejects)
    check_outputs(input_roots(external), {"--workdir": recipe.workdir})
    # No stage may write into another's folder (a `rejects:` that is a later stage's output
    # would be cleared by that stage's --overwrite), nor two stages to one path.
    try:
        check_outputs(input_roots(external), {what: path for what, path in written.items() if what.count(" ") > 1})
        check_outputs([], written)
    except InputError as exc:
        raise InputError(f"{recipe.path}: {exc}") from None


def preflight(recipe: Recipe, first: int | None, last: int) -> dict:
    """Check what the stages that will run need and no option can show wrong: each model's
    engine installed, its device there, its files on disk and its config loading. A run that
    would fail there fails here instead, before any stage's record or output is touched, so the
    records of a finished run stay as they were. Returns the engine `--engine auto` gives each
    model in every stage of the recipe, finished or not, up to --until or past it (`choice.agree`)."""
    from prmtool.engines import check_loadable, choice

    automatic = []  # (model, prompt tokens, choice) of each stage's model on --engine auto
    rerun_since = first  # as _run_steps decides: once a stage reruns, every later one does
    made: list[Path] = []  # the folders earlier stages write: a model there (train's) comes later
    for step in recipe.steps:
        made_here, made = made, made + [step.directory.resolve()]
        if step.number > last:
            action = "skip"  # after --until: not run, but its model still counts in the agreement
        else:
            action = decide(step, rerun_since is not None and step.number >= rerun_since)
        if action in ("run", "rerun") and rerun_since is None:
            rerun_since = step.number
        call = parse_step(recipe, step, step.argv())
        if isinstance(call, ReportCall):
            continue
        if action == "rerun":
            check_side_outputs_are_its_own(recipe, step, call.settings)
        for engine, model in models_of(step.stage, call.settings):
            if model is not None and any(_is_within(Path(model).resolve(), folder) for folder in made_here):
                continue  # written by an earlier stage of this run (a trained PRM): checked when loaded
            settings = call.settings
            prompt_tokens = choice.stage_prompt_tokens(step.stage, settings)
            try:
                # outside one_engine_per_model, auto gives each stage its own choice; agree() picks one.
                # An unknown engine name fails here.
                picked = choice.resolve(engine, model, settings.device, prompt_tokens, step.stage)
            except InputError as exc:
                if action == "skip":
                    continue
                raise InputError(f"{recipe.path}: stage {step.label}: {exc}") from None
            # A finished stage still takes part in the agreement, so a partial rerun (and a dry
            # run after a run) gets the engine the whole recipe ran on; only what runs is checked.
            if engine == choice.AUTO:
                automatic.append((model, prompt_tokens, picked))
            if action == "skip":
                continue
            try:
                check_loadable(
                    picked.engine, model, device=settings.device, trust_remote_code=settings.trust_remote_code
                )
            except InputError as exc:
                raise InputError(f"{recipe.path}: stage {step.label}: {exc}") from None
    return choice.agree(automatic)


def check_side_outputs_are_its_own(recipe: Recipe, step: Step, settings) -> None:
    """A stage reruns with --overwrite, which also replaces what is at its other output paths
    (--rejects, --tree-output, --hf-dataset): only where its own earlier run wrote them. A path
    changed in the recipe to one that holds something else (another run's output) is refused."""
    old = read_record(step) or {}
    earlier = {os.path.abspath(arg) for arg in old.get("argv", []) if isinstance(arg, str)}
    for name, value in vars(settings).items():
        if not isinstance(value, Path) or str(value) == "-" or not (value.exists() or value.is_symlink()):
            continue
        if os.path.abspath(value) not in earlier:
            option = f"--{name.replace('_', '-')}"
            raise InputError(
                f"{recipe.path}: stage {step.label}: {option} {value} exists and this stage's earlier run did not "
                "write it; the stage reruns with --overwrite, which would replace it: move it away or choose "
                "another path"
            )


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def models_of(stage: str, settings) -> list[tuple[str, str | None]]:
    """(engine, model) of every model a stage's settings load (None: the embedded model)."""
    if stage in ("generate", "intervene"):
        return [(settings.engine, settings.model)]
    if stage == "label":
        judge = settings.method in ("judge", "consensus") and settings.judge_model is not None
        return [(settings.engine, settings.model)] + [(settings.engine, settings.judge_model)] * judge
    if stage == "score" and settings.scorer == "implicit":
        return [(settings.engine, settings.policy)] + [(settings.engine, settings.ref)] * (settings.ref is not None)
    if stage == "score":
        return [("hf", settings.prm)]
    return []


@dataclass
class ReportCall:
    """A report step's command line, parsed (`prmtool eval` in a recipe)."""

    callback: object
    params: dict

    def run(self) -> None:
        self.callback(**self.params)


def parse_step(recipe: Recipe, step: Step, argv: list[str]):
    """A step's command line parsed by its stage's own command: a StageCall to run."""
    import typer.main

    from prmtool.cli.commands import ClickException, app
    from prmtool.cli.stage_command import stage_call
    from prmtool.stages import stage

    command = typer.main.get_command(app).commands[step.stage]
    try:
        context = command.make_context(step.stage, argv[1:])
        if step.stage in REPORTS:
            return ReportCall(command.callback, context.params)
        return stage_call(stage(step.stage), context.params)
    except ClickException as exc:
        raise InputError(f"{recipe.path}: stage {step.label}: {' '.join(exc.format_message().split())}") from None


def print_estimate(
    recipe: Recipe, step: Step, argv: list[str], sizes: dict, tokens_per_second: float | None, console: Console
) -> tuple[int | None, float | None]:
    """--dry-run: the stage's rows, generated tokens (at most) and time; returns the last two."""
    if step.stage in REPORTS:
        return 0, 0.0
    settings = parse_step(recipe, step, argv).settings
    given = [sizes.get(path) or estimate.count_input(path) for path in step.inputs]
    rows = None if any(g.rows is None for g in given) else sum(g.rows for g in given)
    problems = None if any(g.problems is None for g in given) else sum(g.problems for g in given)
    cost, sizes[str(step.directory)] = estimate.stage_cost(step.stage, settings, estimate.Size(rows, problems))
    line = f"    {'?' if rows is None else f'{rows:,}'} rows in"
    seconds = None
    if cost.tokens:
        measured = estimate.measured_throughput(settings, step.stage)
        rate = tokens_per_second or (measured or {}).get("tokens_per_second")
        line += f"; at most {cost.tokens:,} generated tokens ({cost.how})"
        likely = cost.tokens
        same_shape = measured is not None and measured.get("shape") == estimate.tokens_shape(settings)
        if measured and measured.get("rows") and rows and measured.get("source") == step.stage and same_shape:
            # the bound assumes every response wrong and every rollout to max-tokens; the latest
            # run of this stage here, with the same k, n and max-tokens, says what a row took
            per_row = measured["tokens"] / measured["rows"]
            likely = min(cost.tokens, round(per_row * rows))
            line += f"; likely about {likely:,} ({per_row:,.0f} a row in the latest run here)"
        if rate:
            seconds = likely / rate
            source = "given" if tokens_per_second else measured["basis"]
            bound = "about" if likely < cost.tokens else "at most"
            line += f"; {bound} {estimate.duration(seconds)} at {rate:,.0f} tokens/s ({source})"
        else:
            line += "; time unknown: give --tokens-per-second, or run a model stage of this model here once"
    elif cost.tokens is None:
        line += f"; generated tokens unknown ({cost.how})"
    else:
        line += f"; {cost.how}"
    console.print(line, markup=False, soft_wrap=True)
    return cost.tokens, seconds if cost.tokens else 0.0


def policy_models(recipe: Recipe) -> dict[str, list[str]]:
    """Policy model -> the stages that run it (the embedded model where a stage names none)."""
    models: dict[str, list[str]] = {}
    for step in recipe.steps:
        if step.stage in POLICY_OPTION:
            given = step.options.get(POLICY_OPTION[step.stage]) or step.options.get("model")
            models.setdefault(str(given) if given else "the embedded SmolLM2-135M-Instruct", []).append(step.label)
    return models


def _run_steps(
    recipe: Recipe,
    recipe_path: Path,
    first: int | None,
    last: int,
    dry_run: bool,
    quiet: bool,
    console: Console,
    typed: list[str] | None = None,
    tokens_per_second: float | None = None,
) -> None:
    started = time.perf_counter()
    sizes: dict[str, estimate.Size] = {}  # --dry-run: each stage's output, as estimated
    total_tokens, total_seconds, timed = 0, 0.0, True
    models = policy_models(recipe)
    if len(models) > 1:  # e.g. --set generate.model=X leaves the other stages on their own model
        listed = "; ".join(f"{', '.join(labels)}: {model}" for model, labels in models.items())
        console.print(
            f"note: the stages run different policy models ({listed}); --model gives them all one",
            markup=False,
            soft_wrap=True,
        )
    rerun_since: int | None = first  # once a stage reruns, every later one must
    summaries: dict = {}  # label -> Summary of the stages that ran now
    for step in recipe.steps[:last]:
        forced = rerun_since is not None and step.number >= rerun_since
        action = decide(step, forced)
        # A report has no --overwrite (it rewrites its one file) and prints only its table.
        flags = [] if step.stage in REPORTS else ["--overwrite"] * (action == "rerun") + ["--quiet"] * quiet
        argv = step.argv() + flags
        console.print(
            f"[{step.label}] {action:<6} prmtool {' '.join(_quote(a) for a in argv)}", markup=False, soft_wrap=True
        )
        if dry_run:
            tokens, seconds = print_estimate(recipe, step, argv, sizes, tokens_per_second, console)
            total_tokens += tokens or 0
            total_seconds += seconds or 0.0
            timed = timed and (seconds is not None or not tokens)
            continue
        if action == "skip":
            continue
        if action in ("run", "rerun") and rerun_since is None:
            rerun_since = step.number
        verifying = [later for later in recipe.steps[step.number - 1 : last] if later.stage in VERIFY_ROLLOUTS]
        if step.stage in POLICY_OPTION and verifying:
            # the verifier's workers are forked before the first model load starts threads here
            settings = parse_step(recipe, verifying[0], verifying[0].argv()).settings
            start_workers(worker_count(settings.workers))
        record = record_of(step)
        step.directory.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic({**record, "pending_overwrite": action == "rerun"}, step.directory / RECORD)
        stage_started = time.perf_counter()
        try:
            call = parse_step(recipe, step, argv)
            summary = call.run()  # the stage runs exactly as its printed command line
            if summary is not None:
                summaries[step.label] = summary
        except Exception as exc:
            known = exit_code_of(exc)
            if known is None:
                raise
            console.print(f"error: {known[1]}", markup=False, soft_wrap=True)
            again = "prmtool " + " ".join(_quote(a) for a in (typed or ["run", str(recipe_path)]))
            failure = StageError(
                f"stage {step.label} failed (exit {known[0]}); fix it and rerun `{again}` to resume from there"
            )
            failure.exit_code = known[0]  # run exits as the stage did: 2 for bad input
            raise failure from None
        shards.write_json_atomic({**record, "pending_overwrite": False}, step.directory / RECORD)
        console.print(f"[{step.label}] done in {time.perf_counter() - stage_started:.1f} s", markup=False)
    if dry_run:
        when = f"; {estimate.duration(total_seconds)} at the rates above" if timed and total_tokens else ""
        console.print(f"estimate: at most {total_tokens:,} generated tokens in all{when}", markup=False)
    if not dry_run:
        exports = [
            export_line(step, summaries.get(step.label)) for step in recipe.steps[:last] if step.stage == "export"
        ]
        console.print(
            f"recipe {recipe_path}: {last} stages complete in {time.perf_counter() - started:.1f} s; outputs under "
            f"{recipe.workdir}/" + (f"; {', '.join(exports)}" if exports else ""),
            markup=False,
            soft_wrap=True,
        )


def export_line(step: Step, summary) -> str:
    """`07-export-prm/: 16 rows (12 problems)`: what an export holds, from its manifest (the
    problem count only when it ran now: the manifest does not keep it)."""
    manifest = shards.read_manifest(step.directory)
    rows = sum(entry["rows"] for entry in (manifest or {}).get("outputs", []))
    problems = f" ({plural(summary.problems, 'problem')})" if summary is not None else ""
    return f"{step.label}/: {plural(rows, 'row')}{problems}"


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _quote(argument: str) -> str:
    import shlex

    return shlex.quote(argument)
