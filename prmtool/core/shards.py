"""Shard I/O: find input shards, validate them, write output shards atomically with provenance.

A shard set is a directory of Parquet files. Every output file is written under a hidden
temporary name and renamed when complete, so a file under its final name is always whole; a
`_SUCCESS` manifest is written last, when every shard of the run is in place.
"""

from __future__ import annotations

import glob
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from prmtool import __version__
from prmtool.core.errors import InputError
from prmtool.core.outputs import check_outputs, input_roots
from prmtool.core.partition import Partition

WHOLE = Partition()

MANIFEST = "_SUCCESS"
METADATA_KEY = b"prmtool"


@dataclass(frozen=True)
class InputShard:
    path: Path
    size: int
    rows: int
    schema: pl.Schema
    digest: str = ""  # a hash of the file's bytes: an input edited in place is a new input

    # The output shard's name when it is not the file's: a shard found in a split folder of
    # the directory given (`train/part-0.parquet`) is `train-part-0.parquet`, so splits never collide.
    shard_name: str = ""

    @property
    def name(self) -> str:
        return self.shard_name or self.path.name

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "size": self.size, "rows": self.rows, "xxh3": self.digest}


def content_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (measured on a 2-core machine: 1.5 s per GB on a first read,
    0.5 s per GB from the page cache): what tells a shard edited in place, even to the same
    size, from the one a finished output was made from."""
    import xxhash

    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def _is_shard_file(path: Path) -> bool:
    # Hidden files are our own temporaries; `_` files are manifests and other side files.
    return path.suffix == ".parquet" and not path.name.startswith((".", "_"))


def _is_split(folder: Path) -> bool:
    return not folder.name.startswith((".", "_"))


_STDIN_SHARD: list[Path] = []  # standard input as a shard, made once per process


def stdin_shard() -> Path:
    """`-` as an input: JSON lines of rows on standard input (e.g. `prmtool export ... -o -`),
    read once into a private Parquet file with the contract's column types, then read like any
    other shard."""
    if not _STDIN_SHARD:
        import atexit
        import io
        import shutil
        import sys
        import tempfile

        from prmtool.core.schema import cast_to_contract

        data = sys.stdin.buffer.read()
        if not data.strip():
            raise InputError("-: standard input is empty (expected JSON lines, one row per line)")
        try:
            frame = cast_to_contract(pl.read_ndjson(io.BytesIO(data), infer_schema_length=None))
        except Exception as exc:
            raise InputError(f"-: standard input is not JSON lines of rows: {_one_line(exc)}") from None
        folder = Path(tempfile.mkdtemp(prefix="prmtool-stdin-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        frame.write_parquet(folder / "stdin.parquet")
        _STDIN_SHARD.append(folder / "stdin.parquet")
    return _STDIN_SHARD[0]


def resolve_inputs(specs: list[str] | tuple[str, ...]) -> list[tuple[Path, str]]:
    """Parquet files from any mix of files, directories and glob patterns, in a stable order,
    each with its shard name: the file's, or `SPLIT-FILE` for one found in a split folder.
    `-` is standard input, as JSON lines."""
    if not specs:
        raise InputError("no input given: pass Parquet files, directories or globs")
    files: list[Path] = []
    split_files: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if str(spec) == "-":
            files.append(stdin_shard())
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            matched = [m for m in matches if not m.is_dir() and _is_shard_file(m)]
            matched += [f for m in matches if m.is_dir() for f in sorted(m.glob("*.parquet")) if _is_shard_file(f)]
            if not matched:
                raise InputError(f"{spec}: the glob matches no Parquet file")
            files.extend(matched)
        elif path.is_dir():
            found = sorted(f for f in path.glob("*.parquet") if _is_shard_file(f))
            in_splits = sorted(f for f in path.glob("*/*.parquet") if _is_shard_file(f) and _is_split(f.parent))
            if found:  # shards at the top: a split folder beside them would be left unread
                _refuse_unread_splits(spec, found, in_splits)
            else:  # an export's folder: one subfolder of shards per split (train/, test/)
                found = in_splits
                split_files.update(f.resolve() for f in found)
            if not found:
                raise InputError(f"{spec}: the directory holds no Parquet file (nor do its split folders)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise InputError(f"{spec}: not a regular file (a FIFO, socket or device); a shard is a Parquet file")
        else:
            raise InputError(f"{spec}: no such file or directory")
    for f in files:  # a FIFO named *.parquet in a folder would block the first read forever
        if f.exists() and not f.is_file():
            raise InputError(f"{f}: not a regular file (a FIFO, socket or device); a shard is a Parquet file")
    unique: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, f"{f.parent.name}-{f.name}" if f.resolve() in split_files else f.name))
    return unique


def _refuse_unread_splits(spec: str, top: list[Path], in_splits: list[Path]) -> None:
    """A folder with shards at its top is read as those shards; shards in its subfolders too
    would be ignored without a word, so such a folder is refused (verl's export, whose
    `train.parquet` holds the rows of `train/`, is read as its top files)."""
    copies = {f.stem for f in top}
    unread = sorted({f.parent.name for f in in_splits if f.parent.name not in copies})
    if unread:
        raise InputError(
            f"{spec}: holds shards at its top and in the subfolder {unread[0]}/ too; give them as separate inputs "
            f"({Path(spec) / '*.parquet'}, {Path(spec) / unread[0]})"
        )


def open_inputs(specs: list[str] | tuple[str, ...]) -> list[InputShard]:
    """Resolve inputs and read each shard's footer; a corrupt file is an InputError."""
    shards = []
    for path, name in resolve_inputs(specs):
        try:
            parquet = pq.ParquetFile(path)
            schema = pl.Schema(pl.from_arrow(parquet.schema_arrow.empty_table()).schema)
            rows = parquet.metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise InputError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
        shards.append(InputShard(path, path.stat().st_size, rows, schema, digest=content_digest(path), shard_name=name))
    return shards


def read_shard(shard: InputShard) -> pl.DataFrame:
    try:
        return pl.read_parquet(shard.path)
    except Exception as exc:
        raise InputError(f"{shard.path}: not a readable Parquet file ({_one_line(exc)})") from None


def check_unique_ids(shards: list[InputShard], column: str = "response_id") -> None:
    """Ids must be unique across the whole shard set, not just within a shard."""
    frames = [
        pl.scan_parquet(s.path).select(pl.col(column), pl.lit(str(s.path)).alias("_file"))
        for s in shards
        if column in s.schema
    ]
    if not frames:
        return
    try:
        dupes = pl.concat(frames).filter(pl.col(column).is_duplicated()).head(2).collect()
    except Exception as exc:
        raise InputError(f"could not read column '{column}' ({_one_line(exc)})") from None
    if dupes.height:
        value = dupes[column][0]
        files = sorted(set(dupes["_file"]))
        raise InputError(f"{', '.join(files)}: duplicate {column} {value!r}")
    nulls = [
        s
        for s in shards
        if column in s.schema and pl.scan_parquet(s.path).select(pl.col(column).null_count()).collect().item()
    ]
    if nulls:
        raise InputError(f"{nulls[0].path}: column '{column}' has null values")


def check_output_dir(
    output: Path,
    inputs: list[InputShard],
    specs: list[str] | tuple[str, ...] = (),
    directories: dict[str, Path | None] | None = None,
    files: dict[str, Path | None] | None = None,
) -> None:
    """Refuse outputs that are, hold or lie inside one of the inputs (outputs.check_outputs),
    and an output directory that exists as a file. `directories` and `files` map the stage's
    other written paths (`--rejects`, `--report`) to where they point."""
    roots = input_roots(specs, [shard.path for shard in inputs])
    check_outputs(roots, {"-o": output, **(directories or {}), **(files or {})})
    for option, path in {"-o": output, **(directories or {})}.items():
        if path is not None and path.exists() and not path.is_dir():
            raise InputError(f"{path}: {option} exists and is not a directory")
    for option, path in (files or {}).items():
        if path is not None and path.is_dir():
            raise InputError(f"{path}: {option} is a directory; give a file path")


def check_distinct_names(inputs: list[InputShard]) -> None:
    """One output shard per input shard, same name: two inputs may not share a file name."""
    seen: dict[str, Path] = {}
    for shard in inputs:
        if shard.name in seen:
            raise InputError(f"{shard.path} and {seen[shard.name]}: two input shards share the name {shard.name}")
        seen[shard.name] = shard.path


def provenance(stage: str, arguments: dict, source: InputShard | None = None) -> dict:
    record = {"stage": stage, "version": __version__, "arguments": arguments}
    if source is not None:
        record["input"] = source.describe()
    return record


@contextmanager
def naming_the_path(path: Path):
    """An OSError without a file name (pyarrow's full disk: `No space left on device`) names
    `path`, the file that could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or " ".join(str(error).split()), str(path)) from None


def write_shard(frame: pl.DataFrame | pa.Table, path: Path, record: dict) -> None:
    """Write a Parquet file atomically, with `record` in its key-value metadata."""
    table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    table = table.cast(
        pa.schema([f.with_type(_standard_type(f.type)) for f in table.schema], metadata=table.schema.metadata)
    )
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(record, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_the_path(path):
        try:
            if table.num_rows:
                pq.write_table(table, temporary)
            else:
                # No rows: the schema and no row group at all. pyarrow would write one empty row
                # group, on which `datasets` fails for the whole folder ("BatchSize must be greater
                # than 0"); a file of no row groups it skips, and polars and pyarrow read either.
                pq.ParquetWriter(temporary, table.schema).close()
            _fsync(temporary)
            os.replace(temporary, path)
            _fsync(path.parent)
        finally:
            temporary.unlink(missing_ok=True)


def _standard_type(dtype: pa.DataType) -> pa.DataType:
    """polars writes large_string and large_list; plain string and list are what `datasets`,
    pandas and the training frameworks expect to read."""
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        return pa.list_(_standard_type(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([f.with_type(_standard_type(f.type)) for f in dtype])
    return dtype


def read_provenance(path: Path) -> dict | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[METADATA_KEY])
    except Exception:
        return None


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_the_path(path):
        try:
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            _fsync(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def write_manifest(
    output: Path, stage: str, arguments: dict, inputs: list[dict], outputs: dict[str, int], partition: Partition = WHOLE
) -> None:
    """The `_SUCCESS` manifest, written last: its presence means the whole run is complete.
    A partition writes its own (`_SUCCESS-00002-of-00008`), and the one that completes the set
    writes `_SUCCESS` for all of them."""
    record = {
        "stage": stage,
        "version": __version__,
        "arguments": arguments,
        "inputs": inputs,
        "outputs": [{"file": name, "rows": rows} for name, rows in sorted(outputs.items())],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if partition.whole:
        write_json_atomic(record, output / MANIFEST)
        return
    write_json_atomic(
        {**record, "partition": {"index": partition.index, "count": partition.count}},
        output / partition.manifest_name(),
    )
    _complete_partitions(output, record, partition.count)


def _complete_partitions(output: Path, record: dict, count: int) -> None:
    """Write `_SUCCESS` once every partition's manifest is in place for the same run. Two
    partitions finishing together may both write it: the same content, atomically."""
    pieces = [read_manifest(output, Partition(index, count).manifest_name()) for index in range(count)]
    key = (record["stage"], record["arguments"], record["inputs"])
    if any(piece is None or (piece["stage"], piece["arguments"], piece["inputs"]) != key for piece in pieces):
        return
    outputs = sorted((entry for piece in pieces for entry in piece["outputs"]), key=lambda entry: entry["file"])
    write_json_atomic({**record, "outputs": outputs, "partitions": count}, output / MANIFEST)


def read_manifest(output: Path, name: str = MANIFEST) -> dict | None:
    try:
        return json.loads((output / name).read_text())
    except (OSError, ValueError):
        return None


def prepare_whole_output(
    output: Path, stage: str, arguments: dict, inputs: list[dict], overwrite: bool, partition: Partition = WHOLE
) -> bool:
    """For stages that write their whole output in one go (import, export, filter). True when
    `output` already holds a complete run of the same stage, options and inputs (of this
    partition, with --num-shards): nothing to do."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    manifest = read_manifest(output, partition.manifest_name())
    existing = sorted(f for f in output.rglob("*.parquet") if not f.name.startswith(".")) if output.exists() else []
    if not partition.whole:  # the other partitions' files are theirs
        existing = [f for f in existing if f".{partition.label}." in f.name]
    if not overwrite:
        if manifest and (manifest.get("stage"), manifest.get("arguments"), manifest.get("inputs")) == (
            stage,
            arguments,
            inputs,
        ):
            return True
        if manifest is None and existing and _from_an_interrupted_run(existing, stage, arguments, inputs):
            for old in existing:  # this very command, stopped before its manifest: do it again
                old.unlink()
            return False
        if manifest or existing:
            raise InputError(f"{output}: holds the output of a different run; pass --overwrite to replace it")
        return False
    # --overwrite: clear what an earlier prmtool run wrote here (and only that) so nothing stale remains.
    (output / partition.manifest_name()).unlink(missing_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)
    for old in existing:
        if read_provenance(old) is not None:
            old.unlink()
    return False


def _from_an_interrupted_run(files: list[Path], stage: str, arguments: dict, inputs: list[dict]) -> bool:
    """Every file was written by this stage with these arguments (and, where its provenance
    names one, from one of these inputs): a run of the same command that a crash or Ctrl-C
    stopped before its manifest."""
    expected = provenance(stage, arguments)
    for path in files:
        record = read_provenance(path)
        if record is None:
            return False
        source = record.pop("input", None)
        if record != expected or (source is not None and source not in inputs):
            return False
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
