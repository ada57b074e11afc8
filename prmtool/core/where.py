"""`--where`: a SQL-style row condition, parsed by polars (never evaluated as Python), checked
against every input's schema before any output is written."""

from __future__ import annotations

import polars as pl

from prmtool.core import shards
from prmtool.core.errors import InputError


def where_filter(expression: str | None) -> pl.Expr | None:
    """A SQL-style boolean expression over columns (e.g. `correct AND prm_score > 0.5`).
    Parsed by polars, never evaluated as Python."""
    if not expression:
        return None
    try:
        return pl.sql_expr(expression)
    except Exception as exc:
        raise InputError(f"--where {expression!r}: {shards._one_line(exc)}") from None


def check_where(condition: pl.Expr, where: str, shard: shards.InputShard) -> None:
    """Apply --where to an empty frame of the shard's schema: an unknown column fails here,
    before any output is written, not halfway through the shards."""
    try:
        pl.DataFrame(schema=shard.schema).filter(condition)
    except Exception as exc:
        raise InputError(f"{shard.path}: --where {where!r}: {shards._one_line(exc)}") from None
