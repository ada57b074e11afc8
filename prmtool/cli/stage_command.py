"""A stage's subcommand, generated from its `Stage`: the arguments and options are the settings
dataclass's fields, between the input and -o at the front and --overwrite, --quiet and the
scale-out options (`ScaleOut`) at the end, which every pipeline command shares."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Callable

from prmtool.cli import estimate
from prmtool.core.options import AllowIncomplete, Inputs, Output, Overwrite, Quiet, ScaleOut
from prmtool.core.stage import Stage, default_of, option_fields, option_types
from prmtool.executors import run_stage

_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _parameters(settings_class: type) -> list[inspect.Parameter]:
    types = option_types(settings_class)
    parameters = []
    for field in option_fields(settings_class):
        default = default_of(field)
        default = inspect.Parameter.empty if default is dataclasses.MISSING else default
        parameters.append(inspect.Parameter(field.name, _KEYWORD, default=default, annotation=types[field.name]))
    return parameters


@dataclasses.dataclass
class StageCall:
    """One stage's command line, parsed: what `Stage.run` and the executors take."""

    stage: Stage
    inputs: list
    output: object
    settings: object
    overwrite: bool = False
    quiet: bool = False
    allow_incomplete: bool = False
    scale_out: ScaleOut = dataclasses.field(default_factory=ScaleOut)

    def run(self):
        """Run it where the scale-out options say (this process, one partition, or Ray tasks);
        a model stage's tokens per second are remembered for `prmtool run --dry-run`."""
        summary = run_stage(
            self.stage,
            self.inputs,
            self.output,
            self.settings,
            overwrite=self.overwrite,
            quiet=self.quiet,
            allow_incomplete=self.allow_incomplete,
            **dataclasses.asdict(self.scale_out),
        )
        generated = summary.counts.get("tokens_generated", 0) if summary is not None else 0
        if generated and self.stage.name in estimate.MODEL_STAGES:
            whole = summary.rows_in if not summary.shards_skipped else None  # a resumed run's rows cost less
            estimate.record_throughput(self.settings, generated, summary.seconds, stage=self.stage.name, rows=whole)
        return summary


def stage_call(stage: Stage, options: dict) -> StageCall:
    """The parsed options of `stage`'s command (click's `ctx.params`), sorted into a StageCall."""
    options = dict(options)
    common = {name: options.pop(name) for name in ("inputs", "output", "overwrite", "quiet", "allow_incomplete")}
    # A stage that reads all its input in one run (train) has no scale-out options.
    scale_out = ScaleOut(**{f.name: options.pop(f.name) for f in dataclasses.fields(ScaleOut) if f.name in options})
    return StageCall(
        stage, settings=stage.settings(**_as_paths(stage.settings, options)), scale_out=scale_out, **common
    )


def _as_paths(settings_class: type, options: dict) -> dict:
    """click's own parse (`make_context`, as recipes use it) leaves path options as text in some
    typer versions; the settings hold them as `Path`, as the command line gives them."""
    types = option_types(settings_class)
    converted = dict(options)
    for name, value in options.items():
        declared = types.get(name)
        if typing.get_origin(declared) is typing.Annotated:
            declared = typing.get_args(declared)[0]
        if isinstance(value, str) and Path in (declared, *typing.get_args(declared)):
            converted[name] = Path(value)
    return converted


def stage_command(stage: Stage) -> Callable[..., None]:
    """The typer command of `stage`."""

    def command(**options) -> None:
        stage_call(stage, options).run()

    command.__name__ = stage.name
    command.__doc__ = stage.help
    command.__signature__ = inspect.Signature(
        [
            inspect.Parameter("inputs", _KEYWORD, annotation=stage.inputs_option or Inputs),
            inspect.Parameter("output", _KEYWORD, annotation=stage.output_option or Output),
            *_parameters(stage.settings),
            inspect.Parameter("overwrite", _KEYWORD, default=False, annotation=Overwrite),
            inspect.Parameter("quiet", _KEYWORD, default=False, annotation=Quiet),
            inspect.Parameter("allow_incomplete", _KEYWORD, default=False, annotation=AllowIncomplete),
            *(_parameters(ScaleOut) if stage.partitions else []),
        ]
    )
    return command
