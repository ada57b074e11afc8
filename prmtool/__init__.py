"""prmtool: curate process-supervision data for LLM reasoning.

Every command of the CLI is a function here, with the command's options as keyword arguments
(dashes become underscores) and the closing summary as its return value:

    import prmtool
    summary = prmtool.verify("work/responses", "work/verified", timeout=2)
    summary.rows_out, summary.counts["correct"]

`prmtool.import_` is `prmtool import` (import is a Python keyword). Each stage also carries its
per-frame core, rows in and rows out with the engine passed in, e.g.
`prmtool.label.label_frame(frame, engine, prmtool.label.settings(k=4))`; see README.md,
"Python API". Attributes load on first use, so `import prmtool` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Python name -> command name
_STAGES = {
    "import_": "import",
    "generate": "generate",
    "verify": "verify",
    "label": "label",
    "score": "score",
    "filter": "filter",
    "intervene": "intervene",
    "export": "export",
    "train": "train",
}

__all__ = [
    *_STAGES, "evaluation", "stage", "load_engine", "Partition", "Summary", "InputError", "StageError", "__version__"
]  # fmt: skip


def __getattr__(name: str):
    if name in _STAGES:
        from prmtool.stages import stage

        return stage(_STAGES[name])
    if name == "evaluation":  # `prmtool eval`'s metrics as functions of plain lists
        from prmtool.methods import evaluation

        return evaluation
    if name == "stage":
        from prmtool.stages import stage

        return stage
    if name == "load_engine":
        from prmtool.engines import load_engine

        return load_engine
    if name == "Partition":
        from prmtool.core.partition import Partition

        return Partition
    if name == "Summary":
        from prmtool.core.report import Summary

        return Summary
    if name in ("InputError", "StageError"):
        from prmtool.core import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'prmtool' has no attribute {name!r}")
