"""One module per pipeline stage: a pure core (rows in, rows out, engine passed in) and a thin
typer `command` with its `EXAMPLES`. `STAGES` is the registry the command line, recipes and
executors read: adding a stage is one module here plus one line below.

Modules are imported on first use: a stage's options come from `prmtool.cli.options`, and the
command line imports the stages."""

from __future__ import annotations

import importlib
from types import ModuleType

# name on the command line -> module, in pipeline order
STAGES: dict[str, str] = {
    "import": "prmtool.stages.import_",
    "generate": "prmtool.stages.generate",
    "verify": "prmtool.stages.verify",
    "label": "prmtool.stages.label",
    "score": "prmtool.stages.score",
    "filter": "prmtool.stages.filter",
    "intervene": "prmtool.stages.intervene",
    "export": "prmtool.stages.export",
    "stats": "prmtool.stages.stats",
}
# The stages a recipe may run: each reads shards and writes a directory of them.
PIPELINE_STAGES = tuple(name for name in STAGES if name != "stats")


def stage_module(name: str) -> ModuleType:
    """The module of stage `name`: its `command`, `EXAMPLES` and pure core."""
    return importlib.import_module(STAGES[name])
