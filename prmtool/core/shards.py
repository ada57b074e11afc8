"""Shard I/O: find input shards, validate them, write output shards atomically with provenance.

A shard set is a directory of Parquet files. Every output file is written under a hidden
temporary name and renamed when complete, so a file under its final name is always whole; a
`_SUCCESS` manifest is written last, when every shard of the run is in place, listing each
file with its rows, size and xxh3 hash.

What a run owns: before its first file, a run writes a journal (`_JOURNAL`, or
`_JOURNAL-00002-of-00008` for a partition) naming every file it may write; its manifest
replaces the journal when it completes. A command deletes or replaces only files listed in
such a record of an earlier run in the same folder, and only while they are still what that
run wrote (the size and hash its manifest lists; for a journal, prmtool's provenance): never a
subfolder or a file it did not write.

What a stage reads: a folder with a `_SUCCESS` exactly as that manifest lists it (a listed
file missing or changed is an error); a folder a prmtool run wrote but did not finish (shards
with prmtool's provenance, a journal or a partition's manifest, and no `_SUCCESS`) is refused
unless --allow-incomplete; a folder of Parquet files prmtool never wrote is read whole.
"""

from __future__ import annotations

import contextvars
import glob
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from prmtool import __version__
from prmtool.core import outputs
from prmtool.core.errors import InputError
from prmtool.core.outputs import check_outputs, check_regular_file, input_roots, replace_atomically
from prmtool.core.partition import Partition

WHOLE = Partition()

MANIFEST = "_SUCCESS"
JOURNAL = outputs.JOURNAL
METADATA_KEY = b"prmtool"

# --allow-incomplete: read a folder a prmtool run left unfinished, shards as they are. Set by
# `Stage.run` (and stats, eval) for the command's whole run.
READ_INCOMPLETE: contextvars.ContextVar[bool] = contextvars.ContextVar("read_incomplete", default=False)


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
            where = first_bad_json_line(data.splitlines()) or _one_line(exc)
            raise InputError(f"-: standard input is not JSON lines of rows: {where}") from None
        folder = Path(tempfile.mkdtemp(prefix="prmtool-stdin-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        frame.write_parquet(folder / "stdin.parquet")
        _STDIN_SHARD.append(folder / "stdin.parquet")
    return _STDIN_SHARD[0]


def first_bad_json_line(lines: Iterable[bytes]) -> str | None:
    """Where JSON lines that polars refused go wrong: the first line that is not a JSON object,
    by its number (polars' own message names none). Asked only after polars failed."""
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}, character {exc.pos + 1}: not JSON ({exc.msg})"
        except ValueError as exc:  # bytes that are not UTF-8
            return f"line {number}: not JSON ({_one_line(exc)})"
        if not isinstance(record, dict):
            return f"line {number}: a JSON {type(record).__name__}, not an object of columns"
    return None


def resolve_inputs(
    specs: list[str] | tuple[str, ...], expected: dict[Path, tuple[dict, Path]] | None = None
) -> list[tuple[Path, str]]:
    """Parquet files from any mix of files, directories and glob patterns, in a stable order,
    each with its shard name: the file's, or `SPLIT-FILE` for one found in a split folder.
    `-` is standard input, as JSON lines. A directory with a `_SUCCESS` gives the files it
    lists, and `expected` gets each one's manifest entry (its size and hash) and manifest."""
    expected = {} if expected is None else expected
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
            matched += [f for m in matches if m.is_dir() for f in _directory_files(m, expected, split_files, False)]
            if not matched:
                raise InputError(f"{spec}: the glob matches no Parquet file")
            files.extend(matched)
        elif path.is_dir():
            files.extend(_directory_files(path, expected, split_files))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise InputError(f"{spec}: not a regular file (a FIFO, socket or device); a shard is a Parquet file")
        else:
            raise InputError(f"{spec}: no such file or directory")
    _refuse_special_files(files)
    unique: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, f"{f.parent.name}-{f.name}" if f.resolve() in split_files else f.name))
    return unique


def _directory_files(
    path: Path, expected: dict[Path, tuple[dict, Path]], split_files: set[Path], whole: bool = True
) -> list[Path]:
    """A directory's shards: those its `_SUCCESS` lists (or its parent's, for a split folder
    of a complete export such as `work/trl/train`); else its Parquet files (or, with `whole`,
    its split folders'), refused if a prmtool run left them unfinished."""
    if read_manifest(path) is not None:
        found = _listed_files(path, expected)
        split_files.update(f.resolve() for f in found if f.parent != path)
        return found
    if read_manifest(path.parent) is not None and _is_split(path):
        return _listed_files(path.parent, expected, within=path.name)
    found = sorted(f for f in path.glob("*.parquet") if _is_shard_file(f))
    in_splits = sorted(f for f in path.glob("*/*.parquet") if _is_shard_file(f) and _is_split(f.parent))
    if found:  # shards at the top: a split folder beside them would be left unread
        _refuse_unread_splits(str(path), found, in_splits)
    elif whole:  # an export's folder: one subfolder of shards per split (train/, test/)
        found = in_splits
        split_files.update(f.resolve() for f in found)
        if not found:
            _refuse_unfinished(path, [])  # a run stopped before its first shard: say so
            raise InputError(f"{path}: the directory holds no Parquet file (nor do its split folders)")
    if found:
        _refuse_special_files(found)
        _refuse_unfinished(path, found)
    return found


def _refuse_special_files(files: list[Path]) -> None:
    """A FIFO named *.parquet in a folder would block the first read of it forever."""
    for f in files:
        if f.exists() and not f.is_file():
            raise InputError(f"{f}: not a regular file (a FIFO, socket or device); a shard is a Parquet file")


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
    """Resolve inputs and read each shard's footer; a corrupt file is an InputError, and so is
    a file that is no longer what its folder's `_SUCCESS` lists (size or hash)."""
    shards = []
    expected: dict[Path, tuple[dict, Path]] = {}
    for path, name in resolve_inputs(specs, expected):
        try:
            parquet = pq.ParquetFile(path)
            schema = pl.Schema(pl.from_arrow(parquet.schema_arrow.empty_table()).schema)
            rows = parquet.metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise InputError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
        shard = InputShard(path, path.stat().st_size, rows, schema, digest=content_digest(path), shard_name=name)
        if path in expected:
            _check_listed(shard, *expected[path])
        shards.append(shard)
    return shards


def _listed_files(folder: Path, expected: dict[Path, tuple[dict, Path]], within: str | None = None) -> list[Path]:
    """The files a folder's `_SUCCESS` lists (those in its subfolder `within`, if given), each
    present (and noted in `expected`)."""
    manifest_path = folder / MANIFEST
    entries = (read_manifest(folder) or {}).get("outputs")
    named = isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in entries)
    if not named:
        raise InputError(f"{manifest_path}: not a prmtool manifest (no list of output files)")
    if within is not None:
        entries = [entry for entry in entries if Path(entry["file"]).parent == Path(within)]
    files = []
    for entry in entries:
        file = folder / entry["file"]
        if not file.is_file() or ".." in Path(entry["file"]).parts:
            raise InputError(
                f"{file}: listed in {manifest_path} but missing; the folder changed after its run completed: "
                "rerun the command that wrote it"
            )
        expected[file] = (entry, manifest_path)
        files.append(file)
    if not files:
        where = folder if within is None else folder / within
        raise InputError(f"{where}: {manifest_path} lists no Parquet file there")
    return files


def _check_listed(shard: InputShard, entry: dict, manifest: Path) -> None:
    """A listed file must be the one its run wrote: same rows, size and hash (a manifest
    written before hashes were recorded gives rows only)."""
    for key, actual in (("rows", shard.rows), ("size", shard.size), ("xxh3", shard.digest)):
        if key in entry and entry[key] != actual:
            raise InputError(
                f"{shard.path}: its {key} is not what {manifest} lists; the file changed after its run completed: "
                "rerun the command that wrote it"
            )


def _refuse_unfinished(folder: Path, files: list[Path]) -> None:
    """A folder without `_SUCCESS` that a prmtool run wrote (a journal, a partition's manifest,
    or shards with prmtool's provenance) is unfinished: a killed run, a run still writing, or
    partitions not all done. Refused unless --allow-incomplete."""
    if READ_INCOMPLETE.get():
        return
    records = sorted(p.name for p in folder.glob("_SUCCESS-*")) + sorted(p.name for p in folder.glob("_JOURNAL*"))
    if records or any(read_provenance(f) is not None for f in files):
        why = f"it holds {records[0]}" if records else "its shards were written by prmtool"
        raise InputError(
            f"{folder}: has no {MANIFEST}, and {why}: the run that writes it has not completed; finish that run "
            "(rerun its command), or pass --allow-incomplete to read the shards there as they are"
        )


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
        if path is not None:
            check_regular_file(path, option)


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


def write_shard(frame: pl.DataFrame | pa.Table, path: Path, record: dict) -> None:
    """Write a Parquet file atomically, with `record` in its key-value metadata."""
    table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    table = table.cast(
        pa.schema([f.with_type(_standard_type(f.type)) for f in table.schema], metadata=table.schema.metadata)
    )
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(record, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)

    def write(handle) -> None:
        if table.num_rows:
            pq.write_table(table, handle)
        else:
            # No rows: the schema and no row group at all. pyarrow would write one empty row
            # group, on which `datasets` fails for the whole folder ("BatchSize must be greater
            # than 0"); a file of no row groups it skips, and polars and pyarrow read either.
            pq.ParquetWriter(handle, table.schema).close()

    replace_atomically(path, write)


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


def write_json_atomic(data: dict, path: Path, option: str = "output") -> None:
    text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    replace_atomically(path, lambda handle: handle.write(text), option)


def write_manifest(
    output: Path,
    stage: str,
    arguments: dict,
    inputs: list[dict],
    outputs: dict[str, int],
    partition: Partition = WHOLE,
    also: list[str] = (),
    beside: list[Path] = (),
    check_inputs: bool = True,
) -> None:
    """The `_SUCCESS` manifest, written last: its presence means the whole run is complete.
    Each output file is listed with its rows, size and hash, so a reader can tell it is still
    the file this run wrote; `also` lists files the run wrote beside its shards (verl's
    SPLIT.parquet), which are not read as its rows but are its own. A partition writes its own
    (`_SUCCESS-00002-of-00008`), and the one that completes the set writes `_SUCCESS` for all
    of them. The run's journal, which the manifest replaces, is removed. An input that changed
    while the run read it (another command rewrote it) leaves the output incomplete instead
    (`check_inputs` off: the caller read them whole at its start)."""
    for source in inputs if check_inputs else []:
        _check_unchanged(source, output)
    record = {
        "stage": stage,
        "version": __version__,
        "arguments": arguments,
        "inputs": inputs,
        "outputs": [file_entry(output, name, rows) for name, rows in sorted(outputs.items())],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if also:
        record["also"] = [file_entry(output, name) for name in sorted(also)]
    if beside:  # what it wrote outside `output`, which only a later run into `output` may replace
        record["beside"] = [str(path.resolve()) for path in beside]
        digests = (read_manifest(output, partition.journal_name()) or {}).get("beside_digests")
        if digests:
            record["beside_digests"] = digests
    if partition.whole:
        write_json_atomic(record, output / MANIFEST)
    else:
        write_json_atomic(
            {**record, "partition": {"index": partition.index, "count": partition.count}},
            output / partition.manifest_name(),
        )
        _complete_partitions(output, record, partition.count)
    (output / partition.journal_name()).unlink(missing_ok=True)


def _check_unchanged(source: dict, output: Path) -> None:
    """The input a run described at its start (path, size, hash) is still that file."""
    if not isinstance(source, dict) or not source.get("path") or not source.get("xxh3"):
        return
    path = Path(source["path"])
    if path.is_dir():  # import's datasets folder: hashed its own way, at its start
        return
    try:
        same = path.stat().st_size == source.get("size") and content_digest(path) == source["xxh3"]
    except OSError:
        same = False
    if not same:
        raise InputError(
            f"{path}: changed while this run read it (another command rewrote it?); {output} is left incomplete: "
            "rerun the command with --overwrite"
        )


def file_entry(output: Path, name: str, rows: int | None = None) -> dict:
    path = output / name
    entry = {"file": name, "size": path.stat().st_size, "xxh3": content_digest(path)}
    return entry if rows is None else {**entry, "rows": rows}


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
        record = json.loads((output / name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --- what a run owns --------------------------------------------------------------------------


def _identity(stage: str, arguments: dict, inputs: list[dict], count: int) -> tuple:
    """What a run is, as its records (manifests, journals) hold it after a trip through JSON."""
    return (stage, *json.loads(json.dumps([arguments, inputs], sort_keys=True, default=str)), count)


def _identity_of(record: dict) -> tuple:
    count = record.get("partitions") or (record.get("partition") or {}).get("count") or 1
    return (record.get("stage"), record.get("arguments"), record.get("inputs"), count)


def _records(output: Path) -> list[tuple[Path, dict]]:
    """Every manifest and journal in `output`, whole and per partition."""
    if not output.is_dir():
        return []
    paths = sorted(output.glob(f"{MANIFEST}*")) + sorted(output.glob(f"{JOURNAL}*"))
    return [(path, record) for path in paths if (record := read_manifest(output, path.name)) is not None]


def listed(record: dict) -> list[dict]:
    """The files a record says its run wrote: a manifest's entries (with size and hash), a
    journal's names."""
    entries = [e for e in [*record.get("outputs", []), *record.get("also", [])] if isinstance(e, dict)]
    entries += [{"file": name} for name in record.get("files", []) if isinstance(name, str)]
    return [e for e in entries if isinstance(e.get("file"), str) and ".." not in Path(e["file"]).parts]


def still_as_written(path: Path, entry: dict) -> bool:
    """`path` is still the file a record lists: a regular file of the listed size and hash (an
    older manifest lists rows only; a journal, names only: then prmtool's provenance must be in
    it)."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        if "xxh3" in entry:
            return path.stat().st_size == entry.get("size") and content_digest(path) == entry["xxh3"]
        if read_provenance(path) is None:
            return False
        return "rows" not in entry or pq.ParquetFile(path).metadata.num_rows == entry["rows"]
    except Exception:
        return False


def _from_prmtool(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and read_provenance(path) is not None


def _refuse_other_runs_folders(output: Path, names: Iterable[str]) -> None:
    """A subfolder the files `names` go into that holds a record (manifest or journal) is
    another run's output (export's OUTPUT/train may be a verify run's -o): its files are that
    run's, whatever provenance they carry."""
    folders = {(output / name).parent for name in names} - {output}
    for folder in sorted(folders):
        record = next((path for path, _ in _records(folder)), None)
        if record is not None:
            raise InputError(
                f"{folder}: holds another run's output ({record.name}), where this run writes its files; "
                "move it away or choose another output"
            )


def claim_output(
    output: Path,
    stage: str,
    arguments: dict,
    inputs: list[dict],
    partition: Partition,
    names: list[str],
    overwrite: bool,
    beside: list[Path] = (),
) -> None:
    """Before a run writes its first file into `output` (holding its lock): make room, then
    journal the `names` it may write (and `beside`: what it writes outside `output`, export's
    --hf-dataset folder).

    Without --overwrite, a record (manifest or journal) of another run there is refused: a
    partition never joins a folder whose other partitions ran with other settings. With it,
    every earlier run's listed files are removed (only those still as written), with their
    records, but never those of this run's other partitions; a file at one of `names` that no
    record lists (someone else's) is refused before anything is removed.
    """
    run = _identity(stage, arguments, inputs, partition.count)
    own = {partition.manifest_name(), partition.journal_name()}
    records = _records(output)
    _refuse_other_runs_folders(output, names)
    if not overwrite:
        for path, record in records:
            if _identity_of(record) != run:
                raise InputError(
                    f"{output}: holds {path.name} of a different run (other stage, options, inputs or --num-shards); "
                    "pass --overwrite to replace that run's files, or choose another output"
                )
    else:
        earlier = [(path, record) for path, record in records if path.name in own or _identity_of(record) != run]
        entries = {entry["file"]: entry for _, record in earlier for entry in listed(record)}
        ours = {name for name, entry in entries.items() if still_as_written(output / name, entry)}
        for name in names:
            target = output / name
            # A prmtool shard at a name this run writes is replaced even if no record lists it
            # (its manifest deleted by hand); any other file there is someone else's.
            if (target.exists() or target.is_symlink()) and name not in ours and not _from_prmtool(target):
                raise InputError(
                    f"{target}: exists and no earlier prmtool run here lists it; --overwrite replaces only the files "
                    "a run wrote itself: move it away or choose another output"
                )
        for name in sorted(ours):
            (output / name).unlink()
        for path, _ in earlier:
            path.unlink(missing_ok=True)
        (output / MANIFEST).unlink(missing_ok=True)  # this partition's files change: the set is not complete
    journal = read_manifest(output, partition.journal_name()) or {}
    kept = [name for name in journal.get("files", []) if isinstance(name, str) and (output / name).exists()]
    files = sorted(set(names) | set(kept if _identity_of(journal) == run else []))
    output.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "arguments": arguments, "inputs": inputs, "partitions": partition.count, "files": files}
    if beside:
        record["beside"] = [str(path.resolve()) for path in beside]
    write_json_atomic(record, output / partition.journal_name())


def prepare_whole_output(
    output: Path,
    stage: str,
    arguments: dict,
    inputs: list[dict],
    overwrite: bool,
    partition: Partition = WHOLE,
    names: list[str] | None = None,
    beside: list[Path] = (),
) -> bool:
    """For stages that write their whole output in one go (import, export, filter). True when
    `output` already holds a complete run of the same stage, options and inputs (of this
    partition, with --num-shards): nothing to do. Otherwise the folder is made ready for the
    files `names` (relative paths): an interrupted run of this same command has its journaled
    files removed, --overwrite removes the earlier runs' listed files (`claim_output`), and
    any other Parquet file there is refused without --overwrite and left alone with it."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    manifest = read_manifest(output, partition.manifest_name())
    run = _identity(stage, arguments, inputs, partition.count)
    if not overwrite and manifest and _identity_of(manifest) == run:
        if (output / partition.journal_name()).exists():  # a kill after the manifest left it
            (output / partition.journal_name()).unlink()
        return True
    if names is None:  # only asking whether the output is complete
        return False
    if not overwrite:
        journal = read_manifest(output, partition.journal_name())
        journaled = set(journal.get("files", [])) if journal and _identity_of(journal) == run else set()
        existing = sorted(f for f in output.rglob("*.parquet") if not f.name.startswith(".")) if output.exists() else []
        if not partition.whole:  # the other partitions' files are theirs
            existing = [f for f in existing if f".{partition.label}." in f.name]
        strangers = [f for f in existing if str(f.relative_to(output)) not in journaled]
        if not manifest and strangers and not any(_from_prmtool(f) for f in strangers):
            raise InputError(
                f"{output}: holds Parquet files no prmtool run wrote ({strangers[0].relative_to(output)}); "
                "move them away or choose another output"
            )
        if manifest or strangers:
            raise InputError(f"{output}: holds the output of a different run; pass --overwrite to replace it")
        _refuse_other_runs_folders(output, journaled)
        for name in sorted(journaled):  # this very command, stopped before its manifest: do it again
            if still_as_written(output / name, {"file": name}):
                (output / name).unlink()
    claim_output(output, stage, arguments, inputs, partition, names, overwrite, beside)
    return False


def folder_digest(folder: Path) -> str:
    """A folder's contents: every entry's relative path, and a regular file's size and hash
    (anything else, a link included, only by its kind)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file" if path.is_file() else "other"
        detail = f"{path.stat().st_size}:{content_digest(path)}" if kind == "file" else ""
        digest.update(f"{path.relative_to(folder)}\0{kind}\0{detail}\n".encode())
    return digest.hexdigest()


def record_beside(output: Path, path: Path, digest: str) -> None:
    """Note in the run's journal the digest of what it is about to put at `path`, outside
    `output` (the manifest carries it on)."""
    journal_path = output / JOURNAL
    journal = read_manifest(output, JOURNAL) or {}
    journal.setdefault("beside_digests", {})[str(path.resolve())] = digest
    write_json_atomic(journal, journal_path)


def wrote_beside(output: Path, path: Path, run: tuple | None = None, digest: str | None = None) -> bool:
    """Whether a run into `output` (its manifest or journal; with `run`, (stage, arguments,
    inputs), only that run's journal) wrote `path` outside it, and it is still as written
    (`digest`: its folder_digest, when the caller has it already)."""
    key, current = str(path.resolve()), digest
    for record_path, record in _records(output):
        if key not in record.get("beside", []):
            continue
        if run is not None and (
            not record_path.name.startswith(JOURNAL) or _identity_of(record)[:3] != _identity(*run, 1)[:3]
        ):
            continue
        recorded = record.get("beside_digests", {}).get(key)
        if recorded is None:  # a record from before digests were kept: its word alone
            if run is None:
                return True
            continue
        current = current or folder_digest(path)
        if recorded == current:
            return True
    return False


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
