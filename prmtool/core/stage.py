"""The one shape every pipeline stage has, whatever it computes.

A stage is a name, a settings dataclass and a `run` function:

    run(inputs, output, settings, *, overwrite=False, quiet=False, partition=WHOLE) -> Summary

Settings are a `kw_only` dataclass with one field per option. Each field's annotation carries
its command-line form and help, as `Annotated[float, typer.Option(help=..., min=0)]`: the CLI
generates the stage's options from it (prmtool/cli/stage_command.py), and a Python caller gets
the same defaults and the same range checks (`check_settings`), so both are one definition.

    from prmtool.stages import stage
    verify = stage("verify")
    summary = verify.run(["work/responses"], "work/verified", verify.settings(timeout=2))
    summary = verify("work/responses", "work/verified", timeout=2)  # the same, settings as keywords
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prmtool.core.errors import InputError
from prmtool.core.partition import Partition
from prmtool.core.report import Summary

WHOLE = Partition()


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand, e.g. "verify"
    settings: type  # its settings dataclass; `settings()` gives the defaults
    body: Callable[..., Summary]  # body(inputs, output, settings, *, overwrite, quiet, partition)
    examples: str  # shell examples, shown under `prmtool NAME --help`
    required: tuple[str, ...] = ()  # input columns it needs
    # The command line's first argument and -o, where a stage reads or writes something other
    # than shards (import reads JSONL and datasets folders): None takes prmtool.core.options'.
    inputs_option: Any = None
    output_option: Any = None
    # check(settings): the checks of option values that depend on each other or on a list of
    # words (--method, --format), raising InputError; run before any input is read.
    check: Callable[[Any], Any] | None = None
    # `-o -` streams the output rows to standard output as JSON lines (export); every other
    # stage writes a directory of shards, and refuses `-o -` rather than make a folder named `-`.
    streams_to_stdout: bool = False
    # False for a stage that must read all its input in one run (train): no --shard-index,
    # --num-shards or Ray tasks.
    partitions: bool = True
    one_run_hint: str = ""  # said with that refusal: how such a stage uses several GPUs instead

    @property
    def help(self) -> str:
        """What the stage computes: the body's docstring, shown by `--help`."""
        return self.body.__doc__ or ""

    def run(
        self,
        inputs: str | Path | list[str | Path],
        output: str | Path,
        settings: Any = None,
        *,
        overwrite: bool = False,
        quiet: bool = False,
        partition: Partition | tuple[int, int] = WHOLE,
        allow_incomplete: bool = False,
    ) -> Summary:
        """Run the stage over `inputs` (files, directories or globs) into the directory `output`,
        or over one partition of them: `partition=(index, count)`, as `--shard-index`.
        `allow_incomplete`: read input folders a prmtool run left without `_SUCCESS`."""
        from prmtool.core.shards import READ_INCOMPLETE

        settings = self.settings() if settings is None else settings
        self.check_output(output)
        if not isinstance(settings, self.settings):
            raise InputError(f"{self.name}: settings must be a {self.settings.__name__}, not {type(settings).__name__}")
        self.validate(settings)
        if isinstance(partition, tuple):
            partition = Partition.of(*partition)
        self.check_partitioned(not partition.whole)
        paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        allowed = READ_INCOMPLETE.set(allow_incomplete)
        try:
            return self.body(
                [str(path) for path in paths],
                Path(output),
                settings,
                overwrite=overwrite,
                quiet=quiet,
                partition=partition,
            )
        finally:
            READ_INCOMPLETE.reset(allowed)

    def check_output(self, output: str | Path) -> None:
        """Refuse `-o -` where the stage writes shards, not rows to standard output."""
        if str(output) == "-" and not self.streams_to_stdout:
            raise InputError(
                f"-o -: {self.name} writes a directory of Parquet shards, not a stream; give -o DIR, then "
                f"`prmtool export DIR -o - --format jsonl` streams its rows as JSON lines"
            )

    def validate(self, settings: Any) -> None:
        """Every check of `settings` that needs no input: ranges, callbacks and `check`.
        `prmtool run` calls it for every stage of a recipe before the first one runs."""
        check_settings(settings)
        if self.check is not None:
            self.check(settings)

    def __call__(
        self,
        inputs,
        output,
        *,
        overwrite: bool = False,
        quiet: bool = False,
        partition=WHOLE,
        allow_incomplete: bool = False,
        **options,
    ):
        """`prmtool.verify("in", "out", timeout=2)`: settings given as keywords."""
        fields = {f.name for f in dataclasses.fields(self.settings)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InputError(f"{self.name}: unknown setting {unknown[0]!r} (settings: {', '.join(sorted(fields))})")
        try:
            settings = self.settings(**options)
        except TypeError as error:  # a required setting left out
            raise InputError(f"{self.name}: {error}") from None
        return self.run(
            inputs,
            output,
            settings,
            overwrite=overwrite,
            quiet=quiet,
            partition=partition,
            allow_incomplete=allow_incomplete,
        )

    def check_partitioned(self, partitioned: bool) -> None:
        """Refuse to run a stage that reads all its input in one run (train) on a part of it."""
        if partitioned and not self.partitions:
            raise InputError(
                f"{self.name} reads all its input in one run: --shard-index/--num-shards/--executor ray do not apply"
                + (self.one_run_hint and f" ({self.one_run_hint})")
            )

    def __getattr__(self, name: str):
        # The stage's module holds its per-frame core: `prmtool.label.label_frame(df, engine)`.
        if name.startswith("__"):
            raise AttributeError(name)
        module = importlib.import_module(self.body.__module__)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"stage {self.name!r} has no attribute {name!r}") from None


# --- settings ---------------------------------------------------------------------------------


def option_fields(settings_class: type) -> list[dataclasses.Field]:
    """The fields in the order the command line lists them: a class's own fields first, then
    those of each base class in the order the bases are named (`class LabelSettings(
    ModelSettings, WorkerSettings)` puts the model options, then --workers, after its own)."""
    own = vars(settings_class).get("__annotations__", {})
    by_name = {f.name: f for f in dataclasses.fields(settings_class)}
    ordered = [by_name[name] for name in own if name in by_name]
    for base in settings_class.__bases__:
        if dataclasses.is_dataclass(base):
            ordered += [f for f in option_fields(base) if f not in ordered]
    return ordered


def option_types(settings_class: type) -> dict[str, Any]:
    """Each field's resolved annotation, `Annotated[type, typer.Option(...)]`."""
    return typing.get_type_hints(settings_class, include_extras=True)


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def flag_of(name: str, option) -> str:
    """The option as typed: `--k`, `--output`; typer keeps the first name in `default`."""
    names = [option.default] if isinstance(option.default, str) else []
    names += list(getattr(option, "param_decls", None) or [])
    long = [n for n in names if n.startswith("--")]
    return long[0] if long else "--" + name.replace("_", "-")


def check_settings(settings: Any) -> None:
    """The checks the command line makes on each option, for settings built in Python: the
    option's range (`min`, `max`) and its callback (`finite`, `positive`, ...)."""
    import typer

    for name, annotation in option_types(type(settings)).items():
        option = _option_info(annotation)
        value = getattr(settings, name)
        if option is None or value is None:
            continue
        flag = flag_of(name, option)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and math.isnan(item) and (option.min is not None or option.max is not None):
                raise InputError(f"{flag} {item}: must be a number")
            if option.min is not None and isinstance(item, (int, float)) and item < option.min:
                raise InputError(f"{flag} {item}: must be at least {option.min}")
            if option.max is not None and isinstance(item, (int, float)) and item > option.max:
                raise InputError(f"{flag} {item}: must be at most {option.max}")
        if option.callback is not None:
            try:
                option.callback(value)
            except typer.BadParameter as error:
                raise InputError(f"{flag} {value}: {error.message}") from None


def _option_info(annotation):
    import typer.models

    for extra in getattr(annotation, "__metadata__", ()):
        if isinstance(extra, typer.models.ParameterInfo):
            return extra
    return None
