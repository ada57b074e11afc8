"""The pipeline stages, one module each: a settings dataclass, a pure per-frame core (rows in,
rows out, engine passed in) and a `run` body, joined in the module's `STAGE`
(prmtool/core/stage.py). `STAGES` is the registry the command line, recipes and the Ray
executor read: adding a stage is one module here plus one line below.

Modules are imported on first use, so `prmtool --help` and `prmtool verify` load no model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prmtool.core.stage import Stage

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
    "train": "prmtool.stages.train",
}


def stage(name: str) -> Stage:
    """The stage called `name` on the command line."""
    return importlib.import_module(STAGES[name]).STAGE
