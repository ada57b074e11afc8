"""Deterministic partitions of a stage's work, for running one stage on many machines with no
coordination: `--shard-index i --num-shards n` (a Slurm array, `xargs -P`, or Ray tasks).

Two kinds, both depending only on the input, never on timing:
- by input shard (every stage that maps a shard to a shard): the shards sorted by file name,
  shard number j going to partition j mod n, so partitions differ by at most one shard;
- by problem (`filter`, which needs whole groups): a problem belongs to partition
  crc32(problem_id) mod n, so a group never straddles two partitions, however it is spread
  over the input shards.

Each partition writes its own manifest, `_SUCCESS-00002-of-00008`; the partition that finds
all n of them in place (same stage, options and inputs) writes the whole run's `_SUCCESS`,
so a later stage, `prmtool run` and `make` see one complete directory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from prmtool.core.errors import InputError

if TYPE_CHECKING:
    from prmtool.core.shards import InputShard


@dataclass(frozen=True)
class Partition:
    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, shard_index: int | None, num_shards: int | None) -> Partition:
        """The partition named on the command line; both options or neither."""
        if shard_index is None and num_shards is None:
            return cls()
        if shard_index is None or num_shards is None:
            raise InputError("--shard-index and --num-shards go together: give both or neither")
        if num_shards < 1:
            raise InputError(f"--num-shards {num_shards}: must be at least 1")
        if not 0 <= shard_index < num_shards:
            raise InputError(
                f"--shard-index {shard_index}: must be in 0..{num_shards - 1} for --num-shards {num_shards}"
            )
        return cls(shard_index, num_shards)

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def label(self) -> str:
        """`00002-of-00008`: how file names carry the partition."""
        return f"{self.index:05d}-of-{self.count:05d}"

    def manifest_name(self) -> str:
        return "_SUCCESS" if self.whole else f"_SUCCESS-{self.label}"

    def journal_name(self) -> str:
        """The record of the files this partition may write, kept until its manifest is."""
        return "_JOURNAL" if self.whole else f"_JOURNAL-{self.label}"

    def take_shards(self, found: list[InputShard]) -> list[InputShard]:
        """This partition's input shards (all of them for the whole run)."""
        if self.whole:
            return list(found)
        ordered = sorted(found, key=lambda s: s.name)
        return [shard for number, shard in enumerate(ordered) if number % self.count == self.index]

    def owns_problems(self, problem_ids: pl.Series) -> pl.Series:
        """A boolean mask: which rows' problems belong to this partition."""
        if self.whole:
            return pl.Series(problem_ids.name, [True] * problem_ids.len(), dtype=pl.Boolean)
        # crc32 of the UTF-8 id: stable across machines, processes and library versions
        # (polars' own hash is not), computed once per distinct problem.
        distinct = problem_ids.unique().drop_nulls()
        owner = pl.DataFrame(
            {
                "problem_id": distinct,
                "_owned": [zlib.crc32(str(p).encode()) % self.count == self.index for p in distinct],
            }
        )
        joined = pl.DataFrame({"problem_id": problem_ids}).join(
            owner, on="problem_id", how="left", maintain_order="left"
        )
        return joined["_owned"].fill_null(self.index == 0)  # a null problem_id goes to partition 0

    def shard_name(self, name: str) -> str:
        """An output file name unique to this partition, for stages whose partitions each write
        a piece of every input shard (filter): `part-00000.00002-of-00008.parquet`."""
        if self.whole:
            return name
        stem, dot, suffix = name.rpartition(".")
        return f"{stem}.{self.label}.{suffix}" if dot else f"{name}.{self.label}"
