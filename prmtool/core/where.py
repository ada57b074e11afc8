"""`--where`: a SQL-style row condition, parsed by polars (never evaluated as Python), checked
against every input's schema before any output is written."""

from __future__ import annotations

import json

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
    for column, text in _columns_compared_with_strings(condition):
        if shard.schema.get(column) == pl.Boolean and text not in ("true", "false"):
            # polars compares the string with the column as if it were its value: only the exact
            # words true and false mean one; any other (yes, TRUE) never matches, so the
            # condition is never true and every row would be dropped without an error
            raise InputError(
                f"{shard.path}: --where {where!r}: {column} is true or false, never {text!r} "
                f"(write {column}, or NOT {column})"
            )


def _columns_compared_with_strings(condition: pl.Expr) -> list[tuple[str, str]]:
    """(column, string) for each comparison of a column with a string literal in the
    condition's expression tree (polars' JSON form; a form it does not recognise yields none)."""
    try:
        tree = json.loads(condition.meta.serialize(format="json"))
    except Exception:
        return []
    found = []

    def visit(node) -> None:
        if isinstance(node, dict):
            binary = node.get("BinaryExpr")
            if isinstance(binary, dict):
                sides = [binary.get("left"), binary.get("right")]
                columns = [side["Column"] for side in sides if isinstance(side, dict) and "Column" in side]
                strings = [_string_literal(side) for side in sides]
                strings = [text for text in strings if text is not None]
                if columns and strings:
                    found.append((columns[0], strings[0]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(tree)
    return found


def _string_literal(node) -> str | None:
    literal = node.get("Literal") if isinstance(node, dict) else None
    for kind in ("Scalar", "Dyn"):
        value = literal.get(kind) if isinstance(literal, dict) else None
        if isinstance(value, dict) and isinstance(value.get("String", value.get("Str")), str):
            return value.get("String", value.get("Str"))
    return None
